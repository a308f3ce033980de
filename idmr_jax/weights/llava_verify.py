"""``convert verify --format hf_llava``: transformers ``LlavaForConditionalGeneration`` and the port
(:class:`idmr_jax.models.llava.LlavaEmbedder`) on the same random inputs (image + text rows with right padding, the
same with left padding, and a text-only batch); prints one line per output and returns the worst difference.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from flax import nnx

from idmr_jax.models.llava import LlavaConfig, LlavaEmbedder
from idmr_jax.weights import io
from idmr_jax.weights.llava import load_hf_llava, with_exec
from idmr_jax.weights.mapping import WeightMismatchError


def _torch_reference(src: Path):
    import transformers

    model, info = transformers.LlavaForConditionalGeneration.from_pretrained(
        src, output_loading_info=True, dtype="float32")
    missing = [k for k in info["missing_keys"] if not k.endswith("position_ids")]
    if missing or info["unexpected_keys"] or info.get("mismatched_keys"):
        raise WeightMismatchError(f"{src}: transformers LlavaForConditionalGeneration: missing {missing[:8]}, "
                                  f"unexpected {list(info['unexpected_keys'])[:8]}, "
                                  f"mismatched {list(info.get('mismatched_keys') or [])[:8]}")
    return model.eval()


def verify_inputs(cfg: LlavaConfig, *, batch: int = 2, text_len: int = 6, seed: int = 0, padding: str = "right"):
    """(pixels NHWC, ids, mask) of a random batch: every row holds one image (its image tokens after a random
    1-token prefix, then random text); rows after the first are padded by a growing amount on `padding`'s side."""
    rng = np.random.default_rng(seed)
    size = cfg.vision.image_size
    pixels = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    n_img = cfg.image_tokens(cfg.vision.grid)
    length = 1 + n_img + text_len
    vocab = cfg.text.vocab_size
    ids = rng.integers(1, vocab, size=(batch, length)).astype(np.int64)
    ids[ids == cfg.image_token_id] = (cfg.image_token_id + 1) % vocab
    mask = np.ones((batch, length), np.int64)
    for b in range(batch):
        n_pad = (b * (text_len - 1)) // max(batch - 1, 1)
        body = np.concatenate([ids[b, :1], np.full(n_img, cfg.image_token_id), ids[b, 1 + n_img:length - n_pad]])
        row = np.zeros(length, np.int64)
        row_mask = np.zeros(length, np.int64)
        sl = slice(0, len(body)) if padding == "right" else slice(length - len(body), length)
        row[sl], row_mask[sl] = body, 1
        ids[b], mask[b] = row, row_mask
    return pixels, ids, mask


def _last_attended(mask: np.ndarray) -> np.ndarray:
    return np.array([np.flatnonzero(m)[-1] for m in mask])


def _reference_outputs(model, pixels, ids, mask) -> dict[str, np.ndarray]:
    import torch

    px = None if pixels is None else torch.from_numpy(pixels).permute(0, 3, 1, 2)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), pixel_values=px, attention_mask=torch.from_numpy(mask),
                    output_hidden_states=True)
    hidden = out.hidden_states[-1].numpy()
    rows = hidden[np.arange(len(ids)), _last_attended(mask)]
    pooled = rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)
    return dict(last_hidden_state=hidden, logits=out.logits.numpy(), embedding=pooled)


@nnx.jit
def _port_run(m: LlavaEmbedder, pixels, ids, mask):
    from idmr_jax.models import pooling

    hidden = m.hidden_states(ids, mask, pixels)
    # The embedder's own path when it pools the last token (what the reference does), else that pooling.
    emb = m.embed(ids, mask, pixels) if (m.cfg.pooling, m.cfg.normalize) == ("last", True) else \
        pooling.pool(hidden, mask, method="last")
    return dict(last_hidden_state=hidden, logits=m.lm.logits(hidden), embedding=emb)


def _port_outputs(model: LlavaEmbedder, pixels, ids, mask) -> dict[str, np.ndarray]:
    import jax
    import jax.numpy as jnp

    px = None if pixels is None else jnp.asarray(pixels)
    out = _port_run(model, px, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    return {k: np.asarray(jax.device_get(v), np.float32) for k, v in out.items()}


def verify(src: str | os.PathLike, *, port: str | os.PathLike | None = None, dtype: str = "float32",
           batch: int = 2, text_len: int = 6, seed: int = 0, out=None) -> tuple[float, dict[str, float]]:
    """Compares transformers' ``LlavaForConditionalGeneration`` (from_pretrained of `src`, strict) with the port
    (converted from `src` in memory, or restored from `port`, an ``import`` output) on three batches: image+text
    right-padded, image+text left-padded, text only (right-padded). Hidden states and logits are compared on real
    (attended) positions; the embedding is the last-attended-token pooling, L2-normalised. Returns
    (max abs diff, {output: diff}); prints one line per output to `out` (stdout by default).
    """
    out = out or sys.stdout
    src = Path(src)
    ref_model = _torch_reference(src)
    if port is not None:
        kind, _ = io.load_model_config(port)
        if kind != "llava":
            raise WeightMismatchError(f"{port}: holds a {kind!r} model, not llava")
        _, saved = io.load_model_config(port)
        exec_cfg = with_exec(saved, {"dtype": dtype})
        model, cfg = io.restore_model(port, overrides={"vision": exec_cfg.vision, "text": exec_cfg.text})
    else:
        model, cfg = load_hf_llava(src, dtype=dtype)

    cases = {}
    for padding in ("right", "left"):
        cases[f"image+text/{padding}"] = verify_inputs(cfg, batch=batch, text_len=text_len, seed=seed,
                                                       padding=padding)
    _, ids, mask = verify_inputs(cfg, batch=batch, text_len=text_len, seed=seed + 1)
    ids = np.where(ids == cfg.image_token_id, (cfg.image_token_id + 1) % cfg.text.vocab_size, ids)
    cases["text/right"] = (None, ids, mask)

    diffs: dict[str, float] = {}
    for case, (pixels, ids, mask) in cases.items():
        ref = _reference_outputs(ref_model, pixels, ids, mask)
        got = _port_outputs(model, pixels, ids, mask)
        valid = mask.astype(bool)
        for name, r in ref.items():
            g = got[name]
            if g.shape != r.shape:
                raise WeightMismatchError(f"verify: {name} has shape {g.shape} in the port, {r.shape} in torch")
            d = np.abs(g.astype(np.float64) - r.astype(np.float64))
            d = d[valid] if name != "embedding" else d
            key = f"{name}[{case}]"
            diffs[key] = float(np.max(d)) if np.isfinite(d).all() else float("nan")
            print(f"{key:36s} shape={tuple(r.shape)} max_abs_diff={diffs[key]:.3e}", file=out)
    out.flush()
    worst = max(diffs.values(), key=lambda v: float("inf") if np.isnan(v) else v)
    return worst, diffs
