"""The command lines' persistent compilation cache: a second process answering
the same prompt compiles nothing, reading every program back."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import REPO

ANSWER_ONCE = """
import json, sys
import numpy as np
from skipvision_jax import compilation
compilation.enable_persistent_cache(sys.argv[2])
counter = compilation.CompileCounter()
from skipvision_jax.data.synthetic import SyntheticVQA
from skipvision_jax.generate import Sampling
from skipvision_jax.inference import answer, load_trained
from skipvision_jax.kvcache import KVPolicy
loaded = load_trained(sys.argv[1])
ids = loaded.text.prompt_ids("what color is the ring ?")
batch = {
    "input_ids": np.asarray([ids], np.int32),
    "text_mask": np.ones((1, len(ids)), bool),
    "pixels": SyntheticVQA("val", 1)[0]["pixels"][None],
}
result = answer(loaded, batch, loaded.model_cfg, KVPolicy.of("full"), 4, Sampling(), repeats=1)
print(json.dumps({"compiled": counter.compiled, "cache_hits": counter.cache_hits, "tokens": result["tokens"]}))
"""


def run_once(workdir: str, cache: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", ANSWER_ONCE, workdir, cache], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_second_process_reads_every_program_back(trained_workdir, tmp_path):
    cache = str(tmp_path / "cache")
    first, second = run_once(trained_workdir, cache), run_once(trained_workdir, cache)
    assert first["compiled"] > 0 and first["cache_hits"] == 0 and os.listdir(cache)
    assert second["compiled"] == 0 and second["cache_hits"] == first["compiled"]
    assert second["tokens"] == first["tokens"]


def test_the_command_lines_write_to_the_cache_the_flag_names(trained_workdir, tmp_path):
    from skipvision_jax.data.tasks import export_llava_eval

    exported = export_llava_eval(str(tmp_path / "export"), "val", 4)
    cache = str(tmp_path / "cli_cache")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "infer.py"),
            f"--checkpoint={trained_workdir}",
            f"--image={os.path.join(exported['images'], 'val_000000.png')}",
            "--prompt=What color is the ring?",
            "--max-new-tokens=2",
            f"--compilation-cache={cache}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert os.listdir(cache)
