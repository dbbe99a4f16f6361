"""Prefixes shared between prompts on one image (eval.py's many questions per
image): each distinct prefix (the text before the image and the visual block)
prefills once, the rest of each prompt against it; the caches and answers
are a full prefill's, under every press."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from skipvision_jax.batching import share_prefixes
from skipvision_jax.generate import Generator
from skipvision_jax.kvcache import KVPolicy
from tests.conftest import init_params, stack_layers, tiny_batch, tiny_config

CFG = tiny_config()
MAX_NEW = 5


def _prompts_sharing_images():
    """Six prompts, three questions on each of two images, ragged; the text
    before the image is the same (a chat template's)."""
    batch = tiny_batch(CFG, batch=6, num_text=9, seed=3)
    ids, pixels = np.array(batch["input_ids"]), np.array(batch["pixels"])
    ids[:, : CFG.layout.image_offset] = ids[0, : CFG.layout.image_offset]
    pixels[1:3], pixels[4:6] = pixels[0], pixels[3]
    text_mask = np.ones(ids.shape, bool)
    for row, length in ((1, 6), (2, 3), (4, 8), (5, 5)):
        text_mask[row, length:] = False
    return {"input_ids": ids, "text_mask": text_mask, "pixels": pixels}


SHARED_PREFIX_POLICIES = [
    KVPolicy.of("full"),
    KVPolicy.of("skip_vision"),
    KVPolicy.of("h2o", budget=14, sink_tokens=1, recent_window=3),
    KVPolicy.of("snapkv", budget=16, obs_window=3),  # a 1-token question's window reaches into the prefix
    KVPolicy.of("pyramidkv", compression=0.3, obs_window=3, pyramid_beta=2),
    KVPolicy.of("streaming", budget=14, sink_tokens=2),
    KVPolicy.of("knorm", budget=16),
    KVPolicy.of("tova", budget=14),
    KVPolicy.of("observed_attention", compression=0.6),
    KVPolicy.of("expected_attention", compression=0.5, sink_tokens=2),
    KVPolicy.of("keydiff", compression=0.5),
]


CASES = (
    [(policy, "unrolled") for policy in SHARED_PREFIX_POLICIES]
    + [(p, "scanned") for p in SHARED_PREFIX_POLICIES if p.name in ("h2o", "expected_attention")]
    # The older variant: text rows (the question's) never read the skipped visual rows.
    + [(p, "text_blind") for p in SHARED_PREFIX_POLICIES if p.name in ("full", "snapkv")]
)


@pytest.mark.parametrize("policy, variant", CASES, ids=lambda c: c.name if isinstance(c, KVPolicy) else c)
def test_a_shared_prefix_gives_the_caches_and_answers_of_a_full_prefill(policy, variant):
    cfg = dataclasses.replace(CFG, scan_layers=variant == "scanned")
    if variant == "text_blind":
        cfg = dataclasses.replace(cfg, skip=dataclasses.replace(CFG.skip, text_sees_skipped=False))
    _, params = init_params(CFG)
    if variant == "scanned":
        params = stack_layers(params, [(0, CFG.decoder.num_layers)])
    prompts = _prompts_sharing_images()
    shared = share_prefixes(prompts, CFG.layout.image_offset, (1, 2, 4))
    assert shared["prefix_rows"].tolist() == [0, 3] and shared["prefix_index"].tolist() == [0, 0, 0, 1, 1, 1]
    generator = Generator(cfg, policy, MAX_NEW, record_logits=True)
    alone, once = generator(params, prompts), generator(params, shared)
    np.testing.assert_array_equal(np.asarray(once.tokens), np.asarray(alone.tokens))
    np.testing.assert_allclose(once.logits, alone.logits, atol=2e-5, rtol=2e-5)
    prefill = lambda batch: jax.tree.map(np.asarray, generator.prefill(params, batch, jax.random.key(0)).caches)
    for ours, reference in zip(prefill(shared), prefill(prompts), strict=True):
        # The same keys kept per row and KV head; their slot order (attention reads slots as a set)
        # may differ where two scores tie to rounding.
        ours, reference = by_position(ours), by_position(reference)
        np.testing.assert_array_equal(ours.valid, reference.valid)
        np.testing.assert_array_equal(np.where(ours.valid, ours.pos, -1), np.where(reference.valid, reference.pos, -1))
        np.testing.assert_allclose(ours.k, reference.k, atol=1e-5)


def by_position(cache):
    """The cache's slots of each row and KV head sorted by position, invalid slots last."""
    order = np.argsort(np.where(cache.valid, cache.pos, np.iinfo(np.int32).max), axis=-1, kind="stable")
    slots = lambda x: np.take_along_axis(x, order if x.ndim == order.ndim else order[..., None], axis=order.ndim - 1)
    return cache.replace(k=slots(cache.k), v=slots(cache.v), pos=slots(cache.pos), valid=slots(cache.valid))


def test_prefixes_are_shared_only_between_rows_with_the_same_image_and_text_before_it():
    prompts = _prompts_sharing_images()
    distinct = {**prompts, "pixels": prompts["pixels"] + np.arange(6)[:, None, None, None]}
    assert "prefix_rows" not in share_prefixes(distinct, 2, (8,))  # nothing to share: the batch as it was
    other_text = {**prompts, "input_ids": prompts["input_ids"].copy()}
    other_text["input_ids"][2, 0] += 1
    copies = {k: np.concatenate([v[[0, 3]], v[[0, 0]]]) for k, v in prompts.items()}  # two rows, collate's copies
    assert "prefix_rows" not in share_prefixes(copies, 2, (1, 2, 4), real_rows=2)
    marked = share_prefixes(other_text, 2, (1, 2, 4))
    assert marked["prefix_rows"].tolist() == [0, 2, 3, 0] and marked["prefix_index"].tolist() == [0, 0, 1, 2, 2, 2]
