"""One weight of a 7B decoder's MLP (4096 x 11008) times a batch of rows, in
float32 and in bfloat16, under XLA (jax.jit on this backend) and under torch
(the peer's backend): the decode-shaped product (1 row: every weight read
once) and the prefill-shaped one (640 rows: 576 visual + 64 text tokens).

    python bench/bf16_matmul.py [--repeats N]

Why bench/real_size.py's batch-1 decode sits above the memory roofline on a
CPU: a decode step is a chain of such matrix-vector products over bf16
weights, and the weight bytes per millisecond each backend streams through
one is its ceiling. Prints one JSON line; writes
bench/results/<device>/bf16_matmul.json.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import torch
from common import median_ms, read_bandwidth, write_result

WIDTH, HIDDEN = 4096, 11008  # Vicuna-7B's embed and MLP widths
ROWS = {"decode": 1, "prefill": 640}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each product (median)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((WIDTH, HIDDEN), dtype=np.float32) * 0.02
    product = jax.jit(jnp.matmul)
    rows = []
    for shape, count in ROWS.items():
        x = rng.standard_normal((count, WIDTH), dtype=np.float32)
        for dtype in ("float32", "bfloat16"):
            jx, jw = jnp.asarray(x, dtype), jnp.asarray(weight, dtype)
            # torch as transformers calls it: nn.Linear's [out, in] weight through F.linear
            # (torch.matmul over an [in, out] bf16 weight takes another, 50-90x slower path here).
            tx, tw = (torch.from_numpy(np.ascontiguousarray(a)).to(getattr(torch, dtype)) for a in (x, weight.T))
            weight_bytes = jw.nbytes
            for backend, ms in (
                ("xla", median_ms(lambda jx=jx, jw=jw: product(jx, jw), args.repeats)),
                # torch on the CPU returns when done: median_ms times it as it does XLA
                ("torch", median_ms(lambda tx=tx, tw=tw: torch.nn.functional.linear(tx, tw), args.repeats)),
            ):
                rows.append(
                    {
                        "shape": shape,
                        "rows": count,
                        "dtype": dtype,
                        "backend": backend,
                        "ms": ms,
                        "weight_gb_s": weight_bytes / ms / 1e6,
                        "gflop_s": 2 * count * WIDTH * HIDDEN / ms / 1e6,
                    }
                )
    write_result(
        "bf16_matmul",
        {
            "memory_read_gb_s": read_bandwidth(1.0) / 1e9,
            "torch_threads": torch.get_num_threads(),
            "repeats": args.repeats,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
