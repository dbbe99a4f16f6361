"""Where a run's weights come from: the newest good checkpoint of a
train.py workdir (`restore_run`), or, for a fresh run, the seed's params with
a whole LLaVA, the parts or an earlier run's params put in place
(`initial_params`)."""

from __future__ import annotations

import dataclasses
import logging
import os

import ml_collections
from flax import traverse_util
from jax.sharding import Mesh

from skipvision_jax import sharding
from skipvision_jax.config import ModelConfig
from skipvision_jax.errors import CheckpointError
from skipvision_jax.experiment import build_model_config, run_config, run_text_format
from skipvision_jax.interop import hf_llava, llava_layout
from skipvision_jax.interop.parts import given_parts, load_parts
from skipvision_jax.train.checkpoint import Checkpointer
from skipvision_jax.train.state import build_state_plan

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RestoredRun:
    cfg: ml_collections.ConfigDict  # the run's train.py config
    text: object  # its text format (`data.pipeline.text_format`)
    model_cfg: ModelConfig
    params: dict


def restore_run(workdir: str, mesh: Mesh, rules=None, template: str | None = None) -> RestoredRun:
    """The params of the newest good checkpoint in a train.py workdir,
    restored onto `mesh` under `rules` (default: the run's own), whatever
    mesh trained them. Reads the workdir alone, never the training data;
    `template` prompts in another template than the run's."""
    cfg = run_config(workdir)
    text = run_text_format(workdir, cfg, template)
    model_cfg = build_model_config(cfg, text)
    rules = rules or sharding.logical_rules(cfg.get("mesh"))
    abstract = build_state_plan(cfg, model_cfg, mesh, rules)[2].abstract
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), cfg.train.keep_checkpoints)
    try:
        restored = checkpointer.restore_latest(abstract)
    finally:
        checkpointer.close()
    if restored is None:
        raise CheckpointError(f"no checkpoint at {workdir}/checkpoints")
    return RestoredRun(cfg, text, model_cfg, restored[0].params)


def params_of_run(workdir: str, abstract_params: dict, mesh: Mesh, rules) -> dict:
    """The params of a run (`init.checkpoint`: LLaVA's stage 2 starts from
    stage 1's), which must have exactly our parameters and shapes."""
    run_params = traverse_util.flatten_dict(restore_run(workdir, mesh, rules).params, sep="/")
    ours = traverse_util.flatten_dict(abstract_params, sep="/")
    differ = sorted(
        path
        for path in ours.keys() | run_params.keys()
        if getattr(run_params.get(path), "shape", None) != getattr(ours.get(path), "shape", None)
    )
    if differ:
        raise ValueError(
            f"init.checkpoint: {workdir} does not have this model's parameters: {differ[:3]}{' ...' if len(differ) > 3 else ''}"
        )
    log.info("initialized from the params of %s", workdir)
    return traverse_util.unflatten_dict(run_params, sep="/")


def import_hf_weights(directory: str, params: dict, abstract_params: dict) -> dict:
    """`params` with every weight the HF directory has replaced by it (in place
    in its sharding); the parts transformers lacks (summary tokens, routers)
    keep their fresh initialization."""
    if llava_layout.is_llava_layout(hf_llava.read_config(directory)):
        prefixes, groups = llava_layout.LLAVA_PREFIXES, llava_layout.LLAVA_GROUPS
    else:
        prefixes, groups = hf_llava.HF_PREFIXES, hf_llava.HF_GROUPS
    imported, _ = hf_llava.load_params(directory, abstract_params, strict=False, groups=groups, prefixes=prefixes)
    log.info("initialized from %s", directory)
    return hf_llava.merge_into(params, imported)


def initial_params(cfg, params: dict, abstract_params: dict, mesh: Mesh, rules) -> dict:
    """A fresh run's params: `params` (the seed's), with a whole LLaVA
    (`init_from_hf`), the parts (`init.language_model`, `init.vision_tower`,
    `init.projector`) or a run's params (`init.checkpoint`) put in place."""
    init = cfg.get("init") or {}  # one of these is given (base_model_config checked)
    if init.get("checkpoint"):
        return params_of_run(init["checkpoint"], abstract_params, mesh, rules)
    if cfg.get("init_from_hf"):
        return import_hf_weights(cfg.init_from_hf, params, abstract_params)
    parts = given_parts(init)
    if parts:
        log.info("initialized from %s", parts)
        return load_parts(parts, params, abstract_params)
    return params
