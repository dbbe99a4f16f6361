"""Word-level tokenizer of the embedded tasks (their vocabulary is closed),
built on Hugging Face `tokenizers`: lower-cased, punctuation split off, so
"What color is the ring?" and "what color is the ring ?" encode the same."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


class WordTokenizer:
    def __init__(self, words: Sequence[str]):
        vocab = [PAD, BOS, EOS, *words]
        if len(set(vocab)) != len(vocab):
            raise ValueError("tokenizer words must be distinct")
        self.vocab = vocab
        # No unknown token on purpose: `encode` names the word instead of
        # silently mapping it to one.
        self.tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=None))
        self.tokenizer.normalizer = normalizers.Lowercase()
        self.tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
        )
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2

    def __len__(self) -> int:
        return len(self.vocab)

    def words(self, text: str) -> list[str]:
        normalized = self.tokenizer.normalizer.normalize_str(text)
        return [word for word, _ in self.tokenizer.pre_tokenizer.pre_tokenize_str(normalized)]

    def encode(self, text: str) -> list[int]:
        vocab = self.tokenizer.get_vocab()
        unknown = [word for word in self.words(text) if word not in vocab]
        if unknown:
            raise ValueError(f"word {unknown[0]!r} is not in the vocabulary")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """The words before the first `<eos>`, special tokens left out."""
        ids = np.asarray(ids).tolist()
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return " ".join(self.vocab[i] for i in ids if i not in (self.pad_id, self.bos_id))
