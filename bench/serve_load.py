"""serve.py under load: requests/s, answer tokens/s and latency percentiles at
several concurrencies, against a server it starts on loopback.

    python bench/serve_load.py --checkpoint runs/default [--concurrency 1,8,32] [--requests 512]
        [--repeats 2] [--max-batch 32] [--kv-policy skip_vision] [--answers model,16]

The embedded validation questions (exported in LLaVA's format, images as
base64 data URLs) are sent greedily by `concurrency` clients at once, each
sending its next request when the last is answered (closed loop), over
asyncio with one httpx connection per client (all connected before the
clock starts). Two loads: answers as the model ends them (two tokens on the
embedded task), and 16-token answers (vLLM's ignore_eos, as its serving
benchmark uses), where decoding dominates. The server is warmed at start-up,
and one untimed pass at the highest concurrency precedes the timed ones.
Latency is per request, from sending to the whole answer. Prints one JSON
line and writes bench/results/<device>/serve_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
from common import write_result

from skipvision_jax.data.tasks import export_llava_eval
from skipvision_jax.vqa import files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_server(args, port: int) -> subprocess.Popen:
    command = [
        sys.executable,
        os.path.join(REPO, "serve.py"),
        f"--checkpoint={args.checkpoint}",
        f"--port={port}",
        f"--max-batch={args.max_batch}",
        f"--max-new-tokens={args.max_tokens}",
        f"--kv-policy={args.kv_policy}",
        f"--max-queue={max(args.concurrency_levels)}",
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
            }
        )
    return bodies


async def load(url: str, bodies: list[dict], concurrency: int, total: int) -> dict:
    """`concurrency` closed-loop clients send `total` requests in all. Each
    opens its connection first and the clock starts when all have: on a
    shared 2-core box, connecting 32 clients one by one would otherwise land
    in the first requests' latency."""
    latencies, tokens = [], 0
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
                reply = await http.post("/v1/chat/completions", json=body)
                latencies.append(time.perf_counter() - start)
                reply.raise_for_status()
                tokens += reply.json()["usage"]["completion_tokens"]

    busy_before = httpx.get(f"{url}/health").json()["busy_s"]
    clients = asyncio.gather(*(client() for _ in range(concurrency)))
    await all_connected.wait()
    start = time.perf_counter()
    await clients
    wall = time.perf_counter() - start
    busy = httpx.get(f"{url}/health").json()["busy_s"] - busy_before
    ordered = sorted(latencies)
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "wall_s": wall,
        "requests_per_s": len(latencies) / wall,
        "tokens_per_s": tokens / wall,
        "answer_tokens_mean": tokens / len(latencies),
        "latency_p50_ms": 1000 * statistics.median(ordered),
        "latency_p99_ms": 1000 * ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
        "device_busy_share": busy / wall,  # the scheduler's device work over the wall time
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
    parser.add_argument("--port", type=int, default=8391)
    args = parser.parse_args()
    args.concurrency_levels = [int(c) for c in args.concurrency.split(",")]
    scenarios = [(a, args.max_tokens, False) if a == "model" else (a, int(a), True) for a in args.answers.split(",")]
    args.max_tokens = max(tokens for _, tokens, _ in scenarios)

    with tempfile.TemporaryDirectory() as tmp:
        exported = export_llava_eval(os.path.join(tmp, "export"), "val", args.requests)
        questions = files.read_questions(exported["questions"])
        bodies = {
            name: request_bodies(questions, exported["images"], tokens, ignore_eos)
            for name, tokens, ignore_eos in scenarios
        }
    server = start_server(args, args.port)
    url = f"http://127.0.0.1:{args.port}"
    results = []
    try:
        compiled = httpx.get(f"{url}/health").json()["compilations"]
        for name, tokens, _ in scenarios:
            asyncio.run(load(url, bodies[name], max(args.concurrency_levels), args.requests))  # untimed
            runs = [
                {"repeat": repeat, **asyncio.run(load(url, bodies[name], concurrency, args.requests))}
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
    write_result(
        "serve_load",
        {
            "checkpoint": args.checkpoint,
            "policy": args.kv_policy,
            "max_batch": args.max_batch,
            "client": "asyncio + httpx, closed loop, on the same 2 cores as the server",
            "scenarios": results,
            "compilations_after_warmup": compilations,
        },
    )


if __name__ == "__main__":
    main()
