"""bench/gpu.sh --dry-run: the GPU benchmark script's steps at toy sizes on
the CPU, so that the device time is never spent on a script that breaks."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_gpu_script_dry_run_writes_every_result_outside_the_repo(tmp_path):
    before = sorted(os.listdir(os.path.join(REPO, "bench", "results")))
    env = {**os.environ, "OUT": str(tmp_path)}
    proc = subprocess.run(
        ["bash", os.path.join("bench", "gpu.sh"), "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "results" / "cpu"
    results = {
        name: json.loads((folder / f"{name}.json").read_text()) for name in ("skip_ffn", "decode", "vs_transformers")
    }
    assert all(r["bench_geometry"] == "toy" for r in results.values())
    assert set(results["skip_ffn"]["layout"]) == {"full", "merge", "skip"}
    policies = {row["policy"] for row in results["decode"]["layout1296_batch"]["policies"]}
    assert (
        policies == {"full", "skip_vision", "h2o", "snapkv", "streaming"}
        and results["decode"]["copy_bandwidth_gb_s"] > 0
    )
    assert results["vs_transformers"]["hf_eager"]["same_tokens_as_ours"]
    assert sorted(os.listdir(os.path.join(REPO, "bench", "results"))) == before
