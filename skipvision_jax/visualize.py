"""Pictures of what the model keeps, as token-pruning papers draw them: the
image with each patch coloured by what becomes of it, the class token's
attention where the layout ranks by it, and per decoder layer which visual
keys a KV press keeps in the cache.

    python -m skipvision_jax.visualize --checkpoint RUN --image IMG --prompt TEXT --out map.png [--kv-policy snapkv --kv-compression 0.5]
    python -m skipvision_jax.visualize --hf-checkpoint DIR --visual-kept 100 ...

Colours: a kept patch (every FFN, and its key stays under `skip_vision`)
green; a skipped patch the colour of its merge group (the skipped row it was
averaged into, `token_merge.merge_weights`); a patch dropped outright grey.
A layout that keeps pooled coarse tokens (the multi-scale layouts) keeps no
patch: its coarse cells are outlined instead. Needs matplotlib (the `bench`
extra).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from skipvision_jax.config import ModelConfig
from skipvision_jax.data.images import CLIP_MEAN, CLIP_STD
from skipvision_jax.data.llava import Turn
from skipvision_jax.errors import CheckpointError, one_line
from skipvision_jax.inference import LoadedModel, model_generator
from skipvision_jax.kvcache import KVPolicy
from skipvision_jax.nn import SkipVisionVLM
from skipvision_jax.nn.projector import Projector
from skipvision_jax.nn.token_merge import merge_weights
from skipvision_jax.partition import SequenceLayout, kept_first_order

KEPT_RGB = (0.13, 0.67, 0.25)
DROPPED_RGB = (0.55, 0.55, 0.55)
# Merge groups cycle through these (none of them the kept green).
GROUP_RGB = tuple(
    tuple(int(h[i : i + 2], 16) / 255 for i in (0, 2, 4))
    for h in "1f77b4 ff7f0e d62728 9467bd 8c564b e377c2 17becf bcbd22 aec7e8 ffbb78 ff9896 c5b0d5 c49c94 f7b6d2 9edae5 dbdb8d".split()
)


@dataclasses.dataclass(frozen=True)
class TokenMap:
    """What becomes of each of an image's patches (row-major, `grid` x `grid`)."""

    pixels: np.ndarray  # [H, W, 3] in [0, 1]: the image as the tower sees it
    grid: int
    kept: np.ndarray  # [P] bool: the patch is a kept token
    group: np.ndarray  # [P] int: the skipped row its token was merged into; -1 kept, -2 dropped
    coarse_grids: tuple[int, ...]  # pooled grids whose coarse tokens are the kept ones (multi-scale layouts)
    cls_attention: np.ndarray | None  # [P]: the class token's attention, where the layout ranks by it
    press: str | None
    press_kept: np.ndarray | None  # [layers, P]: share of KV heads whose cache holds the key carrying the patch


def patch_of_feature(cfg: ModelConfig) -> np.ndarray:
    """For each of the tower's features (its output order), the patch it is, or -1
    (the class token, a pooled coarse token)."""
    v = cfg.vision
    head = (1 if v.select_strategy == "full" else 0) + sum(g * g for g in v.pooled_grids)
    return np.concatenate([np.full(head, -1), np.arange(v.num_patches)])


def visual_rows(layout: SequenceLayout, ordered_patches: np.ndarray, group: np.ndarray, num_kept: int) -> np.ndarray:
    """[P] the sequence row holding each patch's key: a kept patch its own row
    (`ordered_patches`: the patch of each feature in the model's order, -1 for
    none), a skipped one its merge group's row; -1 where none (dropped)."""
    rows = np.full(len(group), -1)
    for rank, patch in enumerate(ordered_patches[:num_kept]):
        if patch >= 0:
            rows[patch] = layout.visual_start + rank
    skipped = group >= 0
    rows[skipped] = layout.skipped_start + group[skipped]
    return rows


