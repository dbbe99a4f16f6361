"""Serve a model over OpenAI's chat completions API, with continuous batching.

    python serve.py --checkpoint DIR | --hf-checkpoint HF_DIR [--host 127.0.0.1] [--port 8000]
        [--max-batch 16] [--max-queue 256] [--max-new-tokens 128] [--kv-policy P]
        [--kv-budget N | --kv-compression R] [--prefix-cache-mb 1024] [--mesh 1,1,-1] [--model-id NAME]

    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{
      "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
        {"type": "text", "text": "What is in the picture?"}]}],
      "max_tokens": 16, "temperature": 0}'

Every program is compiled at start-up (--nowarmup: on first use), never per
request (GET /health counts compilations). Requests with the same image
share its prefix's forward (the text before the image, the visual block):
computed once, kept under --prefix-cache-mb (hits, misses, bytes on
/health). SIGTERM stops taking connections, answers the requests in flight
and exits 0. See skipvision_jax/serving/.
"""

from __future__ import annotations

import signal

from absl import flags

from skipvision_jax import cli
from skipvision_jax.presses import POLICIES
from skipvision_jax.train.checkpoint import CheckpointError

cli.define_model_flags()
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
flags.DEFINE_integer("port", 8000, "Port to listen on.")
flags.DEFINE_integer("max_batch", 16, "Decode slots: requests decoded together (per KV setting).")
flags.DEFINE_integer("max_queue", 256, "Requests waiting for a slot; more are answered 503 with Retry-After.")
flags.DEFINE_integer("max_new_tokens", 128, "A request's max_tokens at most (and its default); sizes the caches.")
flags.DEFINE_integer("max_prefill", 8, "Prompts prefilled together.")
flags.DEFINE_integer("max_kv_settings", 4, "KV settings (policy and budget) served at once, each with its own slots.")
flags.DEFINE_float(
    "prefix_cache_mb",
    1024,
    "MiB of prompt prefixes (text before the image, visual block) kept on the device for requests with the same "
    "image; 0: every request prefills its whole prompt.",
)
flags.DEFINE_string("kv_policy", "full", f"The default KV policy: {' | '.join(POLICIES)}; requests may name another.")
cli.define_kv_flags()
flags.DEFINE_string("model_id", None, "The model's name in the API (default: the checkpoint's directory name).")
flags.DEFINE_integer("max_body_mb", 20, "Request bodies over this many MiB are refused (413).")
flags.DEFINE_integer(
    "max_image_pixels", 25_000_000, "Images of more pixels (width x height, read from the header) are refused (400)."
)
flags.DEFINE_bool("warmup", True, "Compile every program of the default KV setting before listening.")
flags.DEFINE_integer("seed", 0, "Seeds the draws of requests that give no seed.")
flags.DEFINE_integer("graceful_s", 25, "On SIGTERM, seconds the requests in flight get to finish.")


def main() -> None:
    import uvicorn

    from skipvision_jax.serving.api import ApiSettings, create_app
    from skipvision_jax.serving.scheduler import Scheduler, ServeSettings

    f = flags.FLAGS
    if f.kv_policy not in POLICIES:
        raise ValueError(f"--kv-policy: unknown {f.kv_policy!r}, expected one of {POLICIES}")
    if f.max_body_mb < 1:
        raise ValueError(f"--max-body-mb: must be >= 1, got {f.max_body_mb}")
    if f.max_image_pixels < 1:
        raise ValueError(f"--max-image-pixels: must be >= 1, got {f.max_image_pixels}")
    policy = cli.kv_policies_from_flags((f.kv_policy,))[0]
    settings = ServeSettings(
        policy,
        f.max_batch,
        f.max_queue,
        f.max_new_tokens,
        f.max_prefill,
        f.max_kv_settings,
        f.warmup,
        f.prefix_cache_mb,
    )
    loaded = cli.load_model_from_flags()
    scheduler = Scheduler(loaded, settings)  # a default KV setting the model cannot serve fails here
    model_id = f.model_id or cli.directory_name(f.checkpoint or f.hf_checkpoint)
    app = create_app(scheduler, ApiSettings(model_id, f.max_body_mb * 2**20, f.seed, f.max_image_pixels))
    server = uvicorn.Server(
        uvicorn.Config(app, host=f.host, port=f.port, timeout_graceful_shutdown=f.graceful_s, access_log=False)
    )
    # uvicorn re-raises the signal it shut down on once it is done; a
    # graceful stop is a success, so that second SIGTERM does nothing.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    if not server.started:
        cli.fail(f"could not listen on {f.host}:{f.port}")


if __name__ == "__main__":
    cli.run(main, (ValueError, CheckpointError))  # HFCheckpointError and ImageError are ValueErrors
