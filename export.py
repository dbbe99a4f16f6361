"""Exports a train.py run as a directory other code loads.

    python export.py --checkpoint RUN --out DIR --format hf|llava

`hf`: transformers' `LlavaForConditionalGeneration`, for the plain LLaVA
layout only (transformers has no merge, summary tokens or Skip-FFN).
`llava`: the original LLaVA / official Skip-Vision layout, summary pool
included as `model.ada`; a model with two separate pools is refused. Both
read back with `--hf-checkpoint DIR` (infer.py, eval.py, serve.py) and
`--config.init_from_hf`. See skipvision_jax/interop/export.py.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

from skipvision_jax import sharding
from skipvision_jax.errors import CheckpointError, one_line
from skipvision_jax.interop.export import FORMATS, export
from skipvision_jax.train.restore import restore_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="A train.py workdir.")
    parser.add_argument("--out", required=True, help="The directory to write.")
    parser.add_argument(
        "--format",
        default="hf",
        choices=FORMATS,
        help="hf: transformers' LlavaForConditionalGeneration; llava: LLaVA's own.",
    )
    args = parser.parse_args(argv)
    try:
        run = restore_run(args.checkpoint, sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
        vision_tower = (run.cfg.get("init") or {}).get("vision_tower", "")
        export(run.params, run.model_cfg, run.text, vision_tower, args.out, args.format)
    except (ValueError, CheckpointError) as err:  # HFCheckpointError is a ValueError
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 1
    print(os.path.abspath(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
