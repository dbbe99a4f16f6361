"""What JAX's persistent compilation cache saves a second run: the wall time
of infer.py (one answer), eval.py (128 questions) and serve.py's start-up
(until /health answers) in a fresh process, first with an empty cache, then
again with what the first run wrote.

    python bench/compile_cache.py --checkpoint runs/default [--questions 128]

Each command `--repeats` times from an empty cache, each time followed by
the same command on the cache it wrote; the medians. Prints one JSON line; writes bench/results/<device>/compile_cache.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from common import write_result

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"error: {' '.join(argv[:3])} failed: {proc.stderr[-2000:]}")
    return time.perf_counter() - start


def serve_start_s(argv: list[str], port: int) -> float:
    """From launching serve.py until its /health answers (every program warmed up)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv + [f"--port={port}"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"error: serve.py exited: {proc.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    return time.perf_counter() - start
            except OSError:
                time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a train.py run of the embedded task")
    parser.add_argument("--questions", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    scratch = tempfile.mkdtemp()
    export = os.path.join(scratch, "export")
    subprocess.run(
        [sys.executable, "-m", "skipvision_jax.data.tasks", "--export", export, "--size", str(args.questions)],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    cache = os.path.join(scratch, "cache")
    python = [sys.executable]
    commands = {
        "infer.py": python
        + [
            "infer.py",
            f"--checkpoint={args.checkpoint}",
            f"--image={os.path.join(export, 'images', 'val_000000.png')}",
            "--prompt=What color is the ring?",
        ],
        "eval.py": python
        + [
            "eval.py",
            f"--checkpoint={args.checkpoint}",
            f"--question-file={os.path.join(export, 'questions.jsonl')}",
            f"--image-folder={os.path.join(export, 'images')}",
            f"--answers-file={os.path.join(scratch, 'answers.jsonl')}",
        ],
        "serve.py start-up": python + ["serve.py", f"--checkpoint={args.checkpoint}"],
    }
    times: dict[str, dict[str, list[float]]] = {name: {"empty": [], "warm": []} for name in commands}
    answers = os.path.join(scratch, "answers.jsonl")
    for _ in range(args.repeats):
        for name, argv in commands.items():
            shutil.rmtree(cache, ignore_errors=True)  # the first run of this command: an empty cache
            for state in ("empty", "warm"):
                if os.path.exists(answers):  # eval.py resumes an answers file: start afresh
                    os.remove(answers)
                run = argv + [f"--compilation-cache={cache}"]
                times[name][state].append(serve_start_s(run, free_port()) if name.startswith("serve") else timed(run))
    rows = {
        name: {
            "first_s": statistics.median(t["empty"]),
            "second_s": statistics.median(t["warm"]),
            "speedup": statistics.median(t["empty"]) / statistics.median(t["warm"]),
        }
        for name, t in times.items()
    }
    result = {"checkpoint": args.checkpoint, "questions": args.questions, "commands": rows}
    print(json.dumps(result))
    write_result("compile_cache", result)
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
