#!/usr/bin/env bash
# Every benchmark on one GPU (H100 / H200) in under 8 minutes; results go to
# bench/results/<device>/, then the README block and figures are regenerated.
#
#     bash bench/gpu.sh
#
# Training runs in bfloat16 so that MFU is against the dense bf16 peak.
# bench/vs_transformers.py needs torch + transformers on the machine; without
# them its row records the error and the rest still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
timeout 240 python bench/skip_ffn.py --dtype bfloat16 --batch 16 --steps 10 || echo "skip_ffn failed"
timeout 180 python bench/decode.py --batch-large 64 --repeats 5 || echo "decode failed"
timeout 60 python bench/vs_transformers.py --repeats 5 || echo "vs_transformers failed"
python bench/report.py
