"""Evaluate a model on a question file in LLaVA's `model_vqa_loader` format.

    python eval.py --checkpoint DIR --question-file Q.jsonl --image-folder IMGS --answers-file A.jsonl
        [--annotation-file GT.jsonl [--benchmark textvqa|vqav2|gqa|pope|mme|scienceqa_img|exact]
        [--convention llava|lmms-eval]] [--kv-policy POLICY|all] [--kv-budget N | --kv-compression R]
        [--batch-size 16] [--max-new-tokens 16] [--num-chunks N --chunk-idx I] [--model-id NAME]
    python eval.py --hf-checkpoint HF_DIR [--visual-kept K] ...

Greedy decoding, one answer line per question (a question is its id and
text: MME's two questions about an image share the id). Started again on the
same answers file it answers only the questions still missing. `--kv-policy
all` writes `A.<policy>.jsonl` for every policy and the table
`A.policies.json`. With an annotation file the answers are scored as the
benchmark's reference scores them (skipvision_jax/vqa/benchmarks.py; the
embedded tasks' plain exact match by default), written to `A.scores.json`
(or `A.<policy>.scores.json`) and printed.
"""

from __future__ import annotations

import dataclasses
import json

from absl import flags

from skipvision_jax import cli
from skipvision_jax.data.images import ImageError
from skipvision_jax.presses import POLICIES
from skipvision_jax.train.checkpoint import CheckpointError
from skipvision_jax.vqa import benchmarks, files

cli.define_model_flags()
flags.DEFINE_string(
    "question_file", None, "Questions, one JSON object a line: question_id, image, text, category.", required=True
)
flags.DEFINE_string("image_folder", None, "The folder the questions' image paths are relative to.", required=True)
flags.DEFINE_string("answers_file", None, "Answers jsonl to write (appended to, when it exists).", required=True)
flags.DEFINE_string(
    "annotation_file", None, "Ground truth, one JSON object a line: question_id and the benchmark's fields."
)
flags.DEFINE_string(
    "benchmark", None, f"Score as {' | '.join(benchmarks.BENCHMARKS)} does (default with --annotation-file: exact)."
)
flags.DEFINE_string(
    "convention", None, "llava | lmms-eval: whose scorer (default: LLaVA's where it has one, lmms-eval's elsewhere)."
)
flags.DEFINE_string("kv_policy", "full", f"{' | '.join(POLICIES)} | all")
cli.define_kv_flags()  # with 'all' and neither a budget nor a ratio: half of the full cache
flags.DEFINE_integer("batch_size", 16, "Questions decoded together.")
flags.DEFINE_bool(
    "share_prefix",
    True,
    "Questions of a batch on one image prefill the text before the question once (same answers; not under FastV).",
)
flags.DEFINE_integer("max_new_tokens", 16, "Answer tokens at most.")
flags.DEFINE_integer(
    "num_chunks", 1, "Split the questions in this many chunks (one per process or host), as LLaVA does."
)
flags.DEFINE_integer("chunk_idx", 0, "The chunk this process answers.")
flags.DEFINE_string("model_id", None, "model_id of the answer lines (default: the checkpoint's directory name).")
flags.DEFINE_integer("workers", 0, "Threads that read and preprocess images (0: half the cores).")
flags.DEFINE_integer(
    "fastv_layer",
    0,
    "FastV baseline: prune the visual tokens after this many decoder layers (0: off; plain models only).",
)
flags.DEFINE_integer("fastv_keep", 0, "FastV baseline: visual tokens kept, by the attention of the last prompt token.")
cli.define_distributed_flags()


def policy_table(answers: dict[str, list[dict]], scores: dict[str, dict]) -> list[dict]:
    """Per policy: exact match, agreement with `full` (same answer text), cache slots, ms per answer."""
    reference = {a["question_id"]: a["text"] for a in answers["full"] if "error" not in a}
    rows = []
    for name, lines in answers.items():
        answered = [a for a in lines if "error" not in a]
        row = {
            "policy": name,
            "agreement_with_full": sum(reference.get(a["question_id"]) == a["text"] for a in answered)
            / max(len(answered), 1),
            "kv_slots": max((a["metadata"]["kv_slots"] for a in answered), default=0),
            "ms_per_answer": sum(a["metadata"]["ms_per_answer"] for a in answered) / max(len(answered), 1),
        }
        if "accuracy" in scores.get(name, {}):
            row["accuracy"] = scores[name]["accuracy"]
        rows.append(row)
    return rows


