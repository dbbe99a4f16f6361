"""lmms-eval's hooks for the embedded task (skipvision_embedded.yaml): the
image of a question, its text as eval.py sends it, and eval.py's score."""

from PIL import Image

from skipvision_jax.vqa.benchmarks import exact_match


def doc_to_visual(doc: dict) -> list:
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def process_results(doc: dict, results: list[str]) -> dict:
    return {"exact_match": float(exact_match(results[0], doc["answer"]))}
