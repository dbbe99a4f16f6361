"""Checkpoints out: a train.py run's weights and configs as a directory other
code loads (the command line is export.py at the top).

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

from skipvision_jax.config import ModelConfig

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


def export(params, model_cfg: ModelConfig, data_cfg, vision_tower: str, out: str, fmt: str) -> None:
    """Writes `params` of `model_cfg` (a run's, with its `data` config and the
    tower directory it started from, if any) to `out` in format `fmt`."""
    from skipvision_jax.interop import hf_llava, llava_layout

    if fmt not in FORMATS:
        raise ValueError(f"--format: unknown {fmt!r}, expected one of {FORMATS}")
    tokenizer = run_tokenizer(data_cfg)
    processor = image_processor(model_cfg.vision.image_size)
    if fmt == "llava":
        llava_layout.save(out, params, model_cfg, vision_tower)
        if tokenizer is not None:  # LLaVA reads the tokenizer from the model directory
            tokenizer.save_pretrained(out)
            processor.save_pretrained(out)
        return
    if tokenizer is None:
        raise ValueError(
            "--format hf: transformers' LLaVA needs an image token in the tokenizer; the embedded tasks' has none (export --format llava)"
        )
    hf_llava.save(out, params, model_cfg, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    hf_llava.llava_processor(processor, tokenizer, model_cfg.vision).save_pretrained(out)
