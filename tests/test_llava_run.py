"""The front door and the whole LLaVA path on data nobody here made.

Every command of the README and of docs/getting-started.md runs here as the
page writes it, at toy size (a few flags appended) and on temporary paths:
easy-VQA (the `easy-vqa` package) exported by the worked example's
converter, a BPE tokenizer whose small vocabulary puts the image after
40-odd tokens of LLaVA-1.5's system prompt (past every small length
bucket), training, then inference, evaluation, the pictures, serving and
export. After training the training data and the tokenizer are moved away:
everything after reads the run alone. lmms-eval scores the served model as
eval.py does."""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from skipvision_jax.generate import Sampling
from skipvision_jax.inference import answer, load_hf, load_trained
from skipvision_jax.kvcache import KVPolicy
from skipvision_jax.vqa import files
from skipvision_jax.vqa.benchmarks import read_annotations, score
from skipvision_jax.vqa.harness import EvalSettings, evaluate_questions
from tests.helpers import REPO, free_port
from tests.test_serve import Server

PAGES = ("README.md", os.path.join("docs", "getting-started.md"))
# Appended to the documented commands: toy sizes, the same path otherwise.
TOY = {
    "skipvision_jax.data.easy_vqa": "--train-images 24 --val-images 4 --test-images 3 --tokenizer-vocab 400",
    "train.py": " ".join(
        f"--config.{k}={v}"
        for k, v in {
            "model.vision.width": 32,
            "model.vision.depth": 1,
            "model.vision.num_heads": 2,
            "model.vision.mlp_dim": 32,
            "model.decoder.width": 32,
            "model.decoder.num_layers": 2,
            "model.decoder.mlp_dim": 64,
            "train.batch_size": 8,
            "train.steps": 30,
            "train.log_every": 10,
            "train.eval_every": 30,
            "train.eval_batches": 1,
            "train.checkpoint_every": 30,
            "optimizer.warmup_steps": 5,
            "optimizer.lr": 3e-3,
        }.items()
    ),
    "infer.py": "--max-new-tokens 4",
    "eval.py": "--max-new-tokens 4 --batch-size 8",
    "serve.py": "--max-new-tokens 4 --max-batch 4",
    "export.py": "",
    "skipvision_jax.visualize": "",
}
EASY_TOY = {"model.vision.patch_size": 16, "model.layout.num_kept": 4, "model.layout.merge_to": 6}
DEFAULT_TOY = {"data.train_size": 64, "data.val_size": 8}


def documented_commands() -> list[str]:
    """The `python ...` commands of the pages' code blocks, in order, once each
    (continuation lines joined; `pip install ... &&` left to the environment)."""
    commands = []
    for page in PAGES:
        text = open(os.path.join(REPO, page)).read().replace("\\\n", " ")
        for line in text.splitlines():
            for part in line.strip().split(" && "):
                part = " ".join(part.split())
                if part.startswith("python ") and "pytest" not in part and part not in commands:
                    commands.append(part)
    return commands


def test_the_readme_has_two_set_up_commands_and_ci_runs_the_second():
    readme = open(os.path.join(REPO, "README.md")).read()
    setup = readme.split("## Set-up")[1].split("\n## ")[0]
    commands = [line.strip() for line in setup.splitlines() if line.startswith("    ")]
    assert len(commands) == 2 and commands[0].startswith("pip install -e . && python train.py")
    ci = open(os.path.join(REPO, ".ci", "run")).read()
    assert commands[1].replace("pip install ", "pip install -q ") in ci


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    from tests.hf_tiny import make_hf_llava, write_image

    root = tmp_path_factory.mktemp("front_door")
    hf = str(root / "llava-1.5-7b-hf")
    make_hf_llava(hf, "gqa")
    return {"root": str(root), "hf": hf, "image": write_image(str(root / "picture.png"))}


def localized(command: str, paths: dict) -> list[str]:
    """The documented command on temporary paths, at toy size, as argv."""
    root = paths["root"]
    command = re.sub(r"\bdata/easy_vqa\b", f"{root}/data/easy_vqa", command)
    command = re.sub(r"\bruns/", f"{root}/runs/", command)
    command = command.replace("llava-1.5-7b-hf", paths["hf"]).replace(" IMG ", f" {paths['image']} ")
    command = re.sub(r"--port \d+", f"--port {free_port()}", command)
    command = command.replace("--out map.png", f"--out {root}/map.png")
    script = next(key for key in TOY if key in command.split()[1:3])
    extra = TOY[script]
    if script == "train.py":
        toy = EASY_TOY if "easy_vqa" in command else DEFAULT_TOY
        extra += " " + " ".join(f"--config.{k}={v}" for k, v in toy.items())
    argv = shlex.split(command + " " + extra)
    return [sys.executable, *argv[1:]]


