"""easy-VQA (the `easy-vqa` package on the package index) in LLaVA's formats:
a small public VQA set nobody here made, the first test of the whole path.

    pip install easy-vqa
    python -m skipvision_jax.data.easy_vqa --export DIR [--val-images 400] [--train-images N] [--test-images N]

64 x 64 images of one coloured shape (circle, rectangle, triangle; 8
colours); 4,000 training images with 38,575 questions and 1,000 test images
with 9,673 questions about the shape, its colour, or yes/no. Writes:

- `images/{train,test}/<id>.png`: the package's images;
- `train.json`, `val.json`: LLaVA's training format, one question a record,
  the question followed by LLaVA-1.5's short-answer prompt
  ("Answer the question using a single word or phrase."); `--val-images`
  training images and all their questions are held back as `val.json`
  (choose settings on it, never on the test split);
- `questions.jsonl`, `annotations.jsonl`: the test split in eval.py's
  `model_vqa_loader` format, `category` shape | color | yes/no (from the
  answer); `lmms_eval.jsonl`, the same questions for lmms-eval's local task
  (integrations/lmms_eval);
- `tokenizer.json`: a LLaMA-style BPE tokenizer learnt on the training text in
  the chosen template (data/bpe.py); easy-VQA ships none.

Prints the paths as JSON. configs/easy_vqa.py trains on it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np

from skipvision_jax.data.bpe import train_llama_style
from skipvision_jax.data.templates import DEFAULT_TEMPLATE, IMAGE_TAG, TEMPLATES, template_named

SHORT_ANSWER = "Answer the question using a single word or phrase."  # LLaVA-1.5's VQA prompt
SHAPES = ("circle", "rectangle", "triangle")
TOKENIZER_VOCAB = 1000  # the text has about 500 distinct pieces: merges stop there


def answer_category(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in SHAPES else "color"


def _split(which: str):
    """(questions, answers, image ids, image paths) of the package's split."""
    import easy_vqa

    if which == "train":
        (questions, answers, image_ids), paths = easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()
    else:
        (questions, answers, image_ids), paths = easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()
    return questions, answers, image_ids, paths


def _chosen_images(image_ids, count: int | None, seed: int) -> list[int]:
    """`count` of the split's images (all when None), a seeded draw in id order."""
    distinct = sorted(set(image_ids))
    if count is None or count >= len(distinct):
        return distinct
    return sorted(np.random.default_rng(seed).choice(distinct, size=count, replace=False).tolist())


def _copy_images(directory: str, split: str, ids, paths) -> None:
    os.makedirs(os.path.join(directory, "images", split), exist_ok=True)
    for image_id in ids:
        shutil.copyfile(paths[image_id], os.path.join(directory, "images", split, f"{image_id}.png"))


def _records(split: str, questions, answers, image_ids, keep: set[int]) -> list[dict]:
    return [
        {
            "id": f"{split}_{i}",
            "image": f"{split}/{image_id}.png",
            "conversations": [
                {"from": "human", "value": f"{IMAGE_TAG}\n{question}\n{SHORT_ANSWER}"},
                {"from": "gpt", "value": answer},
            ],
        }
        for i, (question, answer, image_id) in enumerate(zip(questions, answers, image_ids))
        if image_id in keep
    ]


def export(
    directory: str,
    val_images: int = 400,
    train_images: int | None = None,
    test_images: int | None = None,
    template: str = DEFAULT_TEMPLATE,
    seed: int = 0,
    tokenizer_vocab: int = TOKENIZER_VOCAB,
) -> dict[str, str]:
    """Writes easy-VQA under `directory` (module docstring); returns the paths.
    `train_images` takes a seeded draw of the training images, `test_images`
    the first of the test ones (all by default); `val_images` of the
    training ones are held back."""
    questions, answers, image_ids, paths = _split("train")
    chosen = _chosen_images(image_ids, None if train_images is None else train_images + val_images, seed)
    if val_images >= len(chosen):
        raise ValueError(f"--val-images: {val_images} leaves no training image of {len(chosen)}")
    held = set(np.random.default_rng(seed + 1).choice(chosen, size=val_images, replace=False).tolist())
    train = _records("train", questions, answers, image_ids, set(chosen) - held)
    val = _records("train", questions, answers, image_ids, held)
    _copy_images(directory, "train", chosen, paths)

    test_questions, test_answers, test_ids, test_paths = _split("test")
    kept_test = set(sorted(set(test_ids))[:test_images])  # the first ones: test/0.png is always there
    _copy_images(directory, "test", sorted(kept_test), test_paths)
    out = {
        "images": os.path.join(directory, "images"),
        "train": os.path.join(directory, "train.json"),
        "val": os.path.join(directory, "val.json"),
        "questions": os.path.join(directory, "questions.jsonl"),
        "annotations": os.path.join(directory, "annotations.jsonl"),
        "lmms_eval": os.path.join(directory, "lmms_eval.jsonl"),
        "tokenizer": os.path.join(directory, "tokenizer.json"),
    }
    for key, records in (("train", train), ("val", val)):
        with open(out[key], "w") as f:
            json.dump(records, f)
    with open(out["questions"], "w") as q, open(out["annotations"], "w") as a, open(out["lmms_eval"], "w") as table:
        for i, (question, answer, image_id) in enumerate(zip(test_questions, test_answers, test_ids)):
            if image_id not in kept_test:
                continue
            category, image, text = answer_category(answer), f"test/{image_id}.png", f"{question}\n{SHORT_ANSWER}"
            q.write(json.dumps({"question_id": i, "image": image, "text": text, "category": category}) + "\n")
            a.write(json.dumps({"question_id": i, "answer": answer, "category": category}) + "\n")
            row = {"question_id": i, "image": os.path.abspath(os.path.join(out["images"], image)), "question": text}
            table.write(json.dumps({**row, "answer": answer, "category": category}) + "\n")
    chat = template_named(template)
    texts = [chat.render([turn["value"] for turn in record["conversations"]]).text for record in train]
    train_llama_style(texts, tokenizer_vocab).save(out["tokenizer"])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export easy-VQA in LLaVA's training and evaluation formats.")
    parser.add_argument("--export", required=True, metavar="DIR", help="Output directory.")
    parser.add_argument("--val-images", type=int, default=400, help="Training images held back for validation.")
    parser.add_argument("--train-images", type=int, default=None, help="Training images kept (default: all).")
    parser.add_argument("--test-images", type=int, default=None, help="The first test images kept (default: all).")
    parser.add_argument(
        "--template", default=DEFAULT_TEMPLATE, choices=tuple(TEMPLATES), help="The tokenizer learns its text."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-vocab", type=int, default=TOKENIZER_VOCAB, help="At most this many tokens.")
    args = parser.parse_args(argv)
    try:
        paths = export(
            args.export,
            args.val_images,
            args.train_images,
            args.test_images,
            args.template,
            args.seed,
            args.tokenizer_vocab,
        )
    except ImportError:
        parser.exit(1, "error: easy-VQA is not installed: pip install easy-vqa\n")
    except ValueError as err:
        parser.exit(1, f"error: {err}\n")
    print(json.dumps(paths))


if __name__ == "__main__":
    main()
