#!/usr/bin/env bash
# Every benchmark on one GPU (H100 / H200): the real-size step first (at most 15
# minutes, its timeout), then the others in under 8 minutes, at the GPU
# geometry (bench/common.py: decoder width 2048, 16 layers, 16 / 4 heads,
# FFN 5632, bf16 compute, fp32 master weights; LLaVA-1.5's 576 visual tokens):
#
#     bash bench/gpu.sh              # on the GPU machine
#     bash bench/gpu.sh --dry-run    # the same steps at toy sizes on the CPU
#
# 0. LLaVA-1.5-7B at full size in bf16 (bench/real_size.py): load, prefill and
#    decode against the HBM roofline, Skip-FFN's realized saving (the dry run: 2 layers)
# 1. train step full / merge / skip at batch 16: time, MFU, realized vs ideal saving
# 2. prefill and per-token decode of every KV policy at batch 1, 16 and 64,
#    against the memory roof measured in the same run (a device-to-device copy)
# 3. the same imported weights in transformers (eager, static cache,
#    torch.compile) on the same device, same greedy tokens
# 4. answer latency, 576 tokens, batch 1, prefill + 16 tokens: full vs skip path (part of 2)
#
# Results: $OUT/results/<device>/ when $OUT is set (the device tool brings
# them back), else bench/results/<device>/; the dry run writes to $OUT or to a
# scratch folder, never to bench/results. Then, here: copy them into
# bench/results/<device>/ and run python bench/report.py.
#
# The GPU image lacks grain, ml_collections and tensorboardX: bring them as
# wheels (bash bench/fetch_wheels.sh, here) and start the device command with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# carrying `.whl`.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
failed=0
run() {  # a step that fails is recorded and the others still run
  echo "== $*" >&2
  "$@" || { echo "FAILED: $*" >&2; failed=1; }
}

if [ "${1:-}" = "--dry-run" ]; then
  # Each script once, at toy sizes: the batch-64 decode and the static-cache
  # and compiled transformers runners are the same code with other arguments.
  export BENCH_GEOMETRY=toy JAX_PLATFORMS=cpu
  export BENCH_RESULTS="${OUT:-$(mktemp -d)}/results"
  steps=1 repeats=1 gib=0.05 batch=4 large_batches="4" hf_runners=ours,hf_eager limit=120 real_layers=2
else
  export BENCH_GEOMETRY=gpu XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
  [ -n "${OUT:-}" ] && export BENCH_RESULTS="$OUT/results"
  steps=10 repeats=5 gib=1 batch=16 large_batches="16 64" hf_runners=ours,hf_eager,hf_static,hf_compile limit=150 real_layers=0
fi

run timeout 900 python bench/real_size.py --models llava15_7b --no-peer --layers "$real_layers" --scratch "$(mktemp -d)"
run timeout "$limit" python bench/skip_ffn.py --batch "$batch" --steps "$steps"
name=decode  # the first is the one bench/report.py tabulates
for b in $large_batches; do
  run timeout "$limit" python bench/decode.py --batch-large "$b" --repeats "$repeats" --gib "$gib" --name "$name"
  name=decode_batch$b
done
run timeout "$limit" python bench/vs_transformers.py --repeats "$repeats" --runners "$hf_runners"
echo "results in ${BENCH_RESULTS:-bench/results}" >&2
exit "$failed"