def format_policy_table(rows: list[dict]) -> str:
    lines = [f"{'policy':<18} {'accuracy':>8} {'agrees w/ full':>14} {'kv slots':>8} {'ms/answer':>9}"]
    for row in rows:
        accuracy = f"{row['accuracy']:.4f}" if "accuracy" in row else "-"
        lines.append(
            f"{row['policy']:<18} {accuracy:>8} {row['agreement_with_full']:>14.4f} {row['kv_slots']:>8} {row['ms_per_answer']:>9.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    from skipvision_jax.config import FastVConfig
    from skipvision_jax.inference import with_model_config
    from skipvision_jax.vqa.harness import EvalSettings, evaluate_questions

    f = flags.FLAGS
    cli.check_model_flags()
    if f.kv_policy != "all" and f.kv_policy not in POLICIES:
        raise ValueError(f"--kv-policy: unknown {f.kv_policy!r}, expected one of {POLICIES + ('all',)}")
    policies = cli.kv_policies_from_flags(POLICIES if f.kv_policy == "all" else (f.kv_policy,))
    # Everything that can be wrong with the input fails before the model loads.
    questions = files.chunk(files.read_questions(f.question_file), f.num_chunks, f.chunk_idx)
    if f.benchmark is not None and f.annotation_file is None:
        raise ValueError("--benchmark: needs --annotation-file")
    benchmark = f.benchmark or "exact"
    annotations = benchmarks.read_annotations(f.annotation_file, benchmark, f.convention) if f.annotation_file else None
    if annotations is not None:
        missing = [
            q.question_id
            for q in questions
            if benchmarks.BENCHMARKS[benchmark].key(q.question_id, q.text) not in annotations
        ]
        if missing:
            raise ValueError(
                f"annotation file: {f.annotation_file} lacks {len(missing)} of the questions (first: {missing[0]!r})"
            )
    model_id = f.model_id or cli.directory_name(f.checkpoint or f.hf_checkpoint)
    loaded = cli.load_model_from_flags()
    if f.fastv_layer:
        fastv = FastVConfig(f.fastv_layer, f.fastv_keep)
        loaded = with_model_config(loaded, lambda cfg: dataclasses.replace(cfg, fastv=fastv))
    categories = {q.question_id: q.category for q in questions}
    asked = {q.key for q in questions}
    answers, scores = {}, {}
    for policy in policies:
        name = policy.name
        path = files.sibling_path(f.answers_file, f"{name}.jsonl") if f.kv_policy == "all" else f.answers_file
        settings = EvalSettings(
            policy,
            f.max_new_tokens,
            f.batch_size,
            model_id,
            f.workers,
            default_budgets=f.kv_policy == "all",
            share_prefix=f.share_prefix,
        )
        summary = evaluate_questions(loaded, questions, f.image_folder, path, settings)
        print(json.dumps({"policy": name, "answers_file": path, **summary}))
        if summary["errors"]:
            print(f"{summary['errors']} questions could not be answered (their lines carry an 'error' field)")
        answers[name] = [a for a in files.read_answers(path) if files.answer_key(a) in asked]
        if annotations is not None:
            scores[name] = benchmarks.score(benchmark, answers[name], annotations, f.convention, categories)
            with open(files.sibling_path(path, "scores.json"), "w") as out:
                json.dump(scores[name], out, indent=2)
            print(json.dumps(scores[name]))
    if f.kv_policy == "all":
        table = policy_table(answers, scores)
        with open(files.sibling_path(f.answers_file, "policies.json"), "w") as out:
            json.dump(table, out, indent=2)
        print(format_policy_table(table))


if __name__ == "__main__":
    cli.run(main, (ValueError, ImageError, CheckpointError))
