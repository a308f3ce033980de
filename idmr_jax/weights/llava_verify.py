"""``convert verify --format hf_llava``: transformers ``LlavaForConditionalGeneration`` and the port
(:class:`idmr_jax.models.llava.LlavaEmbedder`) on the same random inputs (image + text rows with right padding, the
same with left padding, and a text-only batch); prints one line per output and returns the worst difference.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from idmr_jax.models.llava import LlavaConfig
from idmr_jax.weights import mllm_verify
from idmr_jax.weights.llava import load_hf_llava


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


def verify(src: str | os.PathLike, *, port: str | os.PathLike | None = None, dtype: str = "float32",
           batch: int = 2, text_len: int = 6, seed: int = 0, out=None) -> tuple[float, dict[str, float]]:
    """Compares transformers' ``LlavaForConditionalGeneration`` (from_pretrained of `src`, strict) with the port
    (converted from `src` in memory, or restored from `port`, an ``import`` output) on three batches: image+text
    right-padded, image+text left-padded, text only (right-padded). Hidden states and logits are compared on real
    (attended) positions; the embedding is the last-attended-token pooling, L2-normalised. Returns
    (max abs diff, {output: diff}); prints one line per output to `out` (stdout by default).
    """
    src = Path(src)
    ref_model = mllm_verify.strict_reference("LlavaForConditionalGeneration", src,
                                             ignore_missing=lambda k: k.endswith("position_ids"))
    model, cfg = mllm_verify.load_port(src, port, dtype, kind="llava", load_hf=load_hf_llava)

    cases = {}
    for padding in ("right", "left"):
        cases[f"image+text/{padding}"] = verify_inputs(cfg, batch=batch, text_len=text_len, seed=seed,
                                                       padding=padding)
    _, ids, mask = verify_inputs(cfg, batch=batch, text_len=text_len, seed=seed + 1)
    ids = np.where(ids == cfg.image_token_id, (cfg.image_token_id + 1) % cfg.text.vocab_size, ids)
    cases["text/right"] = (None, ids, mask)
    return mllm_verify.compare_pixel_cases(ref_model, model, cases, out=out)


# ``convert verify``'s entry (formats.FORMATS).
verify_format = mllm_verify.format_verify(verify)
