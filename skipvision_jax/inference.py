"""Load a trained model from a workdir and answer questions about images."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh
from PIL import Image

from skipvision_jax import sharding
from skipvision_jax.batching import length_buckets
from skipvision_jax.config import LayoutConfig, ModelConfig
from skipvision_jax.data.images import load_image, preprocess
from skipvision_jax.data.llava import Turn
from skipvision_jax.data.templates import ConversationCodec, template_named
from skipvision_jax.generate import Generator, Sampling
from skipvision_jax.kvcache import KVPolicy, cache_bytes, cache_slots
from skipvision_jax.train.restore import restore_run

# Decoding is bound by reading weights and cache: tensor parallelism splits
# both; one prompt leaves nothing for data parallelism to split.
INFERENCE_MESH = {"data": 1, "fsdp": 1, "tensor": -1}


@dataclasses.dataclass
class LoadedModel:
    """A model ready to answer: params on a mesh, and its prompt/answer codecs."""

    model_cfg: ModelConfig
    params: dict
    mesh: Mesh
    rules: tuple
    stop_ids: tuple[int, ...]
    pad_id: int
    decode: Callable[[list[int]], str]
    # (image, conversation) -> (batch of 1 as numpy arrays, the model config for its layout)
    encode: Callable[[Image.Image, Sequence[Turn]], tuple[dict, ModelConfig]]
    max_text_len: int  # text tokens a prompt may have
    cfg: ml_collections.ConfigDict | None = None  # train.py's config (trained models)
    text: object | None = None  # their text format (`data.pipeline.text_format`)

    def length_buckets(self) -> tuple[int, ...]:
        """The text lengths its prompts are padded to (eval.py's and the server's):
        the smallest holds the text before the image and one token more."""
        return length_buckets(self.max_text_len, self.model_cfg.layout.image_offset + 1)

    def make_batch(self, image_path: str, question: str) -> tuple[dict, ModelConfig]:
        """One question about an image file (eval.py's and infer.py's prompt)."""
        return self.encode(load_image(image_path), [Turn("user", question)])


def load_trained(workdir: str, mesh_cfg=None, template: str | None = None, dtype: str = "auto") -> LoadedModel:
    """The params of the newest good checkpoint in a train.py workdir, restored
    onto a mesh (`mesh_cfg`: data/fsdp/tensor sizes; default: every device on
    `tensor`), whatever mesh trained them; prompts in the run's template, or
    in `template` (eval's --conv-mode). `dtype` other than "auto" (the run's own
    param and compute dtypes) holds and computes in it: restored as saved,
    then cast a weight at a time."""
    mesh = sharding.make_mesh(mesh_cfg or INFERENCE_MESH)
    run = restore_run(workdir, mesh, template=template)
    cfg, text, model_cfg, params = run.cfg, run.text, run.model_cfg, run.params
    if dtype != "auto":
        model_cfg = dataclasses.replace(model_cfg, dtype=dtype, param_dtype=dtype)
        params = cast_in_place(params, dtype)
    rules = sharding.logical_rules(cfg.get("mesh"))

    max_text_len = cfg.data.text_len - 1  # room for one answer token at least

    def encode(image: Image.Image, turns: Sequence[Turn]) -> tuple[dict, ModelConfig]:
        if [turn.role for turn in turns] != ["user"]:
            raise ValueError("prompt: this model's prompt format takes one user message (with the image)")
        if not turns[0].text.strip():
            raise ValueError("prompt: empty")
        ids = text.prompt_ids(turns[0].text)
        if len(ids) > max_text_len:
            raise ValueError(
                f"prompt: {len(ids)} tokens exceed the model's text length ({max_text_len} + 1 answer token at least)"
            )
        pixels = preprocess(image, model_cfg.vision.image_size)
        return {
            "input_ids": np.asarray([ids], np.int32),
            "text_mask": np.ones((1, len(ids)), bool),
            "pixels": pixels[None],
        }, model_cfg

    return LoadedModel(
        model_cfg, params, mesh, rules, text.stop_ids, text.pad_id, text.decode, encode, max_text_len, cfg, text
    )


def cast_in_place(params: dict, dtype: str) -> dict:
    """`params` (nested dicts of arrays) with their floating weights cast to
    `dtype` one at a time, in place: each old weight is freed as its cast is
    made, so a second copy of the model never exists."""
    for key, value in params.items():
        if isinstance(value, dict):
            cast_in_place(value, dtype)
        elif jnp.issubdtype(value.dtype, jnp.floating):
            params[key] = value.astype(dtype)
    return params


def load_hf(
    directory: str, mesh_cfg=None, visual_kept: int = -1, template: str | None = None, dtype: str = "auto"
) -> LoadedModel:
    """A Hugging Face LLaVA directory. `visual_kept` >= 0 keeps only the first
    that many visual tokens in the cache under `skip_vision` (the rest form the
    skipped segment; the prefill itself stays exactly transformers'). Prompts
    come from the directory's chat template, or from `template` (LLaVA's
    --conv-mode: its text tokenized as LLaVA's eval scripts do). `dtype`:
    see `hf_model.load` (auto: the checkpoint's own)."""
    from skipvision_jax.interop import hf_llava, hf_model

    mesh = sharding.make_mesh(mesh_cfg or INFERENCE_MESH)
    hf_config = hf_llava.read_config(directory)
    layout = None
    if visual_kept >= 0:
        num_visual = hf_llava.model_config_from_hf(hf_config).vision.num_features
        layout = LayoutConfig(num_kept=min(visual_kept, num_visual), merge_to=None, summary_tokens=False)
    hf = hf_model.load(directory, mesh, dtype=dtype, layout=layout)
    if hf.processor is None:
        raise hf_llava.HFCheckpointError(f"{directory}: no tokenizer/processor files, cannot encode a prompt")
    tokenizer = hf.processor.tokenizer
    max_text_len = hf_model.max_positions(hf) - hf.model_cfg.vision.num_features
    codec = None if template is None else ConversationCodec(tokenizer.backend_tokenizer, template_named(template))

    def encode(image: Image.Image, turns: Sequence[Turn]) -> tuple[dict, ModelConfig]:
        if not any(turn.text.strip() for turn in turns if turn.role == "user"):
            raise ValueError("prompt: empty")
        if codec is None:
            return hf_model.encode(hf, image, turns)
        if [turn.role for turn in turns] != ["user"]:
            raise ValueError("prompt: --conv-mode takes one user message (with the image)")
        ids = codec.prompt_ids(turns[0].text)
        if len(ids) > max_text_len:
            raise ValueError(f"prompt: {len(ids)} tokens exceed the model's text length ({max_text_len})")
        pixels = hf.processor.image_processor(image, return_tensors="np")["pixel_values"]
        layout = dataclasses.replace(hf.model_cfg.layout, image_offset=codec.image_offset)
        batch = {
            "input_ids": np.asarray([ids], np.int32),
            "text_mask": np.ones((1, len(ids)), bool),
            "pixels": pixels.transpose(0, 2, 3, 1).astype(np.float32),  # NCHW -> NHWC
        }
        return batch, dataclasses.replace(hf.model_cfg, layout=layout)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    stop_ids = hf_model.stop_ids(hf) if codec is None else codec.stop_ids
    return LoadedModel(
        hf.model_cfg, hf.params, mesh, sharding.DEFAULT_RULES, stop_ids, pad_id, decode, encode, max_text_len
    )


def with_model_config(loaded: LoadedModel, change: Callable[[ModelConfig], ModelConfig]) -> LoadedModel:
    """The same weights decoded under a changed config (e.g. FastV pruning,
    which adds no weights): every batch's config goes through `change`."""

    def encode(image: Image.Image, turns: Sequence[Turn]) -> tuple[dict, ModelConfig]:
        batch, model_cfg = loaded.encode(image, turns)
        return batch, change(model_cfg)

    return dataclasses.replace(loaded, model_cfg=change(loaded.model_cfg), encode=encode)


def answer_text(loaded: LoadedModel, tokens: np.ndarray) -> str:
    """The generated tokens of one row, up to the first stop token, as text."""
    stop = next((i for i, t in enumerate(tokens.tolist()) if t in loaded.stop_ids), len(tokens))
    return loaded.decode(tokens[:stop].tolist())


def model_generator(
    loaded: LoadedModel,
    model_cfg: ModelConfig,
    policy: KVPolicy,
    max_new_tokens: int,
    sampling: Sampling | None = None,
) -> Generator:
    """A Generator for the loaded model (`model_cfg`: a prompt's layout), with its stop and pad ids, on its mesh;
    greedy unless `sampling` says otherwise."""
    return Generator(
        model_cfg,
        policy,
        max_new_tokens,
        sampling or Sampling(),
        stop_ids=loaded.stop_ids,
        pad_id=loaded.pad_id,
        mesh=loaded.mesh,
        rules=loaded.rules,
    )


def answer(
    loaded: LoadedModel,
    batch: dict,
    model_cfg: ModelConfig,
    policy: KVPolicy,
    max_new_tokens: int,
    sampling: Sampling,
    seed: int = 0,
    repeats: int = 3,
) -> dict:
    """Generates, timing prefill and decode on compiled functions (first call compiles)."""
    generator = model_generator(loaded, model_cfg, policy, max_new_tokens, sampling)
    generator.plan(batch["input_ids"].shape[1])  # validate before compiling
    rng = jax.random.key(seed)
    jax.block_until_ready(generator(loaded.params, batch, rng).tokens)  # compile both
    prefill_s, decode_s = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        state = jax.block_until_ready(generator.prefill(loaded.params, batch, rng))
        prefill_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        state = jax.block_until_ready(generator.decode(loaded.params, state))
        decode_s.append(time.perf_counter() - start)
    tokens = np.asarray(state.tokens[0])[: int(state.step)]
    return {
        "text": answer_text(loaded, tokens),
        "tokens": tokens.tolist(),
        "prefill_ms": 1000 * float(np.median(prefill_s)),
        "decode_ms_per_token": 1000 * float(np.median(decode_s)) / max(len(tokens) - 1, 1),
        "kv_slots": cache_slots(state.caches),
        "kv_bytes": cache_bytes(state.caches),
        "policy": policy.name,
    }


def compare_policies(
    loaded: LoadedModel,
    batch: dict,
    model_cfg: ModelConfig,
    policies: list[KVPolicy],
    max_new_tokens: int,
    sampling: Sampling,
    seed: int = 0,
) -> list[dict]:
    """Several policies on one input (the first is the reference, `full`);
    pruning policies without a budget or ratio get half of the full cache."""
    num_text = batch["input_ids"].shape[1]
    rows = [
        answer(
            loaded,
            batch,
            model_cfg,
            p.with_default_budget(model_cfg, num_text, max_new_tokens),
            max_new_tokens,
            sampling,
            seed,
        )
        for p in policies
    ]
    for row in rows:
        row["agrees_with_full"] = row["tokens"] == rows[0]["tokens"]
    return rows
