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


def run_tokenizer(text):
    """The run's tokenizer (its text format's: `data.pipeline.text_format`) as
    transformers loads it, with LLaVA's image token and the run's template as
    its chat template; None for the embedded tasks."""
    from skipvision_jax.data.templates import ConversationCodec

    if not isinstance(text, ConversationCodec):
        return None
    from transformers import PreTrainedTokenizerFast

    token = text.tokenizer.id_to_token
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=text.tokenizer.__class__.from_str(text.tokenizer.to_str()),
        bos_token=None if text.bos_id is None else token(text.bos_id),
        eos_token=token(text.stop_ids[0]),
        pad_token=token(text.pad_id),
    )
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = text.template.jinja()
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


def export(params, model_cfg: ModelConfig, text, vision_tower: str, out: str, fmt: str) -> None:
    """Writes `params` of `model_cfg` (a run's, with its text format and the
    tower directory it started from, if any) to `out` in format `fmt`."""
    from skipvision_jax.interop import hf_llava, llava_layout

    if fmt not in FORMATS:
        raise ValueError(f"--format: unknown {fmt!r}, expected one of {FORMATS}")
    tokenizer = run_tokenizer(text)
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
