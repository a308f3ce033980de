"""Checks of a config against the devices it runs on, made before any data or model is built.

A batch size the mesh cannot shard otherwise fails only after the model is built and the first batch is placed,
as a JAX sharding or division error that names neither the config field nor the fix. :func:`check_config` turns
those cases into one ValueError naming the field, the mesh and what to use instead.
"""

from __future__ import annotations

import math

import jax
import ml_collections

from idmr_jax import precision
from idmr_jax import sharding as shd
from idmr_jax.losses.similarity import BATCH_AXES


def batch_axes(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The mesh axes the logical ``batch`` axis maps to under ``config.sharding.rules`` (the batch's sharding)."""
    target = shd.logical_to_pspec(("batch",), shd.rules_from_config(config))[0]
    return (target,) if isinstance(target, str) else tuple(target or ())


def check_config(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
                 process_count: int | None = None) -> None:
    """Raises ValueError when `config` cannot run on this job's devices; call it before building anything.

    Checked: ``config.sharding.mesh`` covers the devices; in train mode, ``config.data.batch_size`` is positive and
    a multiple of the devices on the batch's mesh axes (and of the process count, each process supplying an equal
    share), and divides into GradCache chunks (``config.loss.gradcache_chunk`` rows per device) if those are on;
    ``config.eval.batch_size`` is positive (evaluation rounds it up to the mesh size itself); ``config.precision`` and
    ``config.precision_overrides`` name a known policy, parts and dtypes. `num_devices` and
    `process_count` default to JAX's (tests pass their own).
    """
    precision.check(config)
    num_devices = jax.device_count() if num_devices is None else num_devices
    process_count = jax.process_count() if process_count is None else process_count
    mesh_config = dict(config.sharding.mesh)
    try:
        sizes = dict(zip(shd.MESH_AXES, shd.mesh_sizes(mesh_config, num_devices)))
    except ValueError as e:
        raise ValueError(f"config.sharding.mesh on {num_devices} devices: {e}") from None
    if "eval" in config and "batch_size" in config.eval:
        _check_positive("config.eval.batch_size", config.eval.batch_size)
    # Evaluation alone never reads the training batch: a run evaluated on other devices than it trained on must
    # not fail over a batch size it does not use.
    if config.get("mode", "train") == "train":
        _check_train_batch(config, sizes, process_count)


def _check_positive(field: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{field} = {value!r}: a batch size must be a positive integer")


def _check_train_batch(config: ml_collections.ConfigDict, sizes: dict[str, int], process_count: int) -> None:
    batch = config.data.batch_size
    _check_positive("config.data.batch_size", batch)
    mesh_text = ", ".join(f"{a}={n}" for a, n in sizes.items())
    axes = batch_axes(config)
    devices = math.prod(sizes[a] for a in axes)
    on_axes = f"{devices} devices on the batch axes ({', '.join(axes)})" if axes else "1 device (batch replicated)"
    multiple = math.lcm(devices, process_count)
    if batch % multiple:
        processes = f", split equally over {process_count} processes" if multiple != devices else ""
        raise ValueError(f"config.data.batch_size = {batch} does not shard over the mesh ({mesh_text}) -> "
                         f"{on_axes}{processes}: use a multiple of {multiple} "
                         f"(e.g. {_nearest_multiples(batch, multiple)})")
    chunk = config.get("loss", {}).get("gradcache_chunk", 0)
    if not isinstance(chunk, int) or chunk < 0:
        raise ValueError(f"config.loss.gradcache_chunk = {chunk!r}: use rows per device per chunk > 0, or 0 for no "
                         "GradCache")
    if chunk:
        # The loss cuts the batch into global chunks of `chunk` rows per device of its BATCH_AXES.
        chunk_devices = math.prod(sizes[a] for a in BATCH_AXES)
        rows = chunk * chunk_devices
        if batch % rows:
            raise ValueError(
                f"config.data.batch_size = {batch} does not divide into GradCache chunks of "
                f"config.loss.gradcache_chunk = {chunk} rows per device x {chunk_devices} devices on the mesh's "
                f"{', '.join(BATCH_AXES)} axes ({mesh_text}) = {rows} rows: use a batch size that is a multiple of "
                f"{rows} (e.g. {_nearest_multiples(batch, rows)}), or a gradcache_chunk that divides "
                f"{batch // chunk_devices} (the rows per device)")


def _nearest_multiples(value: int, multiple: int) -> str:
    """The multiples of `multiple` around `value`, e.g. ``8 or 16`` for 12 and 8; ``8`` for 6."""
    below, above = value // multiple * multiple, -(-value // multiple) * multiple
    return f"{below} or {above}" if below > 0 else f"{above}"
