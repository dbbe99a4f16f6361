"""The KV presses against NVIDIA's kvpress on transformers (PyTorch, CPU, fp32),
on the same tiny random LLaVA checkpoints: the keys each (layer, KV head)
keeps after prefill, and eval.py's greedy answers under compression."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from kvpress import (
    ExpectedAttentionPress,
    KeyDiffPress,
    KnormPress,
    ObservedAttentionPress,
    PyramidKVPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)
from PIL import Image
from transformers import DynamicCache, LlavaForConditionalGeneration

from skipvision_jax.generate import Generator
from skipvision_jax.interop import hf_model
from skipvision_jax.kvcache import KVPolicy
from tests.helpers import REPO
from tests.hf_tiny import make_hf_llava, write_image

QUESTION = "what is in the picture ?"
WINDOW, KERNEL, SINKS, BETA = 4, 5, 2, 2  # beta 2: the tiny prompts get a real pyramid at low ratios


def press_pair(name: str, ratio: float):
    """kvpress's press and our policy with the same settings."""
    ours = KVPolicy.taking(
        name, compression=ratio, obs_window=WINDOW, pool_kernel=KERNEL, sink_tokens=SINKS, pyramid_beta=BETA
    )
    theirs = {
        "snapkv": lambda: SnapKVPress(ratio, window_size=WINDOW, kernel_size=KERNEL),
        "pyramidkv": lambda: PyramidKVPress(ratio, window_size=WINDOW, kernel_size=KERNEL, beta=BETA),
        "streaming": lambda: StreamingLLMPress(ratio, n_sink=SINKS),
        "knorm": lambda: KnormPress(ratio),
        "tova": lambda: TOVAPress(ratio),
        "observed_attention": lambda: ObservedAttentionPress(ratio),
        "expected_attention": lambda: ExpectedAttentionPress(ratio, n_sink=SINKS),
        "keydiff": lambda: KeyDiffPress(ratio),
    }[name]()
    return theirs, ours


PRESSES = ["snapkv", "pyramidkv", "streaming", "knorm", "tova", "observed_attention", "expected_attention", "keydiff"]


def test_expected_attention_defaults_are_kvpress_defaults():
    ours, theirs = KVPolicy.of("expected_attention").press, ExpectedAttentionPress()
    assert (ours.future_positions, ours.sink_tokens, ours.use_covariance, ours.use_vnorm, ours.epsilon) == (
        theirs.n_future_positions,
        theirs.n_sink,
        theirs.use_covariance,
        theirs.use_vnorm,
        theirs.epsilon,
    )


class Checkpoint:
    def __init__(self, directory: str, image: str):
        self.directory = directory
        # Eager attention hands the attention weights to the presses that read them
        # at prefill; decoding reads caches whose layers hold different numbers of
        # keys (PyramidKV), which SDPA takes without a mask, as kvpress decodes.
        self.torch_model = LlavaForConditionalGeneration.from_pretrained(directory, attn_implementation="eager").eval()
        self.decoding_model = LlavaForConditionalGeneration.from_pretrained(
            directory, attn_implementation="sdpa"
        ).eval()
        self.hf = hf_model.load(directory)
        self.image_path = image
        self.image = Image.open(image)

    def torch_inputs(self, question: str):
        return self.hf.processor(
            images=self.image, text=hf_model.chat_prompt(self.hf.processor, question), return_tensors="pt"
        )

    def torch_prefill(self, inputs, press=None):
        cache = DynamicCache()
        with torch.no_grad(), press(self.torch_model) if press is not None else contextlib.nullcontext():
            logits = self.torch_model(**inputs, past_key_values=cache).logits
        return logits, cache


@pytest.fixture(scope="module", params=["gqa", "mha_untied"])
def checkpoint(request, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp(request.param))
    make_hf_llava(directory, request.param)
    image = write_image(str(tmp_path_factory.mktemp("img") / "image.png"))
    return Checkpoint(directory, image)


def kvpress_kept(checkpoint: Checkpoint, press) -> list[list[list[int]]]:
    """Per layer and KV head, the prompt positions whose keys kvpress kept:
    each compressed key found among the uncompressed ones."""
    inputs = checkpoint.torch_inputs(QUESTION)
    _, full = checkpoint.torch_prefill(inputs)
    _, compressed = checkpoint.torch_prefill(inputs, press)
    kept = []
    for full_layer, layer in zip(full.layers, compressed.layers, strict=True):
        heads = []
        for all_keys, kept_keys in zip(full_layer.keys[0].numpy(), layer.keys[0].numpy(), strict=True):
            distance = ((kept_keys[:, None] - all_keys[None]) ** 2).sum(-1)  # [kept, L]
            assert np.allclose(distance.min(axis=1), 0.0, atol=1e-10)  # every kept key is one of the prompt's
            heads.append(sorted(distance.argmin(axis=1).tolist()))
        kept.append(heads)
    return kept


