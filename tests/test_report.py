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


def test_pareto_front_is_the_set_of_undominated_variants():
    """Against the definition: no other variant is at most as costly and at least as accurate."""
    import numpy as np

    sys.path.insert(0, os.path.join(REPO, "bench"))
    from report import pareto_front

    rng = np.random.default_rng(0)
    for _ in range(20):
        points = [(float(c), float(q), f"v{i}") for i, (c, q) in enumerate(rng.random((8, 2)))]
        undominated = [p for p in points if not any(o is not p and o[0] <= p[0] and o[1] >= p[1] for o in points)]
        assert pareto_front(points) == sorted(undominated)
