"""Answer a question about an image with a trained Skip-Vision model.

    python infer.py --checkpoint DIR --image IMG --prompt TEXT [--kv-policy skip_vision] [--json]
    python infer.py --checkpoint DIR --image IMG --prompt TEXT --compare-policies
    python infer.py --hf-checkpoint HF_DIR --image IMG --prompt TEXT [--kv-policy skip_vision --visual-kept 64]

DIR is a train.py workdir. Bad input (missing or corrupt image, empty or too
long prompt, impossible budget, unknown policy, missing checkpoint) exits
non-zero with a one-line error.
"""

from __future__ import annotations

import json

from absl import flags

from skipvision_jax import cli
from skipvision_jax.data.images import ImageError
from skipvision_jax.generate import Sampling
from skipvision_jax.presses import POLICIES
from skipvision_jax.train.checkpoint import CheckpointError

cli.define_model_flags()
flags.DEFINE_string("image", None, "Image file.", required=True)
flags.DEFINE_string("prompt", None, "The question.", required=True)
flags.DEFINE_string("kv_policy", "full", " | ".join(POLICIES))
cli.define_kv_flags()
flags.DEFINE_integer("max_new_tokens", 16, "Tokens to generate at most.")
flags.DEFINE_bool("greedy", True, "Greedy decoding; --nogreedy samples.")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature (with --nogreedy).")
flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_bool("json", False, "Print one JSON object.")
flags.DEFINE_bool("compare_policies", False, "Run every KV policy on the same input and print a table.")
cli.define_distributed_flags()


def main() -> None:
    from skipvision_jax.inference import answer, compare_policies

    f = flags.FLAGS
    policies = cli.kv_policies_from_flags(POLICIES if f.compare_policies else (f.kv_policy,))
    sampling = Sampling(
        greedy=f.greedy and f.temperature == 1.0, temperature=f.temperature, top_k=f.top_k, top_p=f.top_p
    )
    loaded = cli.load_model_from_flags()
    batch, model_cfg = loaded.make_batch(f.image, f.prompt)
    if f.compare_policies:
        rows = compare_policies(loaded, batch, model_cfg, policies, f.max_new_tokens, sampling, f.seed)
        if f.json:
            print(json.dumps(rows))
            return
        print(
            f"{'policy':<18} {'answer':<24} {'prefill ms':>10} {'decode ms/tok':>13} {'kv slots':>8} {'kv KiB':>8}  agrees"
        )
        for row in rows:
            print(
                f"{row['policy']:<18} {row['text'][:24]:<24} {row['prefill_ms']:>10.2f} {row['decode_ms_per_token']:>13.3f} {row['kv_slots']:>8} {row['kv_bytes'] / 1024:>8.1f}  {row['agrees_with_full']}"
            )
        return
    result = answer(loaded, batch, model_cfg, policies[0], f.max_new_tokens, sampling, f.seed)
    print(json.dumps(result) if f.json else result["text"])


if __name__ == "__main__":
    cli.run(main, (ValueError, ImageError, CheckpointError))  # HFCheckpointError is a ValueError
