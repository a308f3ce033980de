"""Logical axis names -> mesh axes, activation constraints and sharded initialisation.

Modules annotate params with logical names (``nnx.with_partitioning(init, ("embed", "mlp"))``) and
activations with :func:`constrain`. The mapping from logical names to the mesh axes
``(data, fsdp, model)`` lives in the config (``config.sharding.rules``), as in MaxText / flax lm1b.
Outside an :func:`axis_rules` context :func:`constrain` is a no-op, so models run unchanged on one device.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")

# Logical name -> mesh axis (or tuple of axes, or None = replicated). First match wins.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),  # GQA key/value heads (replicated by divisible_pspec when fewer than the model axis)
    ("qkv", "model"),
    ("kv", None),
    ("vocab", "model"),
    ("length", None),
    ("layers", None),
    ("patch", None),
    ("channels", None),
    ("vision_embed", "fsdp"),
    ("proj", None),
)

Rules = Sequence[tuple[str, Any]]
_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("idmr_axis_rules", default=None)


def mesh_sizes(shape: dict[str, int] | Sequence[int], num_devices: int) -> list[int]:
    """The (data, fsdp, model) sizes of `shape` on `num_devices` devices, its -1 entry resolved.

    A ValueError, in the terms of the requested shape, when an axis name is unknown or missing, a size is neither
    positive nor -1, or the sizes cannot cover exactly `num_devices` devices.
    """
    if isinstance(shape, dict):
        unknown, missing = set(shape) - set(MESH_AXES), set(MESH_AXES) - set(shape)
        if unknown or missing:
            raise ValueError(f"mesh {dict(shape)} must name exactly the axes {MESH_AXES}; "
                             f"unknown: {sorted(unknown)}, missing: {sorted(missing)}")
        requested = dict(shape)
    elif len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh {list(shape)} must give {len(MESH_AXES)} sizes, for the axes {MESH_AXES}")
    else:
        requested = dict(zip(MESH_AXES, shape))
    sizes = [int(requested[a]) for a in MESH_AXES]
    if any(s < 1 and s != -1 for s in sizes) or sizes.count(-1) > 1:
        raise ValueError(f"mesh {requested}: every size must be positive, except at most one -1 (the devices left "
                         "over)")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh {requested}: the -1 axis takes the devices left over, but the other axes' "
                             f"product {known} does not divide the {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    elif known != num_devices:
        raise ValueError(f"mesh {requested} needs {known} devices, have {num_devices}: make the sizes' product "
                         f"{num_devices}, or set one axis to -1 to take the devices left over")
    return sizes


def make_mesh(shape: dict[str, int] | Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a (data, fsdp, model) mesh with Auto axes; a -1 entry takes the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_sizes(shape, len(devices))
    # Auto axes: sharding constraints and GSPMD propagation (jax.make_mesh defaults to Explicit now).
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(sizes), devices=devices)


def mesh_from_config(config) -> Mesh:
    """The mesh of ``config.sharding.mesh`` over all devices."""
    return make_mesh(dict(config.sharding.mesh))


def rules_from_config(config) -> tuple[tuple[str, Any], ...]:
    """The logical axis rules of ``config.sharding.rules`` as a tuple of (logical name, mesh axes) pairs."""
    return tuple(tuple(r) for r in config.sharding.rules)


def logical_to_pspec(axes: Sequence[str | None] | None, rules: Rules) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once per spec."""
    if axes is None:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in axes:
        target = table.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        targets = tuple(t for t in targets if t not in used)
        used.update(targets)
        out.append(targets[0] if len(targets) == 1 else (targets or None))
    return PartitionSpec(*out)


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules: Rules):
    """Activates `mesh` and logical `rules` for :func:`constrain` inside the block (also under jit tracing)."""
    token = _ACTIVE.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op outside :func:`axis_rules`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_pspec(axes, rules)))


def compute_sharding(param: nnx.Variable, dtype: Any, *, stacked_at: int | None = None) -> NamedSharding | None:
    """The sharding to give `param`'s copy cast to the compute `dtype`: the parameter's own (its logical names
    through the active :func:`axis_rules`, as :func:`state_shardings` stores it), so that XLA casts the local shard
    and all-gathers the compute dtype (bf16: half the bytes of a float32 master weight; MaxText does the same)
    instead of gathering the float32 weight and keeping a full float32 copy. `stacked_at`: the copy has a new,
    unsharded axis there (:func:`~idmr_jax.models.layers.fused_dense` stacks kernels).

    None, i.e. leave the cast alone, where it changes nothing or there is nothing to keep: `dtype` is the
    parameter's own (float32 compute, frozen weights stored in bf16), no rules are active, the parameter has no
    logical names or they do not match its shape, or no mesh axis of size > 1 splits it."""
    active = _ACTIVE.get()
    names = param.get_metadata().get("out_sharding")
    value = param.get_value()
    if active is None or not names or jnp.dtype(dtype) == value.dtype:
        return None
    shape = value.shape if stacked_at is None else value.shape[:stacked_at] + (1,) + value.shape[stacked_at:]
    if stacked_at is not None:
        names = tuple(names[:stacked_at]) + (None,) + tuple(names[stacked_at:])
    mesh, rules = active
    if len(names) != len(shape):
        return None
    spec = divisible_pspec(logical_to_pspec(names, rules), shape, mesh)
    if not any(mesh.shape[a] > 1 for a in pspec_axes(spec)):
        return None
    return NamedSharding(mesh, spec)


