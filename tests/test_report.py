"""The README's results block against bench/results/."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import REPO


def test_readme_results_block_is_generated_from_the_committed_results():
    """Every number in the README's results block comes from bench/results/ via bench/report.py."""
    proc = subprocess.run(
        [sys.executable, os.path.join("bench", "report.py"), "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr.strip().splitlines()[-1:]
