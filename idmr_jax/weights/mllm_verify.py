"""The parts of ``convert verify`` that the MLLM formats (``hf_llava``, ``hf_internvl``, ``hf_qwen2vl``) share.

Each format's verify module builds its own random input batches ("cases", e.g. images + right-padded text, the
same left-padded, text only) and names how transformers and the port run one case; this module loads both sides
(:func:`strict_reference`, :func:`load_port`), runs the common outputs and compares them case by case
(:func:`compare_cases`):

* ``last_hidden_state`` ``[B, T, D]`` and ``logits`` ``[B, T, V]``, compared on attended positions only;
* ``embedding`` ``[B, D]``: the last attended token's hidden state, L2-normalised (what the embedders pool by
  default), compared in full.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from idmr_jax.weights import io
from idmr_jax.weights.llava import with_exec
from idmr_jax.weights.mapping import WeightMismatchError

Outputs = dict[str, np.ndarray]


def strict_reference(class_name: str, src: str | os.PathLike, *, ignore_missing: Callable[[str], bool] | None = None):
    """transformers' ``class_name`` from_pretrained(`src`) in float32, eval mode; a missing (unless
    `ignore_missing` accepts its name), unexpected or misshapen tensor raises :class:`WeightMismatchError`."""
    import transformers

    if not os.path.isdir(src):  # else transformers would take the path for a hub id
        raise FileNotFoundError(f"{src}: no such checkpoint folder")
    model, info = getattr(transformers, class_name).from_pretrained(src, output_loading_info=True, dtype="float32")
    missing = [k for k in info["missing_keys"] if ignore_missing is None or not ignore_missing(k)]
    if missing or info["unexpected_keys"] or info.get("mismatched_keys"):
        raise WeightMismatchError(f"{src}: transformers {class_name}: missing {missing[:8]}, "
                                  f"unexpected {list(info['unexpected_keys'])[:8]}, "
                                  f"mismatched {list(info.get('mismatched_keys') or [])[:8]}")
    return model.eval()


def load_port(src: Path, port: str | os.PathLike | None, dtype: str, *, kind: str,
              load_hf: Callable[..., tuple[Any, Any]]) -> tuple[Any, Any]:
    """(model, config) of the port: ``load_hf(src, dtype=dtype)`` converted in memory when `port` is None, else
    restored from `port` (an ``import`` output, which must hold a `kind` model) with `dtype` applied."""
    if port is None:
        return load_hf(src, dtype=dtype)
    saved_kind, saved = io.load_model_config(port)
    if saved_kind != kind:
        raise WeightMismatchError(f"{port}: holds a {saved_kind!r} model, not {kind}")
    exec_cfg = with_exec(saved, {"dtype": dtype})
    return io.restore_model(port, overrides={"vision": exec_cfg.vision, "text": exec_cfg.text})


def last_attended(mask: np.ndarray) -> np.ndarray:
    """The index of each row's last attended position (either padding side)."""
    return np.array([np.flatnonzero(m)[-1] for m in mask])


def reference_dict(hidden: np.ndarray, logits: np.ndarray, mask: np.ndarray) -> Outputs:
    """The compared outputs from transformers' last hidden state and logits (the embedding: the last attended
    token's hidden state, L2-normalised)."""
    rows = hidden[np.arange(len(mask)), last_attended(mask)]
    pooled = rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)
    return dict(last_hidden_state=hidden, logits=logits, embedding=pooled)


def reference_outputs(model, pixels: np.ndarray | None, ids: np.ndarray, mask: np.ndarray) -> Outputs:
    """transformers' outputs for NHWC `pixels` (None: text only) given as ``pixel_values`` (LLaVA, InternVL)."""
    import torch

    px = None if pixels is None else torch.from_numpy(pixels).permute(0, 3, 1, 2)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), pixel_values=px, attention_mask=torch.from_numpy(mask),
                    output_hidden_states=True)
    return reference_dict(out.hidden_states[-1].numpy(), out.logits.numpy(), mask)