def cache_keeps(caches, num_layers: int, rows: np.ndarray) -> np.ndarray:
    """[layers, P]: for each layer, the share of its KV heads whose cache holds
    each patch's row (the caches' positions, row 0 of the batch)."""
    kept = []
    for cache in caches:
        pos, valid = np.asarray(cache.pos), np.asarray(cache.valid)
        if pos.ndim == 3:  # an unrolled layer: [B, KV, S]
            pos, valid = pos[None], valid[None]
        for layer_pos, layer_valid in zip(pos[:, 0], valid[:, 0]):  # [KV, S] per layer
            held = [set(p[v].tolist()) for p, v in zip(layer_pos, layer_valid)]
            kept.append([np.mean([row in h for h in held]) if row >= 0 else 0.0 for row in rows])
    assert len(kept) == num_layers
    return np.asarray(kept)


def token_map(loaded: LoadedModel, image: Image.Image, prompt: str, policy: KVPolicy | None = None) -> TokenMap:
    """The map of `image` under `loaded`'s layout (the prompt fixes where the
    image sits); with `policy`, the keys its press keeps in each layer."""
    batch, cfg = loaded.encode(image, [Turn("user", prompt)])
    params, v = loaded.params, cfg.vision
    model = SkipVisionVLM(cfg)
    pixels = jnp.asarray(batch["pixels"])
    cls_attention = None
    if cfg.layout.select == "cls_attention":
        features, scores = model.apply(
            {"params": params}, pixels, method=lambda m, px: m.vision(px, with_cls_attention=True)
        )
        order = np.asarray(kept_first_order(scores, cfg.layout.num_kept))[0]
        cls_attention = np.asarray(scores[0], np.float32)
    else:
        features = model.apply({"params": params}, pixels, method=lambda m, px: m.vision(px))
        order = np.arange(features.shape[1])
    patch = patch_of_feature(cfg)
    num_kept = cfg.layout.num_kept
    kept = np.zeros(v.num_patches, bool)
    kept[[patch[f] for f in order[:num_kept] if patch[f] >= 0]] = True
    group = np.where(kept, -1, -2)
    fine = order[num_kept:]
    if not cfg.layout.drop_fine:
        ordered = jnp.take(features, jnp.asarray(order), axis=1)
        projected = Projector(cfg.decoder.width, jnp.dtype(cfg.dtype)).apply(
            {"params": params["visual_tokens"]["projector"]}, ordered
        )[:, num_kept:]
        if cfg.layout.merge_to is None:
            rows_of_fine = np.arange(len(fine))
        else:
            weights = merge_weights(projected, cfg.layout.merge_to, cfg.layout.merge_method)[0]  # [M, fine]
            rows_of_fine = np.asarray(jnp.argmax(weights, axis=0))
        for f, row in zip(fine, rows_of_fine):
            if patch[f] >= 0:
                group[patch[f]] = row
    press_kept = None
    if policy is not None:
        generator = model_generator(loaded, cfg, policy, max_new_tokens=1)
        state = generator.prefill(params, batch, jax.random.key(0))
        layout = SequenceLayout.from_config(cfg, batch["input_ids"].shape[1])
        rows = visual_rows(layout, np.array([patch[f] for f in order]), group, num_kept)
        press_kept = cache_keeps(state.caches, cfg.decoder.num_layers, rows)
    shown = np.clip(np.asarray(batch["pixels"][0]) * CLIP_STD + CLIP_MEAN, 0, 1)
    coarse = v.pooled_grids if (cfg.layout.select == "first" and v.pooled_grids) else ()
    return TokenMap(
        shown, v.patch_grid, kept, group, coarse, cls_attention, policy.name if policy else None, press_kept
    )


def roles_image(token: TokenMap) -> np.ndarray:
    """[grid, grid, 3]: each patch's colour (kept green, merge group, dropped grey)."""
    colours = np.array(
        [KEPT_RGB if g == -1 else DROPPED_RGB if g == -2 else GROUP_RGB[g % len(GROUP_RGB)] for g in token.group]
    )
    return colours.reshape(token.grid, token.grid, 3)


