"""A plain NumPy decoder with each KV policy written as sets of token
positions, one row and one KV head at a time: the independent reference for
the jitted fixed-budget caches (tests/test_generate.py).

It runs a plain LLaMA decoder (no Skip-FFN) in float64 on the embedded
prompt of one row, keeps per layer and KV head the set of cached positions
with their keys, values and scores, and applies each policy's rule as the
method (and kvpress, for the GQA mean over a KV head's query heads) describes it:

    h2o        prefill: sinks + the recent window + the keys with the most
               attention received from all prompt queries; decode: when full,
               evict the unprotected key with the least accumulated attention
    snapkv     prefill: the observation window + the keys most attended by it
               (scores average-pooled over neighbouring keys, zeros past the
               edges); decode: append
    streaming  sinks + the newest keys: evict the oldest non-sink key
    tova       prefill: the last query + the keys it attends most (mean over
               all heads); decode: when full, evict the key the last step's
               query attended least
"""

from __future__ import annotations

import dataclasses

import numpy as np


def rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rope(x, positions, theta):
    """x [L, H, Dh], Hugging Face Llama halves."""
    dh = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, dh, 2) / dh)
    angles = positions[:, None] * inv_freq
    cos, sin = (
        np.cos(np.concatenate([angles, angles], -1))[:, None],
        np.sin(np.concatenate([angles, angles], -1))[:, None],
    )
    rotated = np.concatenate([-x[..., dh // 2 :], x[..., : dh // 2]], axis=-1)
    return x * cos + rotated * sin


def silu(x):
    return x / (1 + np.exp(-x))


@dataclasses.dataclass
class LayerSet:
    """One layer's cache for one KV head as a set: position -> (key [Dh], value [Dh], score)."""

    keys: dict
    values: dict
    scores: dict


EVICTING = ("h2o", "streaming", "tova")


class ReferenceDecoder:
    def __init__(self, params, cfg, policy, max_new_tokens: int):
        self.params, self.cfg, self.policy = params, cfg.decoder, policy.press  # the press: its name and knobs
        self.fastv = cfg.fastv
        self.visual_rows = (cfg.layout.image_offset, cfg.layout.image_offset + cfg.visual_length)
        self.budget, self.max_new_tokens = policy.budget, max_new_tokens
        self.group = self.cfg.num_heads // self.cfg.num_kv_heads
        head = params["embed"]["embedding"].T if self.cfg.tie_embeddings else params["lm_head"]["kernel"]
        self.head, self.final_scale = (
            np.asarray(head, np.float64),
            np.asarray(params["final_norm"]["scale"], np.float64),
        )

    def w(self, layer, *path):
        node = self.params["decoder"][f"layer_{layer}"]
        for part in path:
            node = node[part]
        return np.asarray(node, np.float64)

    def qkv(self, layer, h, positions):
        a = rms_norm(h, self.w(layer, "attn_norm", "scale"), self.cfg.norm_eps)
        q, k, v = (
            np.einsum("ld,dhe->lhe", a, self.w(layer, "attn", name, "kernel"))
            for name in ("q_proj", "k_proj", "v_proj")
        )
        return rope(q, positions, self.cfg.rope_theta), rope(k, positions, self.cfg.rope_theta), v

    def finish(self, layer, h, attended):
        """h + o_proj(attention output), then the SwiGLU FFN."""
        h = h + np.einsum("lhe,hed->ld", attended, self.w(layer, "attn", "o_proj", "kernel"))
        a = rms_norm(h, self.w(layer, "mlp_norm", "scale"), self.cfg.norm_eps)
        gate, up = a @ self.w(layer, "mlp", "gate", "kernel"), a @ self.w(layer, "mlp", "up", "kernel")
        return h + (silu(gate) * up) @ self.w(layer, "mlp", "down", "kernel")

    def logits(self, h_last):
        return rms_norm(h_last, self.final_scale, self.cfg.norm_eps) @ self.head

    def heads_of(self, kv_head):
        return slice(kv_head * self.group, (kv_head + 1) * self.group)

    def prefill(self, h):
        """h [P, D]: the row's embedded prompt. Returns (last hidden state,
        per layer a list of per-KV-head sets).

        With the config's FastV pruning, after `fastv.layer` layers only the
        `fastv.keep` visual rows that the last row attended to most (mean over
        heads) go on."""
        positions = np.arange(h.shape[0])
        sets = []
        for layer in range(self.cfg.num_layers):
            length = h.shape[0]
            q, k, v = self.qkv(layer, h, positions.astype(np.float64))
            k_heads = np.repeat(k, self.group, axis=1)
            v_heads = np.repeat(v, self.group, axis=1)
            logits = np.einsum("the,she->hts", q, k_heads) / np.sqrt(q.shape[-1])
            logits = np.where(np.tril(np.ones((length, length), bool))[None], logits, -np.inf)
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            layer_sets = []
            for kv_head in range(self.cfg.num_kv_heads):
                kept, scores = self.select_prompt(probs, positions, kv_head)
                layer_sets.append(
                    LayerSet(
                        {positions[j]: k[j, kv_head] for j in kept},
                        {positions[j]: v[j, kv_head] for j in kept},
                        {positions[j]: scores[j] for j in kept},
                    )
                )
            sets.append(layer_sets)
            h = self.finish(layer, h, np.einsum("hts,she->the", probs, v_heads))
            if self.fastv.enabled and layer == self.fastv.layer - 1:
                keep, (start, end) = self.fastv.keep, self.visual_rows
                received = probs[:, -1].mean(axis=0)
                visual = start + np.argsort(-received[start:end], kind="stable")[:keep]
                stay = np.sort(np.concatenate([np.arange(start), visual, np.arange(end, length)]))
                h, positions = h[stay], positions[stay]
        return h[-1], sets

    def select_prompt(self, probs, positions, kv_head):
        """Which prompt rows one KV head's cache keeps (indices into
        `positions`, the rows' token positions) and the score each starts with."""
        pol, length, prompt_len = self.policy, probs.shape[-1], positions[-1] + 1
        if self.budget is None:  # full: every prompt row
            slots = length
        else:
            slots = min(length, self.budget if pol.name in EVICTING else self.budget - self.max_new_tokens)
        group_probs = probs[self.heads_of(kv_head)]  # [G, T, S]
        scores = np.zeros(length)
        sinks = positions < getattr(pol, "sink_tokens", 0)  # h2o's and streaming's
        if pol.name == "h2o":
            scores = group_probs.sum(axis=1).mean(axis=0)  # every prompt query, mean over the group
            protected = sinks | (positions >= prompt_len - pol.recent_window)
            priority = np.where(protected, np.inf, scores)
        elif pol.name == "streaming":
            priority = np.where(sinks, np.inf, positions.astype(np.float64))
        elif pol.name == "tova":
            scores = probs[:, -1].mean(axis=0)  # the last query, every head
            priority = np.where(positions == prompt_len - 1, np.inf, scores)
        elif pol.name == "snapkv":
            observed = positions >= prompt_len - pol.obs_window
            received = np.where(observed, 0.0, group_probs[:, observed].sum(axis=1).mean(axis=0))
            half = pol.pool_kernel // 2
            padded = np.concatenate([np.zeros(half), received, np.zeros(half)])
            pooled = np.array([padded[j : j + pol.pool_kernel].sum() / pol.pool_kernel for j in range(length)])
            priority = np.where(observed, np.inf, pooled)
        else:
            priority = np.zeros(length)
        order = np.argsort(-priority, kind="stable")  # ties: the earlier position first, as lax.top_k
        kept = sorted(order[:slots].tolist())
        return kept, (scores if pol.name in ("h2o", "tova") else np.zeros(length))

    def insert(self, layer_set: LayerSet, position: int, key, value):
        pol = self.policy
        if pol.name in EVICTING and len(layer_set.keys) >= self.budget:
            candidates = list(layer_set.keys)
            if pol.name != "tova":
                candidates = [p for p in candidates if p >= pol.sink_tokens]
            if pol.name == "h2o":
                candidates = [p for p in candidates if p <= position - pol.recent_window]
            rank = (lambda p: p) if pol.name == "streaming" else (lambda p: layer_set.scores[p])
            victim = min(candidates, key=rank)
            for table in (layer_set.keys, layer_set.values, layer_set.scores):
                del table[victim]
        layer_set.keys[position], layer_set.values[position], layer_set.scores[position] = key, value, 0.0

    def step(self, h, position: int, sets):
        """One new token (embedding h [D]) at `position` through every layer."""
        h = h[None]
        for layer, layer_sets in enumerate(sets):
            q, k, v = self.qkv(layer, h, np.array([float(position)]))
            attended = np.zeros(q.shape[1:])  # [H, Dh]
            step_probs = []
            for kv_head, layer_set in enumerate(layer_sets):
                self.insert(layer_set, position, k[0, kv_head], v[0, kv_head])
                cached = sorted(layer_set.keys)
                keys = np.stack([layer_set.keys[p] for p in cached])
                values = np.stack([layer_set.values[p] for p in cached])
                heads = self.heads_of(kv_head)
                logits = np.einsum("he,se->hs", q[0, heads], keys) / np.sqrt(q.shape[-1])
                probs = np.exp(logits - logits.max(-1, keepdims=True))
                probs /= probs.sum(-1, keepdims=True)
                attended[heads] = probs @ values
                step_probs.append((layer_set, cached, probs))
            if self.policy.name == "h2o":
                for layer_set, cached, probs in step_probs:
                    for p, received in zip(cached, probs.mean(axis=0)):
                        layer_set.scores[p] += received
            elif self.policy.name == "tova":
                # TOVA averages over every head, so all KV heads hold the same positions (asserted).
                assert all(cached == step_probs[0][1] for _, cached, _ in step_probs)
                mean = np.mean([probs for _, _, probs in step_probs], axis=(0, 1))
                for layer_set, cached, _ in step_probs:
                    for p, received in zip(cached, mean):
                        layer_set.scores[p] = received
            h = self.finish(layer, h, attended[None])
        return h[0]
