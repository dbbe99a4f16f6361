"""LLaVA's conversation templates against the references' own code.

`plain` and `vicuna_v1` are compared with LLaVA's own `preprocess_multimodal`,
`preprocess_plain` and `preprocess_v1` (the `llava-torch` package, LLaVA's
code on the package index, installed --no-deps: tests/requirements-nodeps.txt)
run on a LLaMA-style BPE tokenizer, as transformers' `LlamaTokenizer` builds
it. The official Skip-Vision code is not on the package index: its `llama3`
template and `preprocess_llama3` are restated below line by line, run on a
LLaMA-3-style byte-level BPE tokenizer with LLaMA-3's special tokens.
"""

from __future__ import annotations

import copy
import sys
import types

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from skipvision_jax.data.bpe import train_llama_style, vocab_and_merges
from skipvision_jax.data.templates import TEMPLATES, ConversationCodec

CONVERSATIONS = [
    [("human", "<image>\nWhat color is the ring?"), ("gpt", "red")],
    [("human", "What is in the picture?\n<image>"), ("gpt", "A dog on a sofa.")],
    [
        ("human", "Describe the image.<image>"),
        ("gpt", "There is a small green triangle near the top left corner."),
        ("human", "Is there a blue shape?"),
        ("gpt", "No"),
        ("human", "How many shapes are there? Answer the question using a single word or phrase."),
        ("gpt", "one"),
    ],
    [
        ("human", "<image>\nWhat does the sign say?"),
        ("gpt", "Ünïcödé 字 and a\nnewline"),
        ("human", "Why?"),
        ("gpt", " because "),
    ],
]
# The text the tokenizers learn from: every conversation as each template renders
# it (the plain ones take a conversation's first pair, as preprocess_plain).
CORPUS = [
    template.render([text for _, text in (conversation[:2] if "plain" in name else conversation)]).text
    for name, template in TEMPLATES.items()
    for conversation in CONVERSATIONS
]


@pytest.fixture(scope="module")
def llama_tokenizer():
    """Ours (tokenizers) and transformers' LlamaTokenizer on the same vocabulary and merges."""
    from transformers import LlamaTokenizer

    ours = train_llama_style(CORPUS * 10, vocab_size=700)
    vocab, merges = vocab_and_merges(ours)
    theirs = LlamaTokenizer(vocab=vocab, merges=merges, legacy=False, add_bos_token=True)
    theirs.update_post_processor()
    theirs.pad_token = theirs.unk_token  # LLaVA's v1 setting (train.py: tokenizer.pad_token = tokenizer.unk_token)
    # preprocess_v1 takes one token off each later round for a non-legacy tokenizer
    # (LLaVA train.py lines 477-479): the slow sentencepiece tokenizer it loads
    # (use_fast=False) puts a lone "▁" before a round tokenized alone. transformers 5
    # has only this fast one, which does not: its counts are the legacy branch's.
    theirs.legacy = True
    return ours, theirs


@pytest.fixture(scope="module")
def llava():
    """LLaVA's `llava.train.train` and `llava.conversation`. train.py imports its
    trainer, which needs an older transformers; the preprocessing never uses it."""
    pytest.importorskip("llava.conversation")
    trainer = types.ModuleType("llava.train.llava_trainer")
    trainer.LLaVATrainer = object
    sys.modules.setdefault("llava.train.llava_trainer", trainer)
    from llava import conversation
    from llava.train import train

    return train, conversation


def test_the_bpe_tokenizer_is_llamas(llama_tokenizer):
    ours, theirs = llama_tokenizer
    assert ours.get_vocab_size() > len(vocab_and_merges(ours)[1]) > 100  # it learnt merges
    for text in CORPUS + ["", " leading space", "x\n\n y", "USER: <image>\nWhat? ASSISTANT: yes</s>USER: hi"]:
        assert ours.encode(text).ids == theirs(text).input_ids, text


@pytest.mark.parametrize("name", ["plain", "vicuna_v1"])
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_ids_and_loss_equal_llavas_own_preprocessing(llama_tokenizer, llava, name, index):
    """Token ids, where the image goes and which tokens carry the loss, as
    LLaVA's `preprocess` gives them (`preprocess_plain` keeps one pair)."""
    ours, theirs = llama_tokenizer
    train, conversation = llava
    from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

    turns = CONVERSATIONS[index][:2] if name == "plain" else CONVERSATIONS[index]
    conversation.default_conversation = conversation.conv_templates[name]
    data_args = types.SimpleNamespace(is_multimodal=True, mm_use_im_start_end=False)
    sources = train.preprocess_multimodal([[{"from": who, "value": text} for who, text in turns]], data_args)
    reference = train.preprocess(copy.deepcopy(sources), theirs, has_image=True)
    ids, labels = reference["input_ids"][0].tolist(), reference["labels"][0].tolist()
    image = ids.index(IMAGE_TOKEN_INDEX)
    assert any(label != IGNORE_INDEX for label in labels)  # LLaVA saw no tokenization mismatch

    codec = ConversationCodec(ours, TEMPLATES[name])
    our_ids, our_mask = codec.example([text for _, text in turns])
    assert codec.image_offset == image
    assert our_ids == ids[:image] + ids[image + 1 :]
    assert our_mask == [label != IGNORE_INDEX for i, label in enumerate(labels) if i != image]


