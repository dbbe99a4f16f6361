"""Device mesh, logical-axis rules, shardings and multi-host start-up.

Every weight carries logical axis names (`nn.with_logical_partitioning`);
activations and KV caches name theirs through `constrain`. One table,
`DEFAULT_RULES`, maps them to the mesh axes:

    data    pure data parallelism: the batch is split, weights are replicated
    fsdp    the batch is split AND every weight's `embed` dimension is split
            (ZeRO-3 style: XLA all-gathers a layer's weights where it runs)
    tensor  Megatron-style: heads, KV heads, the FFN hidden and the vocabulary
            are split; activations stay whole over it

JAX's SPMD partitioner does the rest: `jax.jit` with `NamedSharding`s in and
out. A dimension that the mesh does not divide evenly is replicated instead
(with a warning for weights), so odd sizes still run.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis (or axes). Logical names not listed are replicated.
# flax takes the first rule whose mesh axis is still free in that array, so
# rules from the config, put first, override these.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
)


# Logical names of activations (and KV caches, see kvcache.constrain_cache).
# `embed` is deliberately absent: hidden states stay whole along the model
# dimension, which FSDP shards only in the weights.
HIDDEN_ACTIVATION = ("batch", None, None)  # [B, L, D]
HEADS_ACTIVATION = ("batch", None, "heads", None)  # [B, L, H, Dh]
KV_ACTIVATION = ("batch", None, "kv_heads", None)  # [B, L, KV, Dh]
CACHE_KV = ("batch", "kv_heads", None, None)  # the KV cache, head-major [B, KV, S, Dh]
CACHE_SLOTS = ("batch", "kv_heads", None)  # its slot positions, validity and scores [B, KV, S]


def logits_axes(ndim: int) -> tuple[str | None, ...]:
    """[B, ..., V]: batch and vocabulary split, positions whole."""
    return ("batch",) + (None,) * (ndim - 2) + ("vocab",)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with at most one -1 resolved to the remaining devices."""
    sizes = [int(mesh_cfg[axis]) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one of {MESH_AXES} may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh: {num_devices} devices are not divisible by {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, but there are {num_devices}"
        )
    return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    # Auto axes: shardings are hints that XLA's partitioner propagates.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_rules(mesh_cfg=None) -> tuple[tuple[str, Any], ...]:
    """The config's `mesh.rules` (pairs of logical name, mesh axis / list / None) before the defaults."""
    extra = () if mesh_cfg is None else tuple(mesh_cfg.get("rules", ()))
    normalized = []
    for rule in extra:
        if len(rule) != 2:
            raise ValueError(f"mesh.rules: each rule is (logical_axis, mesh_axes), got {rule!r}")
        name, target = rule
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        unknown = [t for t in targets if t not in MESH_AXES]
        if unknown:
            raise ValueError(f"mesh.rules: {name!r} maps to unknown mesh axes {unknown}; the mesh has {MESH_AXES}")
        normalized.append((name, targets if len(targets) > 1 else (targets[0] if targets else None)))
    return tuple(normalized) + DEFAULT_RULES


def _axis_size(mesh_axis_sizes: dict[str, int], entry) -> int:
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else entry
    return math.prod(mesh_axis_sizes[n] for n in names)


def fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh_axis_sizes: dict[str, int]) -> PartitionSpec:
    """`spec` with every entry that does not divide its dimension replaced by None."""
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    return PartitionSpec(*(e if dim % _axis_size(mesh_axis_sizes, e) == 0 else None for e, dim in zip(entries, shape)))


def tree_shardings(boxed_abstract, mesh: Mesh, rules) -> Any:
    """NamedShardings for a tree of (abstract) values that may carry logical
    partitioning boxes; unboxed leaves are replicated."""
    mesh_axis_sizes = dict(mesh.shape)
    logical_specs = nn.get_partition_spec(boxed_abstract)
    mesh_specs = nn.logical_to_mesh(logical_specs, rules)
    values = nn.unbox(boxed_abstract)

    def fitted(path, spec, value):
        spec = spec if isinstance(spec, PartitionSpec) else PartitionSpec()
        fit = fit_spec(spec, value.shape, mesh_axis_sizes)
        if fit != PartitionSpec(*(tuple(spec) + (None,) * (len(value.shape) - len(spec)))):
            log.warning(
                "%s %s: not divisible by the mesh for %s; replicating those dimensions",
                jax.tree_util.keystr(path),
                value.shape,
                spec,
            )
        return NamedSharding(mesh, fit)

    return jax.tree_util.tree_map_with_path(
        fitted, mesh_specs, values, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None
    )