def run(argv: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(argv)}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def trained(paths):
    """The documented export and training commands run; then the training data and the tokenizer move away."""
    commands = documented_commands()
    for command in commands:
        if "--export" in command or command.startswith("python train.py"):
            run(localized(command, paths))
    data = os.path.join(paths["root"], "data", "easy_vqa")
    moved = os.path.join(paths["root"], "moved")
    os.makedirs(moved)
    for name in ("train.json", "val.json", "tokenizer.json", os.path.join("images", "train")):
        shutil.move(os.path.join(data, name), moved)
    return {"data": data, "run": os.path.join(paths["root"], "runs", "easy_vqa")}


def test_the_run_records_what_follows_from_the_data(trained):
    config = json.load(open(os.path.join(trained["run"], "config.json")))
    assert config["model"]["layout"]["image_offset"] >= 40  # after the system prompt, in this tokenizer
    assert config["model"]["decoder"]["vocab_size"] == 400
    assert config["data"]["text_len"] > config["model"]["layout"]["image_offset"] + 10
    assert config["data"]["template"] == "vicuna_v1" and os.path.exists(os.path.join(trained["run"], "tokenizer.json"))


def test_every_documented_command_runs_from_the_run_alone(trained, paths):
    """infer.py, eval.py, the pictures, export.py, an HF directory; serve.py answering one request."""
    ran = set()
    for command in documented_commands():
        if "--export" in command or command.startswith("python train.py"):
            continue
        argv = localized(command, paths)
        if command.startswith("python serve.py"):
            port = argv[argv.index("--port") + 1]
            server = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            try:
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline and server.poll() is None:
                    try:
                        if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                            break
                    except httpx.TransportError:
                        time.sleep(0.5)
                assert server.poll() is None, server.stderr.read()[-2000:]
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()
                assert models["data"][0]["id"] == "easy_vqa"
            finally:
                server.kill()
                server.wait(30)
        else:
            run(argv)
        ran.add(argv[1].split("/")[-1] if argv[1] != "-m" else argv[2])
    assert {"infer.py", "eval.py", "serve.py", "export.py", "skipvision_jax.visualize"} <= ran
    scores = json.load(open(os.path.join(trained["run"], "answers.scores.json")))
    assert set(scores["by_category"]) <= {"shape", "color", "yes/no"} and 0 <= scores["accuracy"] <= 1
    assert glob.glob(os.path.join(trained["run"] + "_llava", "*.safetensors"))


def test_the_llava_export_answers_as_the_run_under_its_template(trained):
    """The export read back (LLaVA's layout), prompted by LLaVA's --conv-mode vicuna_v1, answers as the run."""
    question = files.read_questions(os.path.join(trained["data"], "questions.jsonl"))[0]
    image = os.path.join(trained["data"], "images", question.image)
    answers = []
    for loaded in (load_trained(trained["run"]), load_hf(trained["run"] + "_llava", template="vicuna_v1")):
        batch, model_cfg = loaded.make_batch(image, question.text)
        answers.append(answer(loaded, batch, model_cfg, KVPolicy.of("full"), 4, Sampling(), repeats=1)["tokens"])
    assert answers[0] == answers[1]


def test_conv_mode_prompts_in_another_template(trained):
    loaded = load_trained(trained["run"], template="plain")
    image = glob.glob(os.path.join(trained["data"], "images", "test", "*.png"))[0]
    batch, model_cfg = loaded.make_batch(image, "What?")
    assert model_cfg.layout.image_offset == 1 and loaded.length_buckets()[0] == 8
    assert batch["input_ids"][0, 0] == loaded.text.bos_id


def test_lmms_eval_scores_the_served_run_as_eval(trained, tmp_path):
    questions = files.read_questions(os.path.join(trained["data"], "questions.jsonl"))
    expected_file = str(tmp_path / "eval.jsonl")
    settings = EvalSettings(KVPolicy.of("full"), 4, progress=False)
    evaluate_questions(
        load_trained(trained["run"]), questions, os.path.join(trained["data"], "images"), expected_file, settings
    )
    expected = {a["question_id"]: a["text"] for a in files.read_answers(expected_file)}
    server = Server(f"--checkpoint={trained['run']}", "--max-batch=8", "--max-new-tokens=4")
    try:
        for q in questions[:4]:
            reply = server.ask(os.path.join(trained["data"], "images", q.image), q.text, max_tokens=4)
            assert reply.choices[0].message.content == expected[q.question_id]
        env = {**os.environ, "OPENAI_API_KEY": "unused", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "lmms_eval",
                "--model=openai_compatible",
                f"--model_args=model_version={server.model_id()},base_url={server.url}/v1",
                "--tasks=skipvision_embedded",
                f"--include_path={os.path.join(REPO, 'integrations', 'lmms_eval')}",
                "--batch_size=1",
                f"--output_path={tmp_path / 'out'}",
            ],
            cwd=trained["data"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = glob.glob(str(tmp_path / "out" / "**" / "*results.json"), recursive=True)
    reported = json.load(open(results_file))["results"]["skipvision_embedded"]["exact_match,none"]
    truth = read_annotations(os.path.join(trained["data"], "annotations.jsonl"), "exact")
    assert reported == pytest.approx(score("exact", files.read_answers(expected_file), truth)["accuracy"])