def test_generation_prompts_equal_llavas_eval(llama_tokenizer, llava):
    """The prompt eval.py sends: LLaVA's `model_vqa_loader` builds it with
    `conv.append_message(roles[0], "<image>\\n" + q)`, `append_message(roles[1], None)`
    (llava/eval/model_vqa_loader.py lines 42-49) and `tokenizer_image_token`."""
    ours, theirs = llama_tokenizer
    _, conversation = llava
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import tokenizer_image_token

    question = "What color is the ring?\nAnswer the question using a single word or phrase."
    for name in ("plain", "vicuna_v1"):
        conv = conversation.conv_templates[name].copy()
        conv.append_message(conv.roles[0], "<image>\n" + question)
        conv.append_message(conv.roles[1], None)
        ids = tokenizer_image_token(conv.get_prompt(), theirs)
        image = ids.index(IMAGE_TOKEN_INDEX)
        codec = ConversationCodec(ours, TEMPLATES[name])
        assert codec.prompt_ids(question) == ids[:image] + ids[image + 1 :], name
        assert codec.image_offset == image


# ---- llama3: the official Skip-Vision code, restated (not on the package index)

LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def llama3_tokenizer():
    """Byte-level BPE as LLaMA-3's tokenizer.json: its special tokens, `<|begin_of_text|>` added in front."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=LLAMA3_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 10, trainer)
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    return tokenizer


def official_llama3_prompt(messages: list[str | None], system: str) -> str:
    """zwl666666/Skip-Vision `llava/conversation.py` lines 559-569
    (`SeparatorStyle.LLAMA3`) with the "llama-3" template of lines 1988-2001:
    system_template "<|start_header_id|>system<|end_header_id|>\\n\\n{system_message}<|eot_id|>",
    roles ("user", "assistant")."""
    system_prompt = f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
    ret = "<|begin_of_text|>"
    if system:
        ret += system_prompt
    else:
        ret += ""
    for i, message in enumerate(messages):
        role = ("user", "assistant")[i % 2]
        if message:
            ret += f"<|start_header_id|>{role}<|end_header_id|>\n\n"
            ret += f"{message.strip()}<|eot_id|>"
        else:
            ret += f"<|start_header_id|>{role}<|end_header_id|>\n\n"
    return ret


def official_tokenizer_image_token(prompt: str, tokenizer: Tokenizer, image_token_index: int = -200) -> list[int]:
    """Skip-Vision `llava/mm_utils.py` lines 193-212 (LLaVA's, unchanged)."""
    prompt_chunks = [tokenizer.encode(chunk).ids for chunk in prompt.split("<image>")]
    insert_separator = lambda x, sep: [ele for sublist in zip(x, [sep] * len(x)) for ele in sublist][:-1]
    input_ids, offset = [], 0
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == bos:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def official_preprocess_llama3(values: list[str], tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Skip-Vision `llava/train/train.py` lines 631-712, one conversation, has_image=True:
    the loss mask from each round's token count (IGNORE_INDEX = -100)."""
    conversation = official_llama3_prompt(values, "You are a helpful and honest multimodal assistant.")
    input_ids = official_tokenizer_image_token(conversation, tokenizer)
    target = list(input_ids)
    sep = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    total_len = len(target)  # no padding: one conversation
    rounds = conversation.split("<|eot_id|>")
    re_rounds = ["<|eot_id|>".join(rounds[:3])]  # system + user + gpt
    for conv_idx in range(3, len(rounds), 2):
        re_rounds.append("<|eot_id|>".join(rounds[conv_idx : conv_idx + 2]))  # user + gpt
    cur_len = 1
    target[:cur_len] = [-100] * cur_len
    for rou in re_rounds:
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(official_tokenizer_image_token(rou, tokenizer))
        instruction_len = len(official_tokenizer_image_token(parts[0], tokenizer)) - 1
        target[cur_len : cur_len + instruction_len] = [-100] * len(target[cur_len : cur_len + instruction_len])
        cur_len += round_len
    target[cur_len:] = [-100] * len(target[cur_len:])
    assert cur_len == total_len, "tokenization mismatch (the official code ignores the whole conversation)"
    return input_ids, target


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_llama3_equals_the_official_code_restated(llama3_tokenizer, index):
    values = [text for _, text in CONVERSATIONS[index]]
    # preprocess_multimodal (Skip-Vision train.py lines 331-352, LLaVA's): the tag to the front
    values[0] = ("<image>\n" + values[0].replace("<image>", "").strip()).strip()
    ids, target = official_preprocess_llama3(values, llama3_tokenizer)
    image = ids.index(-200)
    codec = ConversationCodec(llama3_tokenizer, TEMPLATES["llama3"])
    our_ids, our_mask = codec.example([text for _, text in CONVERSATIONS[index]])
    bos = llama3_tokenizer.token_to_id("<|begin_of_text|>")
    assert our_ids[:2] == [bos, bos]  # the official quirk: the text's and the tokenizer's
    assert codec.image_offset == image
    assert our_ids == ids[:image] + ids[image + 1 :]
    assert our_mask == [label != -100 for i, label in enumerate(target) if i != image]
    eot = llama3_tokenizer.token_to_id("<|eot_id|>")
    assert codec.stop_ids[0] == eot and sum(our_mask) > values.count("") + len(values) // 2
