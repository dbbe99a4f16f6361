"""Figures and the tables of the docs' results page, regenerated from bench/results/.

For each device folder in bench/results/ it draws, from whichever results
are there:

    quality_cost.png     embedded task: val exact match against forward FLOPs
                         (full / merge / skip) and against KV slots (policies)
    decode_latency.png   per-token decode and its roofline against KV slots, every policy
    skip_ffn_shares.png  realized against FLOP-ideal saving, by skipped share
    tradeoff.png         detail task (bench/tradeoff.py): exact match against
                         forward FLOPs per variant, with the Pareto front, and
                         against KV slots per policy on the skip model

into docs/results/<device>/, and rewrites the block between
`<!-- results:begin -->` and `<!-- results:end -->` of docs/results.md. No
number in that block is typed by hand.

    python bench/report.py            # figures + the results page's block
    python bench/report.py --check    # CI: is that block up to date?
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)  # configs/ is not an installed package

from configs.default import get_config  # noqa: E402
from skipvision_jax.data.synthetic import SyntheticVQA  # noqa: E402
from skipvision_jax.experiment import sizing_model_config  # noqa: E402
from skipvision_jax.flops import forward_flops  # noqa: E402


def pyplot():
    """matplotlib (the `bench` extra), imported only when drawing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
# The embedded task's runs before issue 28 (7000 steps of 64, ToMe's merge, every
# question kind equally often); their commands spell those settings out.
EARLIER_DEFAULT = (
    "--config.train.steps=7000 --config.train.batch_size=64 --config.data.train_kind_weights=()"
    " --config.model.layout.merge_method=tome"
)
TRAIN_RUNS = {  # name -> (metrics file, the command that produced it, model overrides, steps x batch)
    "full": (
        "train_full.metrics.jsonl",
        "python train.py --workdir runs/full --config.model.skip.enabled=False --config.model.layout.merge_to=16"
        f" --config.model.layout.summary_tokens=False {EARLIER_DEFAULT}",
        {"skip": {"enabled": False}, "layout": {"merge_to": 16, "summary_tokens": False, "merge_method": "tome"}},
        "7000 x 64",
    ),
    "merge": (
        "train_noskip.metrics.jsonl",
        f"python train.py --workdir runs/noskip --config.model.skip.enabled=False {EARLIER_DEFAULT}",
        {"skip": {"enabled": False}, "layout": {"merge_method": "tome"}},
        "7000 x 64",
    ),
    "skip": ("train_default.metrics.jsonl", "python train.py --workdir runs/default", {}, "4000 x 32"),
}


def load(folder: str, name: str):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return None
    if name.endswith(".jsonl"):
        return [json.loads(line) for line in open(path) if line.strip()]
    return json.load(open(path))


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A header, its separator and one line per row of already formatted cells."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def embedded_task_rows(folder: str) -> list[dict]:
    """Final val exact match and forward GFLOPs per example of the embedded-task runs."""
    rows = []
    for name, (file, command, overrides, schedule) in TRAIN_RUNS.items():
        metrics = load(folder, file)
        if not metrics:
            continue
        evals = [m for m in metrics if "val_exact_match" in m]
        experiment = get_config()
        for section, values in overrides.items():
            experiment.model[section].update(values)
        cfg = sizing_model_config(experiment)
        flops = sum(forward_flops(cfg, SyntheticVQA.text_len, 1).values())
        rows.append(
            {
                "name": name,
                "schedule": schedule,
                "elapsed_s": metrics[-1].get("elapsed_s"),
                "per_kind": {
                    k.removeprefix("val_exact_match_"): v
                    for k, v in evals[-1].items()
                    if k.startswith("val_exact_match_")
                },
                "exact_match": evals[-1]["val_exact_match"],
                "chance": evals[-1].get("val_chance_exact_match"),
                "gflops": flops / 1e9,
                "command": command,
            }
        )
    return rows


def figure_folder(folder: str) -> str:
    """Where a device's figures go: beside the results page, which shows them."""
    return os.path.join(REPO, "docs", "results", os.path.basename(folder))


def save_figure(fig, folder: str, name: str) -> None:
    fig.tight_layout()
    os.makedirs(figure_folder(folder), exist_ok=True)
    fig.savefig(os.path.join(figure_folder(folder), name), dpi=100)
    pyplot().close(fig)


