"""A LLaMA-style BPE tokenizer trained on a data set's own text (Hugging Face
`tokenizers`), for data that ships without one (the easy-VQA example).

The same pipeline as transformers' `LlamaTokenizer` (legacy=False, the
tokenizer of Vicuna-7B-v1.5 and LLaVA-1.5): no normalizer, a Metaspace
pre-tokenizer that turns spaces into "▁" and prepends one to the text's
first word, BPE with byte fallback (every byte has a token, so no text is
unknown), BOS `<s>` added in front, `<unk>` `<s>` `</s>` as ids 0-2. The
merges are learnt on words with their leading "▁", as sentencepiece learns
them. tests/test_templates.py checks that transformers' `LlamaTokenizer`
built from the same vocabulary and merges encodes the same ids.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL = ("<unk>", "<s>", "</s>")
BYTE_TOKENS = tuple(f"<0x{i:02X}>" for i in range(256))


def train_llama_style(texts: Iterable[str], vocab_size: int, extra_special: tuple[str, ...] = ()) -> Tokenizer:
    """A BPE tokenizer of at most `vocab_size` tokens learnt from `texts`;
    `extra_special` tokens (e.g. "<image>") are added as special tokens."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # Learn on words ("▁word"), as sentencepiece does ...
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[*SPECIAL, *BYTE_TOKENS], show_progress=False, initial_alphabet=[]
    )
    tokenizer.train_from_iterator(texts, trainer)
    # ... then encode as LLaMA does: the text unsplit, one "▁" before its first word.
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    if extra_special:
        tokenizer.add_special_tokens(list(extra_special))
    return tokenizer


def vocab_and_merges(tokenizer: Tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE model's vocabulary and merges (what transformers' LlamaTokenizer is built from)."""
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return model["vocab"], merges
