"""Scores an answers file as a benchmark's published tables do.

    python -m skipvision_jax.vqa.score --benchmark B [--convention llava|lmms-eval] \\
        --answers-file A.jsonl --annotation-file G.jsonl

Prints one JSON line and writes A.scores.json. Default convention: LLaVA's
where LLaVA has a scorer (textvqa, gqa, pope, scienceqa_img), lmms-eval's
elsewhere (vqav2, mme). Bad input is a one-line error, exit 1, and nothing
is written.
"""

from __future__ import annotations

import argparse
import json
import sys

from skipvision_jax.errors import one_line
from skipvision_jax.vqa import benchmarks, files


def score_file(benchmark: str, convention: str | None, answers_file: str, annotation_file: str) -> dict:
    """The scores of one answers file; written beside it as A.scores.json."""
    benchmarks.resolve(benchmark, convention)
    annotations = benchmarks.read_annotations(annotation_file, benchmark, convention)
    result = benchmarks.score(benchmark, files.read_answers(answers_file), annotations, convention)
    with open(files.sibling_path(answers_file, "scores.json"), "w") as out:
        json.dump(result, out, indent=2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", required=True, help=" | ".join(benchmarks.BENCHMARKS))
    parser.add_argument("--convention", default=None, help="llava | lmms-eval (default: see above)")
    parser.add_argument("--answers-file", required=True)
    parser.add_argument("--annotation-file", required=True)
    args = parser.parse_args(argv)
    try:
        result = score_file(args.benchmark, args.convention, args.answers_file, args.annotation_file)
    except ValueError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