def plot_quality_cost(folder: str, rows: list[dict], kv: dict | None) -> None:
    if not rows and not kv:
        return
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for row in rows:
        axes[0].scatter(row["gflops"], 100 * row["exact_match"], s=40)
        axes[0].annotate(
            row["name"], (row["gflops"], 100 * row["exact_match"]), textcoords="offset points", xytext=(5, 5)
        )
    axes[0].set(
        xlabel="forward GFLOPs per example",
        ylabel="val exact match (%)",
        title="Embedded task: visual tokens",
        ylim=(0, 100),
    )
    chance = next((r["chance"] for r in rows if r.get("chance")), None)
    for ax in axes:
        if chance:
            ax.axhline(100 * chance, linestyle="--", color="gray", label="chance")
    if kv:
        for policy in ("h2o", "snapkv", "streaming"):
            points = sorted(
                (v["kv_slots"], 100 * v["exact_match"]) for k, v in kv["results"].items() if k.startswith(policy + "@")
            )
            points.append((kv["results"]["full"]["kv_slots"], 100 * kv["results"]["full"]["exact_match"]))
            axes[1].plot(*zip(*sorted(points)), marker="o", label=policy)
        sv = kv["results"]["skip_vision"]
        axes[1].scatter(
            sv["kv_slots"], 100 * sv["exact_match"], marker="*", s=150, color="black", label="skip_vision", zorder=3
        )
        axes[1].set(
            xlabel="KV slots per layer",
            ylabel="val exact match (%)",
            title="Embedded task: KV cache budget",
            ylim=(0, 100),
        )
        axes[1].legend()
    save_figure(fig, folder, "quality_cost.png")


def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The (cost, quality, name) points that no cheaper-or-equal point beats or ties on quality."""
    front, best = [], float("-inf")
    for point in sorted(points, key=lambda p: (p[0], -p[1])):
        if point[1] > best:
            front.append(point)
            best = point[1]
    return front


def plot_tradeoff(folder: str, tradeoff: dict | None) -> None:
    if not tradeoff:
        return
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.6))
    points = [(v["forward_gflops"], 100 * v["exact_match"], k) for k, v in tradeoff["variants"].items()]
    markers = "osD^vP*Xhp<>"  # variants share costs and accuracies: a legend, not labels that overlap
    for (gflops, accuracy, name), marker in zip(points, markers * len(points)):
        axes[0].scatter(gflops, accuracy, s=45, marker=marker, label=name, alpha=0.8)
    front = pareto_front(points)
    axes[0].plot([p[0] for p in front], [p[1] for p in front], linestyle="--", color="black", label="Pareto front")
    axes[0].set(xlabel="forward GFLOPs per example", ylabel="val exact match (%)", title="Detail task: visual tokens")
    for ax in axes:
        ax.axhline(100 * tradeoff["chance_exact_match"], linestyle=":", color="gray", label="chance")
        ax.set_ylim(0, 100)
    axes[0].legend(fontsize=7, loc="center right")
    kv = tradeoff.get("kv")
    if kv:
        full, sv = kv["full"], kv["skip_vision"]
        for ax, mode in zip(axes[1:], ("budget", "ratio")):
            for policy in kv_policy_names(kv):
                curve = sorted(
                    (100 * v["fraction"], 100 * v["exact_match"])
                    for v in kv.values()
                    if v.get("policy") == policy and v.get("mode") == mode
                )
                ax.plot(*zip(*curve, (100, 100 * full["exact_match"])), marker="o", label=policy)
            ax.scatter(
                100 * sv["kv_slots"] / full["kv_slots"],
                100 * sv["exact_match"],
                marker="*",
                s=150,
                color="black",
                label="skip_vision",
                zorder=3,
            )
        for policy in ("h2o", "snapkv", "streaming"):
            before = sorted(
                (100 * v["fraction"], 100 * v["exact_match"])
                for k, v in (tradeoff.get("kv_per_layer") or {}).items()
                if k.startswith(policy + "@")
            )
            if before:
                axes[1].plot(*zip(*before), linestyle=":", color="gray", alpha=0.7)
        axes[1].set(
            xlabel="KV budget (% of the full cache's slots)",
            ylabel="val exact match (%)",
            title=f"KV budget, evicting ({tradeoff['kv_variant']} model; dotted: per-layer before)",
        )
        axes[2].set(
            xlabel="prompt keys kept (%, = 1 - compression ratio)",
            ylabel="val exact match (%)",
            title=f"kvpress compression ratio ({tradeoff['kv_variant']} model)",
        )
        axes[1].legend(fontsize=7)
    save_figure(fig, folder, "tradeoff.png")


def kv_policy_names(kv: dict) -> list[str]:
    """The swept policies, in the sweep's order."""
    return list(dict.fromkeys(v["policy"] for v in kv.values() if "policy" in v))