@nnx.jit
def _port_run(m, pixels, ids, mask):
    from idmr_jax.models import pooling

    hidden = m.hidden_states(ids, mask, pixels)
    # The embedder's own path when it pools the last token (what the reference does), else that pooling.
    emb = m.embed(ids, mask, pixels) if (m.cfg.pooling, m.cfg.normalize) == ("last", True) else \
        pooling.pool(hidden, mask, method="last")
    return dict(last_hidden_state=hidden, logits=m.lm.logits(hidden), embedding=emb)


def as_numpy(outputs: Mapping[str, Any]) -> Outputs:
    """Device arrays -> float32 numpy arrays."""
    import jax

    return {k: np.asarray(jax.device_get(v), np.float32) for k, v in outputs.items()}


def port_outputs(model, pixels: np.ndarray | None, ids: np.ndarray, mask: np.ndarray) -> Outputs:
    """The port's outputs (jitted) for NHWC `pixels` (None: text only), through the embedder's
    ``hidden_states(ids, mask, pixels)`` / ``embed`` (LLaVA, InternVL)."""
    import jax.numpy as jnp

    px = None if pixels is None else jnp.asarray(pixels)
    return as_numpy(_port_run(model, px, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))


def compare_cases(cases: Mapping[str, tuple], reference: Callable[..., Outputs], port: Callable[..., Outputs], *,
                  out=None, key_width: int = 36) -> tuple[float, dict[str, float]]:
    """Runs ``reference(*case)`` and ``port(*case)`` on every case (a tuple whose last two items are the ids and the
    attention mask) and compares their outputs: hidden states and logits on attended positions, the embedding in
    full. Prints ``<output>[<case>] shape=... max_abs_diff=...`` per output to `out` (stdout by default) and returns
    (the worst difference, NaN first; {output[case]: difference})."""
    out = out or sys.stdout
    diffs: dict[str, float] = {}
    for case, arrays in cases.items():
        ref, got = reference(*arrays), port(*arrays)
        valid = arrays[-1].astype(bool)
        for name, r in ref.items():
            g = got[name]
            if g.shape != r.shape:
                raise WeightMismatchError(f"verify: {name} has shape {g.shape} in the port, {r.shape} in torch")
            d = np.abs(g.astype(np.float64) - r.astype(np.float64))
            d = d[valid] if name != "embedding" else d
            key = f"{name}[{case}]"
            diffs[key] = float(np.max(d)) if np.isfinite(d).all() else float("nan")
            print(f"{key:{key_width}s} shape={tuple(r.shape)} max_abs_diff={diffs[key]:.3e}", file=out)
    out.flush()
    worst = max(diffs.values(), key=lambda v: float("inf") if np.isnan(v) else v)
    return worst, diffs


def compare_pixel_cases(ref_model, model, cases: Mapping[str, tuple], *, out=None) -> tuple[float, dict[str, float]]:
    """:func:`compare_cases` for the embedders that take NHWC pixels (cases ``(pixels or None, ids, mask)``):
    :func:`reference_outputs` of `ref_model` against :func:`port_outputs` of `model`."""
    return compare_cases(cases, lambda *case: reference_outputs(ref_model, *case),
                         lambda *case: port_outputs(model, *case), out=out)


def format_verify(verify: Callable[..., tuple[float, dict[str, float]]]) -> Callable[..., tuple[float, dict]]:
    """A format's `verify` (``verify(src, port=, dtype=, batch=, text_len=, seed=)``) with the signature of
    ``idmr_jax.weights.formats.Format.verify``. The reference is from_pretrained(src), so its config.json is the
    only config (`config` is not used); the command line applies `tol`."""

    def run(src, *, port, dtype, tol, config, batch, text_len, seed) -> tuple[float, dict[str, float]]:
        del tol, config
        return verify(src, port=port, dtype=dtype, batch=batch, text_len=text_len, seed=seed)

    return run