def entry_axes(entry: str | Sequence[str] | None) -> tuple[str, ...]:
    """The mesh axis names of one ``PartitionSpec`` entry (a name, a tuple of names or None)."""
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def pspec_axes(spec: PartitionSpec) -> list[str]:
    """Every mesh axis name that `spec` uses, in order."""
    return [a for entry in spec for a in entry_axes(entry)]


def gathered_for_use(x: jax.Array, sharding: NamedSharding) -> jax.Array:
    """A weight's compute copy `x`, stored in `sharding`, all-gathered over the mesh axes of the "batch" rule (what a
    matmul against batch-sharded activations needs; tensor-parallel axes stay split). On CPU a 16-bit float is
    gathered as its uint16 bits: XLA:CPU's float normalisation runs a bf16 all-gather in float32 (a full float32
    copy on every device, the cost this gather avoids); the bits, hence the values, are the same."""
    rules = (_ACTIVE.get() or (None, DEFAULT_RULES))[1]
    batch_axes = set(pspec_axes(logical_to_pspec(("batch",), rules)))
    spec = PartitionSpec(*(_drop_axes(entry, batch_axes) for entry in sharding.spec))
    target = NamedSharding(sharding.mesh, spec)
    bits = jnp.dtype(f"uint{8 * x.dtype.itemsize}") if x.dtype.itemsize < 4 else None
    if bits is None or sharding.mesh.devices.flat[0].platform != "cpu":
        return jax.lax.with_sharding_constraint(x, target)
    # Constrained to `sharding` and then to `target`: the reshard (the gather) sits between them, on the uint16 bits.
    stored = jax.lax.with_sharding_constraint(jax.lax.bitcast_convert_type(x, bits), sharding)
    gathered = jax.lax.with_sharding_constraint(stored, target)
    return jax.lax.bitcast_convert_type(gathered, x.dtype)


def _drop_axes(entry, axes: set[str]):
    kept = tuple(a for a in entry_axes(entry) if a not in axes)
    return kept[0] if len(kept) == 1 else (kept or None)


def sharded_cast(x: jax.Array, dtype: Any, sharding: NamedSharding | None) -> jax.Array:
    """``x.astype(dtype)`` of a weight `x`, cast in `sharding` (from :func:`compute_sharding`; None: a plain cast)
    and then gathered for use (:func:`gathered_for_use`). Its gradient is returned in `x`'s dtype *before* it is
    constrained to `sharding`, so the cross-device reduction of a float32 master weight's gradient can run in
    float32 rather than in the compute dtype."""
    if sharding is None or jnp.dtype(dtype) == x.dtype:
        return x.astype(dtype)
    return _sharded_cast(jnp.dtype(dtype), x.dtype, sharding, x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _sharded_cast(dtype, source_dtype, sharding, x):
    return gathered_for_use(jax.lax.with_sharding_constraint(x.astype(dtype), sharding), sharding)


def _sharded_cast_fwd(dtype, source_dtype, sharding, x):
    return _sharded_cast(dtype, source_dtype, sharding, x), None


def _sharded_cast_bwd(dtype, source_dtype, sharding, _, g):
    return (jax.lax.with_sharding_constraint(g.astype(source_dtype), sharding),)


_sharded_cast.defvjp(_sharded_cast_fwd, _sharded_cast_bwd)


def divisible_pspec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Replicates every dimension whose size the assigned mesh axes do not divide (e.g. BERT's 30523 vocab)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = entry_axes(axes)
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        out.append(axes if dim % size == 0 else None)
    return PartitionSpec(*out)


def state_shardings(state: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for every variable of `state` from its logical `out_sharding` metadata.

    Works on any pytree holding nnx Variables (a module state, an optimiser state, a train state); leaves
    without metadata are replicated, and dimensions the mesh does not divide stay unsharded.
    """

    def one(var):
        names = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
        spec = logical_to_pspec(names, rules)
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        shape = getattr(value, "shape", None)  # None for placeholders such as optax's MaskedNode
        if shape is not None:
            spec = divisible_pspec(spec, shape, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_arrays(state: Any, mesh: Mesh, rules: Rules) -> Any:
    """`state` (a pytree of arrays or ``jax.ShapeDtypeStruct``, nnx Variables kept) with every array a
    ``jax.ShapeDtypeStruct`` carrying the sharding of :func:`state_shardings`: a target to compile against or
    restore into, with nothing allocated."""

    def one(sharding, subtree):  # `subtree`: a Variable (its value inside) or a bare array
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), subtree)

    return jax.tree.map(one, state_shardings(state, mesh, rules), state)


def sharded_init(build: Callable[[], nnx.Module], mesh: Mesh, rules: Rules) -> nnx.Module:
    """Builds a module directly into its sharded layout: eval_shape, then jit with out_shardings.

    A full-size model therefore never materialises on a single device.
    """
    abstract = nnx.eval_shape(build)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    def init_state():
        return nnx.split(build())[1]

    state = jax.jit(init_state, out_shardings=shardings)()
    return nnx.merge(graphdef, state)