def kv_sweep_lines(tradeoff: dict) -> list[str]:
    """Exact match (and answer-token agreement with the full cache) of every
    policy in both budget modes, beside the per-layer sweep it replaced."""
    kv, before = tradeoff["kv"], tradeoff.get("kv_per_layer") or {}
    fractions = sorted({v["fraction"] for v in kv.values() if "fraction" in v})
    cell = lambda v: f"{pct(v['exact_match'])} ({pct(v['token_agreement_with_full'])})" if v else "-"
    slots = ", ".join(
        f"{100 * f:g}%: {next(v['kv_slots'] for v in kv.values() if v.get('fraction') == f and v['mode'] == 'budget')}"
        for f in fractions
    )
    lines = [
        "",
        f"KV policies on the {tradeoff['kv_variant']} model, selecting per KV head: exact match (answer tokens equal"
        f" to the full cache's at their place). `full`: {kv['full']['kv_slots']} slots, {pct(kv['full']['exact_match'])};"
        f" `skip_vision`: {kv['skip_vision']['kv_slots']} slots, {pct(kv['skip_vision']['exact_match'])}. Budget"
        f" columns: a buffer of that share of the full cache ({slots} slots), evicting while decoding; ratio columns:"
        " kvpress's compression ratio, the prompt keeps that share of its keys and decoding appends; the last"
        " column: the per-layer selection this replaced, at the same budgets.",
        "",
    ]
    header = (
        ["policy"]
        + [f"budget {100 * f:g}%" for f in fractions]
        + [f"ratio {1 - f:g}" for f in fractions]
        + ["per layer, budget " + " / ".join(f"{100 * f:g}" for f in fractions) + "% (before)"]
    )
    by_mode = lambda policy, mode, f: next(
        (v for v in kv.values() if v.get("policy") == policy and v["mode"] == mode and v["fraction"] == f), None
    )
    rows = []
    for policy in kv_policy_names(kv):
        previous = [before.get(f"{policy}@{f:g}") for f in fractions]
        rows.append(
            [policy]
            + [cell(by_mode(policy, "budget", f)) for f in fractions]
            + [cell(by_mode(policy, "ratio", f)) for f in fractions]
            + [" / ".join(pct(v["exact_match"]) for v in previous) if all(previous) else "-"]
        )
    return lines + markdown_table(header, rows)


def tradeoff_lines(tradeoff: dict) -> list[str]:
    lines = [
        f"**Quality and cost on the detail task** (`python bench/tradeoff.py`: every variant trained {tradeoff['steps']} steps"
        f" x 64, same seed; {tradeoff['questions']} val questions, greedy; chance {pct(tradeoff['chance_exact_match'])}):",
        "",
    ]
    lines += markdown_table(
        [
            "variant",
            "exact match",
            "answer-token accuracy",
            "forward GFLOPs / example",
            "answer ms, batch 1",
            "answer ms, batch 16",
            "KV slots",
            "train s",
        ],
        [
            [
                k,
                pct(v["exact_match"]),
                pct(v["token_accuracy"]),
                f"{v['forward_gflops']:.3f}",
                f"{v['latency_ms_batch1']:.1f}",
                f"{v['latency_ms_batch16']:.1f}",
                str(v["kv_slots"]),
                str(round(v["train_s"])),
            ]
            for k, v in tradeoff["variants"].items()
        ],
    )
    if tradeoff.get("kv"):
        lines += kv_sweep_lines(tradeoff)
    return lines + [""]


def plot_decode(folder: str, decode: dict | None) -> None:
    if not decode:
        return
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = [
        (decode["llava576_batch1"]["skip_model_policies"], "576 tokens, batch 1"),
        (decode["layout1296_batch"]["policies"], f"1296 tokens, batch {decode['layout1296_batch']['batch']}"),
    ]
    for ax, (rows, title) in zip(axes, panels):
        for policy in sorted({r["policy"] for r in rows}):
            points = sorted(
                (r["kv_slots"], r["decode_ms_per_token"], r["roofline_ms_per_token"])
                for r in rows
                if r["policy"] == policy
            )
            slots, measured, roofline = zip(*points)
            line = ax.plot(slots, measured, marker="o", label=policy)[0]
            ax.plot(slots, roofline, linestyle=":", color=line.get_color())
        ax.set(xlabel="KV slots per layer", ylabel="decode ms / token (dotted: roofline)", title=title)
        ax.legend(fontsize=8)
    save_figure(fig, folder, "decode_latency.png")


def plot_shares(folder: str, skip_ffn: dict | None) -> None:
    if not skip_ffn or "shares" not in skip_ffn:
        return
    shares = skip_ffn["shares"]
    names = list(shares)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(names, [100 * shares[n]["ideal_saving"] for n in names], marker="o", label="FLOP-ideal")
    ax.plot(names, [100 * shares[n]["realized_saving"] for n in names], marker="s", label="realized (step time)")
    ax.set(xlabel="visual tokens skipping the FFN", ylabel="saving vs none skipped (%)", title="Skip-FFN train step")
    ax.legend()
    save_figure(fig, folder, "skip_ffn_shares.png")


