"""The generated tasks by `data.kind`, and their export to LLaVA's format.

The one place that knows every task: each task module builds on
`synthetic.GeneratedVQA` and none imports another's task.

    python -m skipvision_jax.data.tasks --export DIR [--task synthetic|detail] [--split val] [--size 1000]
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from skipvision_jax.data.detail import DetailVQA
from skipvision_jax.data.synthetic import SPLITS, GeneratedVQA, SyntheticVQA, as_typed

TASKS: dict[str, type[GeneratedVQA]] = {"synthetic": SyntheticVQA, "detail": DetailVQA}


def generated_task(kind: str) -> type[GeneratedVQA]:
    """The generated task of a `data.kind`."""
    if kind not in TASKS:
        raise ValueError(f"data.kind: {kind!r} is not a generated task, expected one of {tuple(TASKS)}")
    return TASKS[kind]


def export_llava_eval(directory: str, split: str, size: int, seed: int = 0, task: str = "synthetic") -> dict[str, str]:
    """Writes a split of a generated task (`data.kind`: synthetic or detail)
    in LLaVA's `model_vqa_loader` format: `images/<i>.png`, `questions.jsonl`
    ({question_id, image, text, category}) and `annotations.jsonl`
    ({question_id, answer, category}). Question i is example i of the task's
    (split, size, seed) source, so a model's score on the export is its
    validation score. Returns the three paths."""
    from PIL import Image  # only the export writes images

    source = generated_task(task)(split, size, seed)
    image_dir = os.path.join(directory, "images")
    os.makedirs(image_dir, exist_ok=True)
    paths = {
        "images": image_dir,
        "questions": os.path.join(directory, "questions.jsonl"),
        "annotations": os.path.join(directory, "annotations.jsonl"),
    }
    with open(paths["questions"], "w") as questions, open(paths["annotations"], "w") as annotations:
        for index in range(size):
            scene, kind, question, answer, rng = source.sample(index)
            image = f"{split}_{index:06d}.png"
            Image.fromarray(np.round(scene.render(rng) * 255).astype(np.uint8)).save(os.path.join(image_dir, image))
            questions.write(
                json.dumps({"question_id": index, "image": image, "text": as_typed(question), "category": kind}) + "\n"
            )
            annotations.write(json.dumps({"question_id": index, "answer": answer, "category": kind}) + "\n")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a generated task in LLaVA's evaluation format.")
    parser.add_argument("--export", required=True, metavar="DIR", help="Output directory.")
    parser.add_argument("--split", default="val", choices=tuple(SPLITS))
    parser.add_argument("--size", type=int, default=1000, help="Questions (the default config validates on 1000).")
    parser.add_argument("--seed", type=int, default=0, help="The data.seed of the run to evaluate.")
    parser.add_argument("--task", default="synthetic", choices=tuple(TASKS), help="The run's data.kind.")
    args = parser.parse_args(argv)
    if args.size < 1:
        parser.error(f"--size: must be >= 1, got {args.size}")
    paths = export_llava_eval(args.export, args.split, args.size, args.seed, args.task)
    print(json.dumps({"count": args.size, **paths}))


if __name__ == "__main__":
    main()
