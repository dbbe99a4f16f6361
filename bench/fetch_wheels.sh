#!/usr/bin/env bash
# Wheels for the GPU machine, whose image lacks these packages and reaches no
# registry (see bench/gpu.sh): grain and its array-record and portpicker,
# ml_collections, tensorboardX, for CPython 3.12 on x86-64 Linux, into .whl/
# (ignored by git; name it in the device call's `carry`).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl \
  "grain==$(python3 -c 'import grain; print(grain.__version__)')" array-record portpicker \
  "ml_collections==$(python3 -c 'import importlib.metadata as m; print(m.version("ml_collections"))')" \
  "tensorboardX==$(python3 -c 'import importlib.metadata as m; print(m.version("tensorboardX"))')"
ls -la .whl
