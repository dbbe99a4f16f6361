"""bench/tradeoff.py end to end at 2 training steps: the variants it trains, reuses and measures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

sys.path.insert(0, os.path.join(REPO, "bench"))


def run_study(tmp_path, *args: str) -> dict:
    env = {**os.environ, "BENCH_RESULTS": str(tmp_path / "results")}
    command = [sys.executable, os.path.join(REPO, "bench", "tradeoff.py"), "--runs", str(tmp_path / "runs")]
    proc = subprocess.run(
        command + ["--steps", "2", "--questions", "8", *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = (tmp_path / "results").glob("*/tradeoff.json")
    return json.loads(path.read_text())


def test_answer_token_accuracy_counts_places_and_the_end():
    from tradeoff import answer_token_accuracy

    assert answer_token_accuracy("7 - 3", "7 - 2") == 3 / 4  # 7, -, <eos> right; 3 wrong
    assert answer_token_accuracy("7 - 2 9", "7 - 2") == 3 / 5  # one word too many: <eos> missed, over five
    assert answer_token_accuracy("- 7 -", "7 - -") == 2 / 4


@pytest.mark.slow
def test_study_trains_once_measures_every_cache_and_sweeps_the_policies(tmp_path):
    result = run_study(tmp_path, "--variants", "skip_nomerge,fastv", "--kv-variant", "skip_nomerge")
    runs = tmp_path / "runs"
    trained = {p.parent.name: json.loads(p.read_text()) for p in runs.glob("*/tradeoff_train.json")}
    assert set(trained) == {"skip_nomerge", "full"}  # fastv decodes the full run
    assert set(result["variants"]) == {"skip_nomerge", "skip_nomerge, skip_vision cache", "fastv"}
    assert result["variants"]["fastv"]["train_s"] == trained["full"]["train_s"]
    rows = result["variants"]
    # skip_vision's cache holds the prompt less the 36 skipped fine tokens
    assert rows["skip_nomerge"]["kv_slots"] - rows["skip_nomerge, skip_vision cache"]["kv_slots"] == 36

    kv = result["kv"]
    full_slots = kv["full"]["kv_slots"]
    from tradeoff import SWEPT_POLICIES

    assert set(SWEPT_POLICIES) == {"h2o", "snapkv", "pyramidkv", "streaming", "knorm", "tova", "observed_attention"}
    for fraction in (0.25, 0.5, 0.75):
        for policy in SWEPT_POLICIES:
            budget = kv[f"{policy}@{fraction:g}"]
            assert (budget["policy"], budget["mode"]) == (policy, "budget")
            if policy != "pyramidkv":  # its layers differ; kv_slots is their mean
                assert budget["kv_slots"] == max(round(fraction * full_slots), 11)
            ratio = kv[f"{policy}@{fraction:g}/ratio"]  # kvpress's ratio: the prompt keeps a share of its keys
            assert (ratio["policy"], ratio["mode"]) == (policy, "ratio") and ratio["kv_slots"] < full_slots
    assert kv["full"]["token_agreement_with_full"] == 1.0

    before = {name: (runs / name / "tradeoff_train.json").stat().st_mtime_ns for name in trained}
    again = run_study(tmp_path, "--variants", "skip_nomerge", "--skip-kv")
    assert {name: (runs / name / "tradeoff_train.json").stat().st_mtime_ns for name in trained} == before
    assert again["variants"]["fastv"] == result["variants"]["fastv"] and again["kv"] == result["kv"]
