"""serve.py under load: requests/s, answer tokens/s and latency percentiles at
several concurrencies, against a server it starts on loopback.

    python bench/serve_load.py --checkpoint runs/default [--concurrency 1,8,32] [--requests 512]
        [--repeats 2] [--max-batch 32] [--kv-policy skip_vision] [--answers model,16]
        [--per-image 1] [--prefix-cache-mb 1024] [--name serve_load]

The embedded validation questions (exported in LLaVA's format, images as
base64 data URLs) are sent greedily by `concurrency` clients at once, each
sending its next request when the last is answered (closed loop), over
asyncio with one httpx connection per client (all connected before the
clock starts). Two loads: answers as the model ends them (two tokens on the
embedded task), and 16-token answers (vLLM's ignore_eos, as its serving
benchmark uses), where decoding dominates. With `--per-image K` every K
consecutive questions ask about the first one's image (benchmarks ask ~8-32
questions per image), which the server's prefix cache shares (its hits and
misses are reported; `--prefix-cache-mb 0` turns it off). The server is
warmed at start-up, and one untimed pass at the highest concurrency precedes
the timed ones. Requests stream, as vLLM's serving benchmark sends them:
latency is from sending to the whole answer, time to first token (TTFT) to
the first text, inter-token latency (ITL) the gaps between later text
chunks, time per output token (TPOT, vLLM's) each request's time after its
first text over its later tokens.
Prints one JSON line and writes bench/results/<device>/<name>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
from common import one_image_per, write_result

from skipvision_jax.data.tasks import export_llava_eval
from skipvision_jax.vqa import files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_server(args, port: int) -> subprocess.Popen:
    command = [
        sys.executable,
        os.path.join(REPO, "serve.py"),
        f"--hf-checkpoint={args.hf_checkpoint}" if args.hf_checkpoint else f"--checkpoint={args.checkpoint}",
        f"--port={port}",
        f"--max-batch={args.max_batch}",
        f"--max-new-tokens={args.max_tokens}",
        f"--kv-policy={args.kv_policy}",
        f"--max-queue={max(args.concurrency_levels)}",
        f"--prefix-cache-mb={args.prefix_cache_mb}",
    ]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: serve.py exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("error: serve.py did not come up in 900 s")


def request_bodies(questions, image_folder: str, max_tokens: int, ignore_eos: bool) -> list[dict]:
    bodies = []
    for q in questions:
        with open(os.path.join(image_folder, q.image), "rb") as f:
            url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": q.text}]
        bodies.append(
            {
                "messages": [{"role": "user", "content": content}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": ignore_eos,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
    return bodies


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


async def streamed(http: httpx.AsyncClient, body: dict) -> tuple[float, list[float], int]:
    """One streamed request: (seconds to its first text, each later chunk's
    gap, answer tokens)."""
    start = last = time.perf_counter()
    first, gaps, tokens = None, [], 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if not any(choice["delta"].get("content") for choice in chunk.get("choices", ())):
                continue
            now = time.perf_counter()
            if first is None:
                first = now - start
            else:
                gaps.append(now - last)
            last = now
    return (time.perf_counter() - start if first is None else first), gaps, tokens


async def load(url: str, bodies: list[dict], concurrency: int, total: int) -> dict:
    """`concurrency` closed-loop clients send `total` requests in all. Each
    opens its connection first and the clock starts when all have: on a
    shared 2-core box, connecting 32 clients one by one would otherwise land
    in the first requests' latency."""
    latencies, firsts, gaps, per_token, tokens = [], [], [], [], 0
    next_index, connected, all_connected = 0, 0, asyncio.Event()

    async def client():
        nonlocal next_index, tokens, connected
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            (await http.get("/health")).raise_for_status()
            connected += 1
            if connected == concurrency:
                all_connected.set()
            await all_connected.wait()
            while next_index < total:
                body = bodies[next_index % len(bodies)]
                next_index += 1
                start = time.perf_counter()
                first, later, answer_tokens = await streamed(http, body)
                latencies.append(time.perf_counter() - start)
                firsts.append(first)
                gaps.extend(later)
                if answer_tokens > 1:  # vLLM's TPOT: the mean gap after the first token
                    per_token.append((latencies[-1] - first) / (answer_tokens - 1))
                tokens += answer_tokens

    before = httpx.get(f"{url}/health").json()
    clients = asyncio.gather(*(client() for _ in range(concurrency)))
    await all_connected.wait()
    start = time.perf_counter()
    await clients
    wall = time.perf_counter() - start
    after = httpx.get(f"{url}/health").json()
    ms = lambda values, share: 1000 * percentile(values, share) if values else None
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "wall_s": wall,
        "requests_per_s": len(latencies) / wall,
        "tokens_per_s": tokens / wall,
        "answer_tokens_mean": tokens / len(latencies),
        "latency_p50_ms": ms(latencies, 0.5),
        "latency_p99_ms": ms(latencies, 0.99),
        "ttft_p50_ms": ms(firsts, 0.5),
        "ttft_p99_ms": ms(firsts, 0.99),
        # ITL: gaps between text chunks (None where every answer's text came
        # in one: past its end an ignore_eos answer adds no text to stream);
        # TPOT: each request's time after its first text per later token.
        "itl_p50_ms": ms(gaps, 0.5),
        "itl_p99_ms": ms(gaps, 0.99),
        "tpot_p50_ms": ms(per_token, 0.5),
        "tpot_p99_ms": ms(per_token, 0.99),
        "device_busy_share": (after["busy_s"] - before["busy_s"]) / wall,  # the scheduler's device work
        **{key: after.get(key, 0) - before.get(key, 0) for key in ("prefix_hits", "prefix_misses")},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/default", help="A train.py workdir on the embedded task.")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--requests", type=int, default=512, help="Requests per timed pass.")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument(
        "--max-tokens", type=int, default=16, help="max_tokens of the requests whose answers end freely."
    )
    parser.add_argument("--kv-policy", default="skip_vision")
    parser.add_argument(
        "--answers",
        default="model,16",
        help="Scenarios: `model` (answers end where the model stops: 2 tokens on the embedded task), "
        "N (vLLM's ignore_eos: N tokens each, a decode-heavy load)",
    )
    parser.add_argument("--per-image", type=int, default=1, help="Consecutive questions on one image.")
    parser.add_argument("--prefix-cache-mb", type=float, default=1024, help="The server's; 0: no prefix shared.")
    parser.add_argument("--name", default="serve_load", help="The results file's name.")
    parser.add_argument(
        "--geometry",
        choices=("checkpoint", "llava"),
        default="checkpoint",
        help="llava: serve a random transformers LLaVA at bench/vs_transformers.py's geometry (576 image tokens)",
    )
    parser.add_argument("--port", type=int, default=8391)
    args = parser.parse_args()
    args.concurrency_levels = [int(c) for c in args.concurrency.split(",")]
    scenarios = [(a, args.max_tokens, False) if a == "model" else (a, int(a), True) for a in args.answers.split(",")]
    args.max_tokens = max(tokens for _, tokens, _ in scenarios)

    # Every pass asks about images of its own: the prefix cache holds only what this pass put in it.
    passes = [scenario for scenario in scenarios for _ in range(1 + args.repeats * len(args.concurrency_levels))]
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_llava_eval(os.path.join(tmp, "export"), "val", args.requests * len(passes))
        questions = one_image_per(files.read_questions(exported["questions"]), args.per_image)
        bodies = [
            request_bodies(questions[i * args.requests : (i + 1) * args.requests], exported["images"], tokens, eos)
            for i, (_, tokens, eos) in enumerate(passes)
        ]
    next_bodies = iter(bodies)
    model_dir = tempfile.TemporaryDirectory()
    args.hf_checkpoint = None
    if args.geometry == "llava":
        from vs_transformers import build_checkpoint

        build_checkpoint(model_dir.name, with_processor=True)
        args.hf_checkpoint = model_dir.name
    server = start_server(args, args.port)
    url = f"http://127.0.0.1:{args.port}"
    results = []
    try:
        compiled = httpx.get(f"{url}/health").json()["compilations"]
        for name, tokens, _ in scenarios:  # in the order `bodies` were made
            asyncio.run(load(url, next(next_bodies), max(args.concurrency_levels), args.requests))  # untimed
            runs = [
                {"repeat": repeat, **asyncio.run(load(url, next(next_bodies), concurrency, args.requests))}
                for repeat in range(args.repeats)
                for concurrency in args.concurrency_levels
            ]
            median = {
                c: statistics.median(r["requests_per_s"] for r in runs if r["concurrency"] == c)
                for c in args.concurrency_levels
            }
            results.append(
                {
                    "answers": "as the model stops" if name == "model" else f"{tokens} tokens (ignore_eos)",
                    "max_tokens": tokens,
                    "runs": runs,
                    "median_requests_per_s": median,
                    "speedup_highest_over_1": median[max(median)] / median[min(median)],
                }
            )
        compilations = httpx.get(f"{url}/health").json()["compilations"] - compiled
    finally:
        server.terminate()
        server.wait(60)
        model_dir.cleanup()
    write_result(
        args.name,
        {
            "checkpoint": args.checkpoint,
            "geometry": args.geometry,
            "policy": args.kv_policy,
            "max_batch": args.max_batch,
            "per_image": args.per_image,
            "prefix_cache_mb": args.prefix_cache_mb,
            "client": "asyncio + httpx, closed loop, on the same 2 cores as the server",
            "scenarios": results,
            "compilations_after_warmup": compilations,
        },
    )


if __name__ == "__main__":
    main()
