"""``convert verify --format hf_internvl``: transformers ``InternVLForConditionalGeneration`` and the port
(:class:`idmr_jax.models.internvl.InternVLEmbedder`) on the same random inputs: a batch whose images have different
tile counts (row r's image has 1 tile for even r, 3 for odd r), right padded and left padded, and a text-only
batch; prints one line per output and returns the worst difference.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from idmr_jax.models.internvl import InternVLConfig
from idmr_jax.weights import mllm_verify
from idmr_jax.weights.internvl import KIND, load_hf_internvl


def tiles_per_row(batch: int) -> list[int]:
    """The tile count of each row's image in the verify batches: 1, 3, 1, 3, ..."""
    return [1 + 2 * (r % 2) for r in range(batch)]


def verify_inputs(cfg: InternVLConfig, *, batch: int = 2, text_len: int = 6, seed: int = 0, padding: str = "right"):
    """(tiles NHWC, ids, mask) of a random batch: row r holds one image of ``tiles_per_row(batch)[r]`` tiles (its
    image tokens after a random 1-token prefix, then random text); rows after the first are padded by a growing
    amount on `padding`'s side. The tiles of all rows are stacked in row order."""
    rng = np.random.default_rng(seed)
    size = cfg.vision.image_size
    tiles = tiles_per_row(batch)
    pixels = rng.standard_normal((sum(tiles), size, size, 3)).astype(np.float32)
    per_tile = cfg.tokens_per_image(size)
    length = 1 + max(tiles) * per_tile + text_len
    vocab = cfg.text.vocab_size
    ids = np.zeros((batch, length), np.int64)
    mask = np.zeros((batch, length), np.int64)
    for b in range(batch):
        n_pad = (b * (text_len - 1)) // max(batch - 1, 1)
        text = rng.integers(1, vocab, size=length).astype(np.int64)
        text[text == cfg.image_token_id] = (cfg.image_token_id + 1) % vocab
        n_img = tiles[b] * per_tile
        n_text = length - 1 - n_img - n_pad
        body = np.concatenate([text[:1], np.full(n_img, cfg.image_token_id), text[1:1 + n_text]])
        sl = slice(0, len(body)) if padding == "right" else slice(length - len(body), length)
        ids[b, sl], mask[b, sl] = body, 1
    return pixels, ids, mask


def verify(src: str | os.PathLike, *, port: str | os.PathLike | None = None, dtype: str = "float32",
           batch: int = 2, text_len: int = 6, seed: int = 0, out=None) -> tuple[float, dict[str, float]]:
    """Compares transformers' ``InternVLForConditionalGeneration`` (from_pretrained of `src`, strict) with the
    port (converted from `src` in memory, or restored from `port`, an ``import`` output) on three batches: images
    of 1 and 3 tiles with right-padded text, the same left-padded, text only. Hidden states and logits are compared
    on attended positions; the embedding is the last-attended-token pooling, L2-normalised. Returns
    (max abs diff, {output: diff}); prints one line per output to `out` (stdout by default).
    """
    src = Path(src)
    ref_model = mllm_verify.strict_reference("InternVLForConditionalGeneration", src)
    model, cfg = mllm_verify.load_port(src, port, dtype, kind=KIND, load_hf=load_hf_internvl)
    cases = {f"tiles+text/{padding}": verify_inputs(cfg, batch=batch, text_len=text_len, seed=seed, padding=padding)
             for padding in ("right", "left")}
    _, ids, mask = verify_inputs(cfg, batch=batch, text_len=text_len, seed=seed + 1)
    ids = np.where(ids == cfg.image_token_id, (cfg.image_token_id + 1) % cfg.text.vocab_size, ids)
    cases["text/right"] = (None, ids, mask)
    return mllm_verify.compare_pixel_cases(ref_model, model, cases, out=out)


# ``convert verify``'s entry (formats.FORMATS).
verify_format = mllm_verify.format_verify(verify)