def draw(token: TokenMap, title: str = ""):
    """The figure: the image, its patches by role, the class token's attention
    (where ranked by it) and, with a press, the keys it keeps per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [] if token.press_kept is None else list(range(len(token.press_kept)))
    if len(layers) > 8:  # eight evenly spaced layers, the first and the last among them
        layers = sorted({round(i * (len(layers) - 1) / 7) for i in range(8)})
    panels = 2 + (token.cls_attention is not None) + len(layers)
    fig, axes = plt.subplots(1, panels, figsize=(2.6 * panels, 3.0), squeeze=False)
    axes = axes[0]
    extent = (0, token.grid, token.grid, 0)
    axes[0].imshow(token.pixels, extent=extent)
    axes[0].set_title("image")
    axes[1].imshow(token.pixels, extent=extent)
    axes[1].imshow(roles_image(token), extent=extent, interpolation="nearest", alpha=0.75)
    skipped = int((token.group >= 0).sum())
    rows = len(set(token.group[token.group >= 0].tolist()))
    axes[1].set_title(f"kept {int(token.kept.sum())}, skipped {skipped} in {rows} rows", fontsize=8)
    for grid in token.coarse_grids:  # the kept coarse tokens: one outlined cell each
        step = token.grid / grid
        for i in range(grid + 1):
            axes[1].axhline(i * step, color=KEPT_RGB, linewidth=1.5)
            axes[1].axvline(i * step, color=KEPT_RGB, linewidth=1.5)
    panel = 2
    if token.cls_attention is not None:
        axes[panel].imshow(token.cls_attention.reshape(token.grid, token.grid), cmap="magma", extent=extent)
        axes[panel].set_title("class token's attention", fontsize=8)
        panel += 1
    for layer in layers:
        axes[panel].imshow(token.pixels, extent=extent)
        axes[panel].imshow(
            token.press_kept[layer].reshape(token.grid, token.grid),
            cmap="Greens",
            vmin=0,
            vmax=1,
            alpha=0.8,
            extent=extent,
            interpolation="nearest",
        )
        axes[panel].set_title(f"{token.press}: layer {layer}", fontsize=8)
        panel += 1
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    from skipvision_jax import cli
    from skipvision_jax.data.images import load_image
    from skipvision_jax.inference import load_hf, load_trained

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="A train.py workdir.")
    model.add_argument("--hf-checkpoint", help="A Hugging Face LLaVA directory.")
    parser.add_argument("--visual-kept", type=int, default=-1, help="With --hf-checkpoint: kept visual tokens.")
    parser.add_argument("--image", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--out", required=True, help="The PNG to write.")
    parser.add_argument("--kv-policy", default=None, help="Also draw the keys this press keeps, per layer.")
    parser.add_argument("--kv-budget", type=int, default=None)
    parser.add_argument("--kv-compression", type=float, default=None)
    args = parser.parse_args(argv)
    try:
        loaded = (
            load_trained(args.checkpoint) if args.checkpoint else load_hf(args.hf_checkpoint, None, args.visual_kept)
        )
        policy = None
        if args.kv_policy:
            policy = KVPolicy.of(args.kv_policy, args.kv_budget, args.kv_compression)
        token = token_map(loaded, load_image(args.image), args.prompt, policy)
        draw(token, f"{args.checkpoint or args.hf_checkpoint}: {args.prompt}").savefig(args.out, dpi=120)
    except (ValueError, OSError, CheckpointError) as err:  # ImageError, HFCheckpointError: ValueErrors
        cli.fail(one_line(err))
    print(json.dumps({"out": args.out, "kept": int(token.kept.sum()), "skipped": int((token.group >= 0).sum())}))


if __name__ == "__main__":
    main()