@dataclasses.dataclass
class ShardedInit:
    """A pytree's shapes and shardings before any value exists.

    `abstract` (ShapeDtypeStructs carrying shardings) is what a checkpoint
    restores into, resharding on load; `create()` initializes straight into
    the shardings, never holding a full copy on one device."""

    abstract: Any
    shardings: Any
    create: Callable[[], Any]


def plan_init(init_boxed: Callable[[], Any], mesh: Mesh, rules) -> ShardedInit:
    """`init_boxed` returns a pytree whose leaves may be boxed with logical axis names."""
    boxed = jax.eval_shape(init_boxed)
    shardings = tree_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(
        lambda value, s: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=s), nn.unbox(boxed), shardings
    )
    # Called outside `activate`: the out_shardings place every leaf, and flax's
    # per-parameter constraints would see DenseGeneral's flattened init shapes.
    return ShardedInit(abstract, shardings, lambda: jax.jit(lambda: nn.unbox(init_boxed()), out_shardings=shardings)())


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) dimension over `data` x `fsdp`; the rest whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def rows_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Batch sharding where the mesh divides the rows, else replicated (e.g. one prompt)."""
    return NamedSharding(mesh, fit_spec(batch_sharding(mesh, len(shape)).spec, tuple(shape), dict(mesh.shape)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# The (mesh, rules) that `constrain` reads while a jitted function traces; set
# by `activate`. Deliberately not jax.set_mesh: under a global mesh flax also
# constrains each parameter inside its shape check, where DenseGeneral's
# multi-axis kernels have a flattened rank (parameters are placed by the jit
# shardings instead).
_ACTIVE: contextvars.ContextVar[tuple[Mesh, Any] | None] = contextvars.ContextVar("skipvision_sharding", default=None)


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    """`with_sharding_constraint` by logical names, active only under `activate`
    (a no-op for single-device use); dimensions the mesh does not divide stay whole."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = fit_spec(nn.logical_to_mesh_axes(logical_axes, rules), x.shape, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


@contextlib.contextmanager
def activate(mesh: Mesh, rules) -> Iterator[None]:
    """The mesh and rules that `constrain` applies while tracing inside this block."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh, global_rows: int) -> dict[str, jax.Array]:
    """This process's rows (see `process_rows`) assembled into global arrays sharded over the batch axes."""
    out = {}
    for key, value in local.items():
        value = np.asarray(value)
        out[key] = jax.make_array_from_process_local_data(
            batch_sharding(mesh, value.ndim), value, (global_rows,) + value.shape[1:]
        )
    return out


def process_rows(mesh: Mesh, global_rows: int) -> tuple[int, int]:
    """The contiguous rows [start, stop) of a global batch that this process's
    devices hold under `batch_sharding` (all of them if the batch axes do not
    cross processes)."""
    if global_rows % _axis_size(dict(mesh.shape), BATCH_AXES):
        raise ValueError(
            f"train.batch_size: {global_rows} is not divisible by the mesh's data x fsdp = {_axis_size(dict(mesh.shape), BATCH_AXES)}"
        )
    slices = batch_sharding(mesh).addressable_devices_indices_map((global_rows,)).values()
    starts = sorted({s[0].start or 0 for s in slices})
    stops = sorted({s[0].stop if s[0].stop is not None else global_rows for s in slices})
    start, stop = starts[0], stops[-1]
    if sum(b - a for a, b in zip(starts, stops)) != stop - start:
        raise ValueError(
            "mesh: this process's devices hold non-contiguous batch rows; order the mesh so that each process owns a block"
        )
    return start, stop


def per_device_bytes(tree) -> int:
    """Bytes of `tree` on the most loaded device (sharded arrays count their shard)."""
    totals: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return max(totals.values(), default=0)


def initialize_distributed(
    coordinator: str | None, num_processes: int | None, process_id: int | None, auto: bool
) -> None:
    """`jax.distributed.initialize` with explicit flags, or with `auto` its own
    detection (TPU pods, SLURM, Open MPI, the JAX_COORDINATOR_ADDRESS environment)."""
    if coordinator is None and not auto:
        if num_processes is not None or process_id is not None:
            raise ValueError("--num-processes/--process-id need --coordinator (or --distributed to detect the cluster)")
        return
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    log.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
