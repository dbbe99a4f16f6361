"""Per-token decode time of the attention-ranked KV policies (h2o, snapkv) at
the CPU geometry of bench/decode.py, for comparing two versions of the
package measured back to back on one machine (this one is noisy: compare
ratios from one session, alternating the versions):

    python bench/kv_decode_cost.py --name kv_decode_cost_after
    PYTHONPATH=/path/to/older/checkout python bench/kv_decode_cost.py --name kv_decode_cost_before

1. 576 visual tokens (skip model: 100 kept + 476 merged to 156), batch 1,
   each policy at 50% of the full cache.
2. 1296 visual tokens (Skip-FFN model without merging), batch 16 (its cache
   outweighs the weights), each policy at 50% of the full cache.

Prints one JSON line; writes bench/results/<device>/<name>.json.
"""

from __future__ import annotations

import argparse

from common import (
    VISION_576,
    VISION_1296,
    copy_bandwidth,
    inference_params,
    init_params,
    matmul_flops,
    read_bandwidth,
    skip_config,
    write_result,
)
from decode import PROMPT_TEXT, Roofs, make_inputs, measure

import skipvision_jax
from skipvision_jax.kvcache import CachePlan, KVPolicy

POLICIES = ("h2o", "snapkv")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--name", default="kv_decode_cost", help="result file name")
    args = parser.parse_args()
    roof = Roofs(max(read_bandwidth(0.5), copy_bandwidth(0.5)), matmul_flops())
    result = {"package": skipvision_jax.__file__, "new_tokens": args.new_tokens}
    for part, cfg, batch in (
        ("llava576_batch1", skip_config(VISION_576, 100, 156), 1),
        ("layout1296_batch16", skip_config(VISION_1296, 272, None), 16),
    ):
        inputs = make_inputs(cfg, batch)
        params = inference_params(init_params(cfg, inputs))
        budget = CachePlan.make(cfg, KVPolicy.of("full"), PROMPT_TEXT, args.new_tokens).buffer_size // 2
        rows = [
            measure(
                cfg, params, inputs, KVPolicy.of(name, budget), args.new_tokens, args.repeats, roof, time_prefill=False
            )
            for name in POLICIES
        ]
        result[part] = {row["policy"]: row["decode_ms_per_token"] for row in rows}
    write_result(args.name, result)


if __name__ == "__main__":
    main()