def section(folder: str, draw: bool) -> list[str]:
    device = os.path.basename(folder)
    lines = [f"### {device}", ""]
    rows = embedded_task_rows(folder)
    kv, decode, skip_ffn, vs_hf, throughput, tradeoff = (
        load(folder, f)
        for f in (
            "kv_agreement.json",
            "decode.json",
            "skip_ffn.json",
            "vs_transformers.json",
            "eval_throughput.json",
            "tradeoff.json",
        )
    )
    per_image = [
        study
        for study in (load(folder, f"eval_throughput_per_image{geometry}.json") for geometry in ("", "_llava"))
        if study
    ]
    serving = [
        study
        for study in (
            load(folder, f"serve_load{n}.json")
            for n in (
                "",
                "_per_image",
                "_per_image_unshared",
                "_per_image_llava",
                "_per_image_llava_unshared",
            )
        )
        if study
    ]
    if draw:
        plot_quality_cost(folder, rows, kv)
        plot_tradeoff(folder, tradeoff)
        plot_decode(folder, decode)
        plot_shares(folder, skip_ffn)
    figures = sorted(glob.glob(os.path.join(figure_folder(folder), "*.png")))
    if rows:
        lines += [
            "**Embedded task** (`train_*.metrics.jsonl`), validation exact match:",
            "",
        ]
        lines += markdown_table(
            [
                "visual tokens",
                "steps x batch",
                "all",
                *rows[0]["per_kind"],
                "train wall s",
                "forward GFLOPs / example",
                "command",
            ],
            [
                [
                    r["name"],
                    r["schedule"],
                    pct(r["exact_match"]),
                    *(pct(v) for v in r["per_kind"].values()),
                    "-" if r["elapsed_s"] is None else str(round(r["elapsed_s"])),
                    f"{r['gflops']:.3f}",
                    f"`{r['command']}`",
                ]
                for r in rows
            ],
        )
        lines.append("")
    if kv:
        lines += [
            f"**KV policies on the trained model** (`python bench/kv_agreement.py --checkpoint runs/default`, {kv['questions']} val questions):",
            "",
        ]
        lines += markdown_table(
            ["policy", "slots", "agreement with full", "exact match"],
            [
                [k, str(v["kv_slots"]), pct(v["agreement_with_full"]), pct(v["exact_match"])]
                for k, v in kv["results"].items()
            ],
        )
        lines.append("")
    if tradeoff:
        lines += tradeoff_lines(tradeoff)
    if skip_ffn and "shares" in skip_ffn:
        g = skip_ffn["geometry"]
        lines += [
            f"**Skip-FFN train step** (`python bench/skip_ffn.py`, {skip_ffn['dtype']}, batch {g['batch']}, {g['visual_tokens']} visual + {g['text_tokens']} text tokens; target: realized >= 90% of the FLOP-ideal saving):",
            "",
            "| variant | compiled GFLOPs | step ms | ideal saving | realized saving | realized / ideal | MFU |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for group in ("shares", "layout"):
            for name, row in skip_ffn[group].items():
                ratio = "" if row["realized_over_ideal"] is None else pct(row["realized_over_ideal"])
                mfu = "" if row["mfu"] is None else pct(row["mfu"])
                label = f"{name} skipped" if group == "shares" else f"paper layout: {name}"
                lines.append(
                    f"| {label} | {row['flops'] / 1e9:.1f} | {row['ms']:.1f} | {pct(row['ideal_saving'])} | {pct(row['realized_saving'])} | {ratio} | {mfu} |"
                )
        lines.append("")
    if decode:
        a, p, b = decode["llava576_batch1"], decode["layout1296_prefill_flops"], decode["layout1296_batch"]
        lines += [
            f"**Decoding** (`python bench/decode.py`; measured read bandwidth {decode['read_bandwidth_gb_s']:.1f} GB/s and matmul {decode['matmul_gflops']:.0f} GFLOP/s; roofline = the longer of (weights + KV bytes read) / bandwidth and step FLOPs / matmul rate):",
            "",
            "| measure | value | target |",
            "| --- | --- | --- |",
            f"| answer latency, 576 tokens, batch 1, prefill + {decode['new_tokens']} tokens: full path / skip path | {a['full_path']['answer_ms']:.0f} ms / {a['skip_path']['answer_ms']:.0f} ms ({pct(a['answer_latency_saving'])} lower) | >= 45% lower |",
            f"| prefill FLOPs, 1296 tokens: Skip-FFN / Skip-FFN + merge 1024 -> 256 | {pct(p['saving_skip'])} / {pct(p['saving_skip_merge256'])} lower | >= 70% lower |",
            f"| per-token decode, 1296 tokens, batch {b['batch']}: skip_vision vs full | {pct(b['skip_vision_decode_saving'])} faster | >= 35% |",
            f"| worst policy, measured / roofline, batch {b['batch']} | {b['worst_measured_over_roofline']:.2f}x | <= 1.25x |",
            f"| weight products alone / weight roofline, batch 1 / batch {b['batch']} | {a['matvec_floor_ms_per_token'] / (1000 * a['weight_bytes_read_per_token'] / (decode['read_bandwidth_gb_s'] * 1e9)):.2f}x / {b['matvec_floor_ms_per_token'] / (1000 * b['weight_bytes_read_per_token'] / (decode['read_bandwidth_gb_s'] * 1e9)):.2f}x | (the backend's floor) |",
            "",
            "| policy (576, batch 1, skip model) | budget | KV KiB | prefill ms | decode ms / token | roofline ms | measured / roofline |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in (
            [a["full_path"] | {"policy": "full path (plain model)"}]
            + a["skip_model_policies"]
            + [r | {"policy": f"{r['policy']} (1296, batch {b['batch']})"} for r in b["policies"]]
        ):
            prefill = "-" if r["prefill_ms"] is None else f"{r['prefill_ms']:.1f}"
            lines.append(
                f"| {r['policy']} | {r['budget'] or r['kv_slots']} | {r['kv_bytes'] / 1024:.0f} | {prefill} | {r['decode_ms_per_token']:.2f} | {r['roofline_ms_per_token']:.2f} | {r['measured_over_roofline']:.2f}x |"
            )
        lines.append("")
    if vs_hf and "ours" in vs_hf and "error" not in vs_hf["ours"]:
        lines += [
            "**Against transformers** (`python bench/vs_transformers.py`, same imported weights, batch 1, fp32, transformers' default sdpa attention; `hf_eager`: `generate` with its dynamic cache, `hf_static`: with a static cache; targets: >= 2x prefill speed, >= 1.5x decode tokens/s against `hf_eager`):",
            "",
            "| runner | prefill ms | decode ms / token | peak RSS MiB | same greedy tokens |",
            "| --- | --- | --- | --- | --- |",
        ]
        for kind in ("ours", "hf_eager", "hf_static"):
            row = vs_hf.get(kind, {})
            if "error" in row or not row:
                lines.append(f"| {kind} | failed: {row.get('error', 'missing')} | | | |")
                continue
            same = "-" if kind == "ours" else str(row["same_tokens_as_ours"])
            lines.append(
                f"| {kind} | {row['prefill_ms']:.1f} | {row['decode_ms_per_token']:.2f} | {row['peak_rss_bytes'] / 2**20:.0f} | {same} |"
            )
        ratios = [
            f"{k.replace('_', ' ')}: {v:.2f}x"
            for k, v in vs_hf.items()
            if k.startswith(("prefill_speedup", "decode_tokens_per_s_ratio"))
        ]
        lines += ["", "Ratios (theirs / ours time): " + "; ".join(ratios) + ".", ""]
        if vs_hf.get("presses", {}).get("rows"):
            lines += press_race_lines(vs_hf["presses"])
    if throughput:
        lines += [
            f"**eval.py throughput** (`python bench/eval_throughput.py --checkpoint {throughput['checkpoint']}`, {throughput['questions']} exported val questions, `{throughput['policy']}`; compilation apart; target: the largest batch >= 5x the questions/s of batch 1):",
            "",
        ]
        lines += markdown_table(
            ["batch", "run", "questions/s", "warm-up s (compile)", "answering s", "exact match"],
            [
                [
                    str(r["batch_size"]),
                    str(r["repeat"] + 1),
                    f"{r['questions_per_s']:.1f}",
                    f"{r['warmup_s']:.1f}",
                    f"{r['answer_s']:.2f}",
                    pct(r["exact_match"]),
                ]
                for r in throughput["runs"]
            ],
        )
        if "speedup_largest_over_smallest" in throughput:
            lines += [
                "",
                f"Median questions/s, largest over smallest batch: {throughput['speedup_largest_over_smallest']:.2f}x.",
            ]
        lines.append("")
    for study in per_image:
        lines += per_image_lines(study)
    for load_study in serving:
        lines += serving_lines(load_study)
    seeds, easy_vqa, real_size = (
        load(folder, f) for f in ("default_seeds.json", "easy_vqa_study.json", "real_size.json")
    )
    if seeds:
        lines += default_seeds_lines(seeds)
    if easy_vqa:
        lines += easy_vqa_lines(easy_vqa)
    # the full size, else the runs with fewer layers, each under its own count
    reduced = [] if real_size else sorted(glob.glob(os.path.join(folder, "real_size_*layers.json")))
    for study in [real_size] if real_size else [load(folder, os.path.basename(p)) for p in reduced]:
        lines += real_size_lines(study)
    lines += [f"![{os.path.basename(p)}](results/{device}/{os.path.basename(p)})" for p in figures]
    return lines + [""]


SEED_KINDS = ("colour", "shape", "count", "position")


def default_seeds_lines(seeds: dict) -> list[str]:
    """The main job over seeds x XLA threads (bench/default_seeds.py)."""
    runs = seeds["runs"]
    lines = [
        "#### The main job over seeds and threads",
        "",
        "`python bench/default_seeds.py` (`python train.py --workdir RUN --config.train.seed=S --config.data.seed=S`,"
        " 4,000 steps; one thread: two runs side by side, one per core; two threads: alone), validation exact match:",
        "",
    ]
    lines += markdown_table(
        ["seed", "XLA threads", "all", *SEED_KINDS, "wall s"],
        [
            [str(r["seed"]), str(r["threads"]), pct(r["all"]), *(pct(r[k]) for k in SEED_KINDS), f"{r['wall_s']:.0f}"]
            for r in runs
        ],
    )
    lines += [""]
    lines += markdown_table(
        ["over the runs", "all", *SEED_KINDS, "wall s"],
        [
            [
                name,
                *(pct(f([r[k] for r in runs])) for k in ("all", *SEED_KINDS)),
                f"{f([r['wall_s'] for r in runs]):.0f}",
            ]
            for name, f in (("minimum", min), ("median", statistics.median))
        ],
    )
    two = [r["wall_s"] for r in runs if r["threads"] == 2]
    lines += [
        "",
        f"Worst run's worst kind: {pct(seeds['worst_kind'])}. Two-thread wall times {min(two):.0f}-{max(two):.0f} s.",
        "",
    ]
    return lines


def easy_vqa_lines(study: dict) -> list[str]:
    """The study on easy-VQA's test split (bench/easy_vqa_study.py)."""
    variants = study["variants"]
    types = sorted({t for v in variants.values() for t in v["by_type"]})
    lines = [
        "#### easy-VQA",
        "",
        f"`python bench/easy_vqa_study.py` ({study['data']}, {next(iter(variants.values()))['questions']} questions,"
        " greedy; every variant trained with configs/easy_vqa.py's seed, steps and data), exact match:",
        "",
    ]
    lines += markdown_table(
        ["variant", "all", *types, "forward GFLOPs / question", "training s", "steps"],
        [
            [
                name,
                pct(v["test_exact_match"]),
                *(pct(v["by_type"].get(t, float("nan"))) for t in types),
                f"{v['forward_gflops']:.3f}",
                f"{v['train_s']:.0f}",
                str(v["steps"]),
            ]
            for name, v in variants.items()
        ],
    )
    return lines + [""]


def real_size_lines(real: dict) -> list[str]:
    """LLaVA-1.5-7B and LLaMA-3-8B + CLIP-L/336 at full size (bench/real_size.py)."""
    lines = [
        "#### Real size" if real["layers"] == "all" else f"#### Real widths, {real['layers']} decoder layers",
        "",
        f"`python bench/real_size.py{'' if real['layers'] == 'all' else ' --layers ' + str(real['layers'])}{' --batches ' + real['batches'] if real.get('batches', '1,4') != '1,4' else ''}`"
        f" (random bf16 weights, {real['layers']} decoder layers, prefill of 576 visual + 64"
        f" text tokens, 32 decoded tokens, batch {real.get('batches', '1,4').replace(',', ' and ')};"
        " every time one run after compiling; transformers: one `generate` timed token by token):",
        "",
    ]
    rows = []
    for name, row in real["models"].items():
        ours, back = row["ours_hf_layout"], row["ours_llava_layout"]
        for layout, load_row in (("transformers'", ours), ("LLaVA's", back)):
            rows.append(
                [
                    name,
                    layout,
                    f"{load_row['param_bytes'] / 1e9:.2f}",
                    f"{load_row['load_s']:.0f}",
                    f"{load_row['load_gb_s']:.2f} / {load_row['read_gb_s']:.2f}",
                    f"{load_row['peak_rss_after_load_gb']:.1f} / {load_row['rss_limit_gb']:.1f}",
                ]
            )
    lines += markdown_table(
        ["model", "layout read", "param GB (bf16)", "load s", "load / file read GB/s", "peak RSS / limit GB"], rows
    )
    lines += [""]
    rows = []
    for name, row in real["models"].items():
        ours = row["ours_hf_layout"]
        for r in ours["plain"]:
            rows.append(
                [
                    name,
                    "ours",
                    str(r["batch"]),
                    f"{r['prefill_ms'] / 1000:.1f}",
                    f"{r['decode_ms_per_token']:.0f}",
                    f"{r['roofline_ms_per_token']:.0f}",
                    f"{r['over_roofline']:.2f}",
                ]
            )
        if "transformers" in row:
            peer = row["transformers"]
            rows.append(
                [
                    name,
                    "transformers bf16",
                    "1",
                    f"{peer['prefill_ms'] / 1000:.1f}",
                    f"{peer['decode_ms_per_token']:.0f}",
                    "",
                    "",
                ]
            )
    lines += markdown_table(
        ["model", "", "batch", "prefill s", "decode ms / token", "memory roofline ms / token", "over the roofline"],
        rows,
    )
    lines += [""]
    rows = []
    for name, row in real["models"].items():
        skip, cache = row["ours_hf_layout"]["skip"], row["ours_hf_layout"]["cache_bytes"]
        rows.append(
            [
                name,
                f"{skip['plain_prefill_flops'] / 1e12:.2f} / {skip['prefill_flops'] / 1e12:.2f}",
                f"{skip['prefill_ms'] / 1000:.1f}",
                pct(skip["flop_ideal_saving"]),
                pct(skip["realized_saving"]),
                pct(skip["realized_share"]),
                " / ".join(f"{cache[k] / 1e6:.0f}" for k in ("full", "skip_vision", "snapkv@0.5")),
            ]
        )
    lines += markdown_table(
        [
            "model",
            "prefill TFLOPs plain / skip",
            "skip prefill s (batch 1)",
            "FLOP-ideal saving",
            "realized",
            "share realized",
            "cache MB full / skip_vision / snapkv@0.5",
        ],
        rows,
    )
    return lines + [""]


def press_race_lines(presses: dict) -> list[str]:
    lines = [
        f"**KV presses against transformers + kvpress** (the same command: each press at compression "
        f"{presses['compression']}, ours against `generate` inside kvpress's press context, same knobs; targets: "
        ">= 2x decode tokens/s, prefill >= 1x):",
        "",
    ]
    rows = []
    for r in presses["rows"]:
        if "same_tokens" not in r:
            rows.append([r["press"], "failed: " + str(r.get("ours_error") or r.get("hf_eager_error")), "", "", "", ""])
            continue
        rows.append(
            [
                r["press"],
                f"{r['ours_prefill_ms']:.1f} / {r['hf_eager_prefill_ms']:.1f}",
                f"{r['prefill_speedup']:.2f}x",
                f"{r['ours_decode_ms_per_token']:.2f} / {r['hf_eager_decode_ms_per_token']:.2f}",
                f"{r['decode_tokens_per_s_ratio']:.2f}x",
                str(r["same_tokens"]),
            ]
        )
    header = ["press", "prefill ms, ours / kvpress", "prefill speedup", "decode ms / token, ours / kvpress"]
    lines += markdown_table(header + ["decode tokens/s ratio", "same greedy tokens"], rows)
    return lines + [""]


def per_image_lines(study: dict) -> list[str]:
    llava = study.get("geometry") == "llava"
    where = (
        "random weights at LLaVA-1.5's visual geometry (576 patches, 100 kept + 156 merged, tower 2 x 256) and the CPU "
        "benchmark decoder, the checkpoint's prompts"
        if llava
        else "the trained embedded-task model (a 15-token prefix of a ~30-token prompt)"
    )
    command = f"python bench/eval_throughput.py --checkpoint {study['checkpoint']} --per-image ..." + (
        " --geometry llava" if llava else ""
    )
    lines = [
        f"**eval.py with several questions per image, {where}** (`{command}`, {study['questions']} exported val "
        f"questions, every k consecutive ones on one image, `{study['policy']}`; medians; targets: 4x at 32 per "
        "image, 2.5x at 8):",
        "",
    ]
    lines += markdown_table(
        [
            "questions per image",
            "batch",
            "questions/s, unshared",
            "questions/s, shared",
            "shared / unshared",
            "same answers",
            "prefill ms / batch, unshared -> shared",
            "decode ms / batch",
            "wall ms / batch, unshared",
        ],
        [
            [
                str(r["per_image"]),
                str(r["batch_size"]),
                f"{r['questions_per_s_unshared']:.1f}",
                f"{r['questions_per_s_shared']:.1f}",
                f"{r['speedup']:.2f}x",
                str(r["answers_identical"]),
                f"{r['prefill_ms_unshared']:.1f} -> {r['prefill_ms_shared']:.1f}",
                f"{r['decode_ms']:.1f}",
                f"{r['batch_ms_unshared']:.1f}",
            ]
            for r in study["rows"]
        ],
    )
    return lines + [""]


def serving_lines(serving: dict) -> list[str]:
    per_image = serving.get("per_image", 1)
    flags = (
        f" --per-image {per_image} --prefix-cache-mb {serving['prefix_cache_mb']:g}"
        if "prefix_cache_mb" in serving
        else ""
    )
    ms = lambda r, key: "-" if r.get(key) is None else f"{r[key]:.1f}"
    model, what = f"--checkpoint {serving['checkpoint']}", "the embedded-task model"
    if serving.get("geometry") == "llava":
        model = "--geometry llava --max-tokens 2 --answers model"
        what = "a random transformers LLaVA at bench/vs_transformers.py's geometry (576 image tokens, decoder 512 x 8)"
    lines = [
        f"**serve.py under load, {what}, {per_image} question(s) per image** (`python bench/serve_load.py "
        f"{model}{flags}`, `{serving['policy']}`, --max-batch {serving['max_batch']}, greedy; "
        f"{serving['client']}; device busy: the scheduler's device work over the wall time; TTFT: time to the "
        "first text, TPOT: time per later token, vLLM's (ITL, the gaps between streamed chunks, has no samples "
        "where each answer's text is one chunk); prefix hits / misses: the server's cache; target: concurrency 32 "
        ">= 4x the requests/s of one at a time):",
        "",
    ]
    header = ["answers", "concurrency", "run", "requests/s", "answer tokens/s", "p50 ms", "p99 ms"]
    header += ["TTFT p50 / p99 ms", "TPOT p50 / p99 ms", "ITL p50 / p99 ms", "prefix hits / misses", "device busy"]
    lines += markdown_table(
        header,
        [
            [
                scenario["answers"],
                str(r["concurrency"]),
                str(r["repeat"] + 1),
                f"{r['requests_per_s']:.1f}",
                f"{r['tokens_per_s']:.1f}",
                f"{r['latency_p50_ms']:.1f}",
                f"{r['latency_p99_ms']:.1f}",
                f"{ms(r, 'ttft_p50_ms')} / {ms(r, 'ttft_p99_ms')}",
                f"{ms(r, 'tpot_p50_ms')} / {ms(r, 'tpot_p99_ms')}",
                f"{ms(r, 'itl_p50_ms')} / {ms(r, 'itl_p99_ms')}",
                f"{r.get('prefix_hits', '-')} / {r.get('prefix_misses', '-')}",
                pct(r["device_busy_share"]),
            ]
            for scenario in serving["scenarios"]
            for r in scenario["runs"]
        ],
    )
    speedups = "; ".join(f"{s['answers']}: {s['speedup_highest_over_1']:.2f}x" for s in serving["scenarios"])
    return lines + [
        "",
        f"Median requests/s, highest concurrency over one: {speedups}. "
        f"Compilations after warm-up: {serving['compilations_after_warmup']}.",
        "",
    ]


def scale_section(folder: str) -> list[str]:
    """The real configurations sized on simulated meshes (bench/scale.py)."""
    runs = [json.load(open(path)) for path in sorted(glob.glob(os.path.join(folder, "*.json")))]
    if not runs:
        return []
    runs.sort(key=lambda r: (r["config"], r["devices"]))
    chips = list(runs[0]["train_skip"]["projected"])
    lines = [
        "### Real sizes on simulated meshes",
        "",
        "`python bench/scale.py --config configs/X.py --devices N --mesh 1,N,1` (FSDP over N fake CPU devices, one example per device, "
        f"text {runs[0]['text_len']} tokens): per-device bytes of the compiled train step from `memory_analysis()` (fp32 master weights "
        "and AdamW state of the projector and decoder, bf16 compute, remat, scanned layers), and the step time projected at "
        f"{pct(runs[0]['mfu'])} MFU from the analytic FLOPs (decoder + frozen tower; within "
        f"{max(abs(1 - r['flops_check_2_layers']['analytic_over_compiled']) for r in runs):.1%} of the compiled count of a 2-layer cut).",
        "",
        "| config | devices | variant | sequence | GB / device | fits HBM ("
        + ", ".join(chips)
        + ") | step s on "
        + chips[0]
        + " | tokens/s/chip on "
        + chips[0]
        + " |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        for variant in ("full", "skip"):
            row = run[f"train_{variant}"]
            fits = ", ".join("yes" if row["projected"][chip]["fits_hbm"] else "no" for chip in chips)
            first = row["projected"][chips[0]]
            lines.append(
                f"| {run['config']} | {run['devices']} | {variant} | {row['sequence']} | {row['per_device_bytes']['total'] / 1e9:.1f} | {fits} | {first['step_s']:.3f} | {first['tokens_per_s_per_chip']:,.0f} |"
            )
    lines += [
        "",
        "Decoding (skip model, `skip_vision` cache, bf16 weights, scanned layers), per device: XLA:CPU's"
        " buffer assignment for the fake devices, under the memory-minding scheduler `skipvision_jax` turns"
        " on at import (`compilation.bound_cpu_memory`; until issue 42, under XLA's concurrency-optimized"
        " scheduler, an unrolled prefill held every layer's gathered weights at once, 26-37 GB, and these"
        " scanned programs 1-2 GB more per device).",
        "",
    ]
    lines += markdown_table(
        ["config", "devices", "prefill GB", "decode step GB"],
        [
            [
                r["config"],
                str(r["devices"]),
                f"{r['prefill_skip']['per_device_bytes']['total'] / 1e9:.1f}",
                f"{r['decode_skip']['per_device_bytes']['total'] / 1e9:.2f}",
            ]
            for r in runs
            if "prefill_skip" in r
        ],
    )
    return lines + [""]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--check",
        action="store_true",
        help="draw nothing, write nothing; exit 1 if docs/results.md's block differs from the results",
    )
    args = parser.parse_args()
    scale_folder = os.path.join(HERE, "results", "scale")
    folders = sorted(f for f in glob.glob(os.path.join(HERE, "results", "*")) if os.path.isdir(f) and f != scale_folder)
    block = [BEGIN, "<!-- generated by python bench/report.py from bench/results/; do not edit by hand -->", ""]
    for folder in folders:
        block += section(folder, draw=not args.check)
    block += scale_section(scale_folder)
    block.append(END)
    page_path = os.path.join(REPO, "docs", "results.md")
    page = open(page_path).read()
    if BEGIN not in page or END not in page:
        raise SystemExit(f"error: docs/results.md has no {BEGIN} ... {END} block")
    start, end = page.index(BEGIN), page.index(END) + len(END)
    updated = page[:start] + "\n".join(block) + page[end:]
    if args.check:
        if updated != page:
            raise SystemExit("error: docs/results.md's block is out of date; run python bench/report.py")
        return
    with open(page_path, "w") as f:
        f.write(updated)
    print(json.dumps({"devices": [os.path.basename(f) for f in folders], "page_lines": len(block)}))


if __name__ == "__main__":
    main()
