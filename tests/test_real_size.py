"""bench/real_size.py's dry run: both models at their real widths with 2 of
their decoder layers, every step (write, load through both layouts, prefill
and decode, the Skip-Vision layout, transformers' peer) in processes of
their own. Minutes: `slow`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_the_real_size_benchmark_runs_at_two_layers(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "real_size.py"), "--layers", "2", f"--scratch={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, row in results["models"].items():
        ours = row["ours_hf_layout"]
        assert ours["param_dtypes"] == ["bfloat16"], name  # held in the checkpoint's own dtype
        assert ours["peak_rss_after_load_gb"] <= ours["rss_limit_gb"], (name, ours)
        assert row["ours_llava_layout"]["param_bytes"] > 0
        assert [r["batch"] for r in ours["plain"]] == [1, 4]
        assert 0 < ours["skip"]["flop_ideal_saving"] < 1
        assert row["transformers"]["decode_ms_per_token"] > 0
