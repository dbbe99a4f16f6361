"""The README's main job over what varies: 5 seeds (init and data) x 1 and 2
XLA threads, every question kind per run, and the wall times.

    python bench/default_seeds.py [--runs runs/default_seeds] [--seeds 0,1,2,3,4]

Each run is `python train.py --workdir RUN --config.train.seed=S
--config.data.seed=S` under `taskset`: two-thread runs alone on cores 0 and
1 (the README's command on this machine), one-thread runs two at a time, one
per core (XLA sizes its thread pool by the cores the process may use). A run
already finished in `--runs` (its `wall.json` written) is reused. Prints one
JSON line; writes bench/results/<device>/default_seeds.json (the table:
python bench/report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import write_result

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("colour", "shape", "count", "position")


def run_name(seed: int, threads: int) -> str:
    return f"t{threads}_s{seed}"


def start(runs: str, seed: int, threads: int, cores: str) -> subprocess.Popen:
    workdir = os.path.join(runs, run_name(seed, threads))
    command = ["taskset", "-c", cores, sys.executable, os.path.join(REPO, "train.py"), f"--workdir={workdir}"]
    command += [f"--config.train.seed={seed}", f"--config.data.seed={seed}"]
    log = open(workdir + ".log", "w")
    return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def finish(runs: str, seed: int, threads: int, proc: subprocess.Popen, began: float) -> None:
    if proc.wait():
        raise SystemExit(
            f"error: {run_name(seed, threads)} failed; see {os.path.join(runs, run_name(seed, threads))}.log"
        )
    with open(os.path.join(runs, run_name(seed, threads), "wall.json"), "w") as f:
        json.dump({"wall_s": time.perf_counter() - began}, f)


def done(runs: str, seed: int, threads: int) -> bool:
    return os.path.exists(os.path.join(runs, run_name(seed, threads), "wall.json"))


def summary(runs: str, seed: int, threads: int) -> dict:
    workdir = os.path.join(runs, run_name(seed, threads))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        last = [json.loads(line) for line in f if "val_exact_match" in line][-1]
    with open(os.path.join(workdir, "wall.json")) as f:
        wall = json.load(f)["wall_s"]
    return {
        "seed": seed,
        "threads": threads,
        "steps": last["step"],
        "all": last["val_exact_match"],
        **{kind: last[f"val_exact_match_{kind}"] for kind in KINDS},
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=os.path.join(REPO, "runs", "default_seeds"))
    parser.add_argument("--seeds", default="0,1,2,3,4")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    os.makedirs(args.runs, exist_ok=True)
    for seed in seeds:  # two threads: alone on the machine
        if not done(args.runs, seed, 2):
            began = time.perf_counter()
            finish(args.runs, seed, 2, start(args.runs, seed, 2, "0,1"), began)
    pending = [seed for seed in seeds if not done(args.runs, seed, 1)]
    for pair in (pending[i : i + 2] for i in range(0, len(pending), 2)):  # one thread: a run per core
        began = time.perf_counter()
        procs = [(seed, start(args.runs, seed, 1, str(core))) for core, seed in enumerate(pair)]
        for seed, proc in procs:
            finish(args.runs, seed, 1, proc, began)
    rows = [summary(args.runs, seed, threads) for threads in (1, 2) for seed in seeds]
    worst = min(min(row[kind] for kind in KINDS) for row in rows)
    result = {"runs": rows, "worst_kind": worst, "cpus": os.cpu_count()}
    print(json.dumps(result))
    write_result("default_seeds", result)


if __name__ == "__main__":
    main()
