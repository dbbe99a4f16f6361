"""Checkpoints out: a train.py run as a directory other code loads.

    python -m skipvision_jax.interop.export --checkpoint RUN --out DIR --format hf|llava

`hf`: transformers' `LlavaForConditionalGeneration` (interop/hf_llava.py),
for the plain LLaVA layout only, since transformers has no merge, summary
tokens or Skip-FFN. `llava`: the original LLaVA / official Skip-Vision
layout (interop/llava_layout.py), summary pool included as `model.ada`; a
model with two separate pools is refused. Both read back with
`--hf-checkpoint DIR` (infer.py, eval.py, serve.py, `init_from_hf`).

A run on LLaVA data (`data.kind=llava`) also gets its tokenizer, its chat
template and a CLIP image processor of its image size, so that the export
answers prompts as the run did; the embedded tasks' word tokenizer has no
transformers form, so their exports hold weights and config only.
"""

from __future__ import annotations

import argparse
import os
import sys

FORMATS = ("hf", "llava")
IMAGE_TOKEN = "<image>"


def run_tokenizer(data_cfg):
    """The run's tokenizer (`data.tokenizer`, a tokenizer.json) as transformers
    loads it, with LLaVA's image token and the run's chat template; None for
    the embedded tasks."""
    if data_cfg.kind != "llava":
        return None
    from transformers import PreTrainedTokenizerFast

    from skipvision_jax.data.llava import ChatTemplate

    bos, eos = "<s>", "</s>"  # LlavaTransform's
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=data_cfg.tokenizer, bos_token=bos, eos_token=eos)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    adds_bos = tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]
    tokenizer.chat_template = ChatTemplate().jinja("" if adds_bos else bos, eos)
    return tokenizer


def image_processor(image_size: int):
    """CLIP preprocessing at our image size: a square image gives the pixels
    data/images.py `preprocess` gives (bicubic resize, CLIP mean and std)."""
    from transformers import CLIPImageProcessor

    from skipvision_jax.data.images import CLIP_MEAN, CLIP_STD

    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        resample=3,  # PIL bicubic
        image_mean=[float(x) for x in CLIP_MEAN],
        image_std=[float(x) for x in CLIP_STD],
    )


def export(workdir: str, out: str, fmt: str) -> None:
    import jax

    from skipvision_jax import sharding
    from skipvision_jax.interop import hf_llava, llava_layout
    from skipvision_jax.train.restore import restore_run

    if fmt not in FORMATS:
        raise ValueError(f"--format: unknown {fmt!r}, expected one of {FORMATS}")
    run = restore_run(workdir, sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
    model_cfg, tokenizer = run.model_cfg, run_tokenizer(run.cfg.data)
    processor = image_processor(model_cfg.vision.image_size)
    if fmt == "llava":
        llava_layout.save(out, run.params, model_cfg, (run.cfg.get("init") or {}).get("vision_tower", ""))
        if tokenizer is not None:  # LLaVA reads the tokenizer from the model directory
            tokenizer.save_pretrained(out)
            processor.save_pretrained(out)
        return
    if tokenizer is None:
        raise ValueError(
            "--format hf: transformers' LLaVA needs an image token in the tokenizer; the embedded tasks' has none (export --format llava)"
        )
    from transformers import LlavaProcessor

    hf_llava.save(out, run.params, model_cfg, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    v = model_cfg.vision
    LlavaProcessor(
        image_processor=processor,
        tokenizer=tokenizer,
        patch_size=v.patch_size,
        vision_feature_select_strategy="default" if v.select_strategy == "patch" else "full",
        num_additional_image_tokens=1,  # the CLS position, which "default" drops again
        chat_template=tokenizer.chat_template,
    ).save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    from skipvision_jax.errors import one_line
    from skipvision_jax.train.checkpoint import CheckpointError

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="A train.py workdir.")
    parser.add_argument("--out", required=True, help="The directory to write.")
    parser.add_argument(
        "--format",
        default="hf",
        choices=FORMATS,
        help="hf: transformers' LlavaForConditionalGeneration; llava: LLaVA's own.",
    )
    args = parser.parse_args(argv)
    try:
        export(args.checkpoint, args.out, args.format)
    except (ValueError, CheckpointError) as err:  # HFCheckpointError is a ValueError
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 1
    print(os.path.abspath(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
