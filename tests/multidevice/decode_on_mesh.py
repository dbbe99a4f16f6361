"""Run with 8 fake devices (see tests/test_sharding.py): parameters created
straight into their shardings, and every KV policy decodes the same prompts unsharded and on a data x fsdp x tensor = 2 x 2 x 2
mesh; prints one JSON object."""

from __future__ import annotations

import json

import jax
import numpy as np

from skipvision_jax import sharding
from skipvision_jax.generate import Generator
from skipvision_jax.kvcache import KVPolicy
from skipvision_jax.nn import SkipVisionVLM
from tests.conftest import tiny_batch, tiny_config

MAX_NEW = 6

# The presses tests/test_sharding.py checks: the cache's layouts (full, the
# skipped segment dropped), an evicting press, an attention-reading one, and
# one that ranks by position.
MESH_POLICIES = ("full", "skip_vision", "h2o", "snapkv", "streaming")


def main() -> None:
    assert jax.device_count() == 8, jax.device_count()
    cfg = tiny_config()
    model = SkipVisionVLM(cfg)
    prompts = {k: v for k, v in tiny_batch(cfg, batch=4, num_text=7).items() if k != "loss_mask"}
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    init = lambda: model.init(
        jax.random.key(0), prompts["input_ids"][:1], prompts["text_mask"][:1], prompts["pixels"][:1]
    )["params"]
    plan = sharding.plan_init(init, mesh, sharding.DEFAULT_RULES)
    sharded_params = plan.create()
    params = jax.device_put(sharded_params, jax.devices()[0])
    result = {
        "param_bytes_per_device": sharding.per_device_bytes(sharded_params),
        "param_bytes": sum(x.nbytes for x in jax.tree.leaves(params)),
        "param_shards": [
            [jax.tree_util.keystr(path), list(x.shape), list(x.addressable_shards[0].data.shape)]
            for path, x in jax.tree_util.tree_leaves_with_path(sharded_params)
        ],
    }
    for name in MESH_POLICIES:
        policy = KVPolicy.taking(
            name, budget=None if name in ("full", "skip_vision") else 24, sink_tokens=2, recent_window=4, obs_window=3
        )
        alone = Generator(cfg, policy, MAX_NEW)(params, prompts)
        on_mesh = Generator(cfg, policy, MAX_NEW, mesh=mesh)(sharded_params, prompts)
        k = on_mesh.caches[0].k  # [B, KV, S, Dh]
        result[name] = {
            "same_tokens": bool(np.array_equal(np.asarray(alone.tokens), np.asarray(on_mesh.tokens))),
            "tokens": np.asarray(on_mesh.tokens).tolist(),
            "cache_shard_shape": list(k.addressable_shards[0].data.shape),
            "cache_shape": list(k.shape),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