def our_kept(checkpoint: Checkpoint, policy: KVPolicy) -> list[list[list[int]]]:
    batch, cfg = hf_model.encode(checkpoint.hf, checkpoint.image, QUESTION)
    state = Generator(cfg, policy, max_new_tokens=1).prefill(checkpoint.hf.params, batch, jax.random.key(0))
    return [
        [sorted(np.asarray(c.pos[0, h])[np.asarray(c.valid[0, h])].tolist()) for h in range(c.pos.shape[1])]
        for c in state.caches
    ]


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("name", PRESSES)
def test_every_layer_and_kv_head_keeps_the_keys_kvpress_keeps(checkpoint, name, ratio):
    press, policy = press_pair(name, ratio)
    theirs = kvpress_kept(checkpoint, press)
    prompt_len = checkpoint.torch_inputs(QUESTION)["input_ids"].shape[1]
    assert all(len(head) < prompt_len for layer in theirs for head in layer)  # the press really compressed
    assert our_kept(checkpoint, policy) == theirs


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_expected_attention_without_value_norms_keeps_the_keys_kvpress_keeps(checkpoint, ratio):
    """The expected logits alone decide (on a tiny random model the value
    norms otherwise carry most of the ranking)."""
    theirs = kvpress_kept(checkpoint, ExpectedAttentionPress(ratio, n_sink=SINKS, use_vnorm=False))
    ours = KVPolicy.of("expected_attention", compression=ratio, sink_tokens=SINKS, use_vnorm=False)
    assert our_kept(checkpoint, ours) == theirs


def kvpress_answer(checkpoint: Checkpoint, question: str, press, max_new_tokens: int) -> str:
    """kvpress's greedy decoding (KVPressTextGenerationPipeline.generate_answer):
    the press compresses at prefill, then each new token goes in at its
    original position, reading the compressed cache whole."""
    inputs = checkpoint.torch_inputs(question)
    logits, cache = checkpoint.torch_prefill(inputs, press)
    prompt_len = inputs["input_ids"].shape[1]
    eos = checkpoint.hf.processor.tokenizer.eos_token_id
    generated = [int(logits[0, -1].argmax())]
    with torch.no_grad():
        for step in range(max_new_tokens - 1):
            if generated[-1] == eos:
                break
            out = checkpoint.decoding_model(
                input_ids=torch.tensor([[generated[-1]]]),
                past_key_values=cache,
                position_ids=torch.tensor([[prompt_len + step]]),
            )
            generated.append(int(out.logits[0, -1].argmax()))
    return checkpoint.hf.processor.tokenizer.decode(generated, skip_special_tokens=True)


def test_eval_answers_a_ragged_batch_as_kvpress_answers_each_prompt(checkpoint, tmp_path):
    """eval.py --kv-policy all --kv-compression 0.5: four questions of
    different lengths in one padded batch; each press's answers are the text
    kvpress decodes for each prompt alone."""
    from skipvision_jax.vqa import files

    questions = ["what is in the picture ?", "red ?", "a blue square ring ?", "one two three"]
    shutil.copy(checkpoint.image_path, tmp_path / "0.png")
    lines = [{"question_id": f"q{i}", "image": "0.png", "text": text} for i, text in enumerate(questions)]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    ratio, max_new = 0.5, 8  # every prompt keeps at least the window (4 keys)
    proc = subprocess.run(
        [
            sys.executable,
            "eval.py",
            f"--hf-checkpoint={checkpoint.directory}",
            f"--question-file={tmp_path / 'q.jsonl'}",
            f"--image-folder={tmp_path}",
            f"--answers-file={tmp_path / 'answers.jsonl'}",
            "--batch-size=4",
            f"--max-new-tokens={max_new}",
            "--kv-policy=all",
            f"--kv-compression={ratio}",
            f"--obs-window={WINDOW}",
            f"--pool-kernel={KERNEL}",
            f"--sink-tokens={SINKS}",
            f"--pyramid-beta={BETA}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lengths = {checkpoint.torch_inputs(q)["input_ids"].shape[1] for q in questions}
    assert len(lengths) == len(questions)
    full = {a["question_id"]: a["text"] for a in files.read_answers(str(tmp_path / "answers.full.jsonl"))}
    changed = 0
    for name in PRESSES:
        answers = {a["question_id"]: a for a in files.read_answers(str(tmp_path / f"answers.{name}.jsonl"))}
        assert len({a["metadata"]["bucket"] for a in answers.values()}) == 1  # one batch, padded to one length
        for line in lines:
            press, _ = press_pair(name, ratio)
            expected = kvpress_answer(checkpoint, line["text"], press, max_new)
            assert answers[line["question_id"]]["text"] == expected, (name, line)
            changed += expected != full[line["question_id"]]
    assert changed > 0  # compression changed some answers, so the keys chosen matter
