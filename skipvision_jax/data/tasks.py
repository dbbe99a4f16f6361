"""The generated tasks by `data.kind`, and their export to LLaVA's format.

The one place that knows every task: each task module builds on
`synthetic.GeneratedVQA` and none imports another's task.

    python -m skipvision_jax.data.tasks --export DIR [--task synthetic|detail] [--split val] [--size 1000] [--format eval|train]
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


def _exported_examples(directory: str, split: str, size: int, seed: int, task: str):
    """(index, image file name, kind, typed question, answer) of a split,
    each image written as `images/<split>_<index>.png` (the exact pixels the
    model trains and validates on)."""
    from PIL import Image  # only the exports write images

    source = generated_task(task)(split, size, seed)
    image_dir = os.path.join(directory, "images")
    os.makedirs(image_dir, exist_ok=True)
    for index in range(size):
        scene, kind, question, answer, rng = source.sample(index)
        image = f"{split}_{index:06d}.png"
        Image.fromarray(np.round(scene.render(rng) * 255).astype(np.uint8)).save(os.path.join(image_dir, image))
        yield index, image, kind, as_typed(question), answer


def export_llava_eval(directory: str, split: str, size: int, seed: int = 0, task: str = "synthetic") -> dict[str, str]:
    """Writes a split of a generated task (`data.kind`: synthetic or detail)
    in LLaVA's `model_vqa_loader` format: `images/<i>.png`, `questions.jsonl`
    ({question_id, image, text, category}) and `annotations.jsonl`
    ({question_id, answer, category}); and the same questions as one table
    for lmms-eval's task in integrations/lmms_eval (`lmms_eval.jsonl`:
    {question_id, image (its absolute path), question, answer, category},
    which `datasets` reads offline). Question i is example i of the task's
    (split, size, seed) source, so a model's score on the export is its
    validation score. Returns the four paths."""
    paths = {
        "images": os.path.join(directory, "images"),
        "questions": os.path.join(directory, "questions.jsonl"),
        "annotations": os.path.join(directory, "annotations.jsonl"),
        "lmms_eval": os.path.join(directory, "lmms_eval.jsonl"),
    }
    os.makedirs(directory, exist_ok=True)
    examples = _exported_examples(directory, split, size, seed, task)
    with (
        open(paths["questions"], "w") as questions,
        open(paths["annotations"], "w") as annotations,
        open(paths["lmms_eval"], "w") as table,
    ):
        for index, image, kind, question, answer in examples:
            questions.write(
                json.dumps({"question_id": index, "image": image, "text": question, "category": kind}) + "\n"
            )
            annotations.write(json.dumps({"question_id": index, "answer": answer, "category": kind}) + "\n")
            image_path = os.path.abspath(os.path.join(paths["images"], image))
            row = {"question_id": index, "image": image_path, "question": question, "answer": answer, "category": kind}
            table.write(json.dumps(row) + "\n")
    return paths


def export_llava_train(directory: str, split: str, size: int, seed: int = 0, task: str = "synthetic") -> dict[str, str]:
    """Writes a split of a generated task in LLaVA's training format
    (`data.kind=llava`): `images/<i>.png` and `<split>.json`, a list of
    {id, image, conversations: [human "<image>\\nquestion", gpt answer]}.
    Returns the two paths."""
    records = [
        {
            "id": f"{split}_{index}",
            "image": image,
            "conversations": [
                {"from": "human", "value": f"<image>\n{question}"},
                {"from": "gpt", "value": answer},
            ],
        }
        for index, image, _, question, answer in _exported_examples(directory, split, size, seed, task)
    ]
    path = os.path.join(directory, f"{split}.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return {"images": os.path.join(directory, "images"), "json": path}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a generated task in LLaVA's evaluation format.")
    parser.add_argument("--export", required=True, metavar="DIR", help="Output directory.")
    parser.add_argument("--split", default="val", choices=tuple(SPLITS))
    parser.add_argument("--size", type=int, default=1000, help="Questions (the default config validates on 1000).")
    parser.add_argument("--seed", type=int, default=0, help="The data.seed of the run to evaluate.")
    parser.add_argument("--task", default="synthetic", choices=tuple(TASKS), help="The run's data.kind.")
    parser.add_argument(
        "--format",
        default="eval",
        choices=("eval", "train"),
        help="eval: model_vqa_loader question/annotation files; train: a LLaVA training JSON (data.kind=llava).",
    )
    args = parser.parse_args(argv)
    if args.size < 1:
        parser.error(f"--size: must be >= 1, got {args.size}")
    export = export_llava_eval if args.format == "eval" else export_llava_train
    paths = export(args.export, args.split, args.size, args.seed, args.task)
    print(json.dumps({"count": args.size, **paths}))


if __name__ == "__main__":
    main()
