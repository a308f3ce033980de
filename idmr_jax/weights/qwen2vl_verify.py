"""``convert verify --format hf_qwen2vl``: transformers ``Qwen2VLForConditionalGeneration`` and the port
(:class:`idmr_jax.models.qwen2vl.Qwen2VLEmbedder`, packed path) on the same random inputs: every row holds one
image, the images of different sizes (so different token counts and M-RoPE grids), right-padded, the same
left-padded, and a text-only batch; prints one line per output and returns the worst difference.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from flax import nnx

from idmr_jax.models import pooling
from idmr_jax.models import qwen2vl_inputs as inputs
from idmr_jax.models.qwen2vl import Qwen2VLConfig, Qwen2VLEmbedder, packed_inputs
from idmr_jax.weights import mllm_verify
from idmr_jax.weights.qwen2vl import load_hf_qwen2vl

# Image sizes in units of patch_size * merge (28 px for the released models), cycled over the rows: different
# areas and aspect ratios, so rows hold different numbers of image tokens.
IMAGE_UNITS = ((2, 2), (2, 3), (1, 2), (3, 1))


def torch_reference(src: Path):
    """transformers' model from `src`, float32, eval mode; a missing / unexpected / misshapen tensor raises."""
    return mllm_verify.strict_reference("Qwen2VLForConditionalGeneration", src)


def verify_inputs(cfg: Qwen2VLConfig, *, batch: int = 2, text_len: int = 6, seed: int = 0, padding: str = "right"):
    """(patches, grid_thw, ids, mask) of a random batch: row b holds image b (sizes cycling through
    ``IMAGE_UNITS``) as ``prefix <vision_start> image tokens <vision_end> text``; rows are padded on `padding`'s
    side to the longest, and the text of later rows is cut by a growing amount."""
    rng = np.random.default_rng(seed)
    v = cfg.vision
    unit = v.patch_size * v.spatial_merge_size
    images = [rng.standard_normal((hu * unit, wu * unit, v.in_channels)).astype(np.float32)
              for hu, wu in (IMAGE_UNITS[b % len(IMAGE_UNITS)] for b in range(batch))]
    patches, grid_thw = inputs.patchify_images(images, patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                                               temporal_patch_size=v.temporal_patch_size)
    vocab = cfg.text.vocab_size
    special = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}
    start = cfg.vision_start_token_id if cfg.vision_start_token_id is not None else 1
    end = cfg.vision_end_token_id if cfg.vision_end_token_id is not None else 2
    rows = []
    for b, (_, h, w) in enumerate(grid_thw):
        n_img = int(h * w) // v.spatial_merge_size ** 2
        text = rng.integers(0, vocab, size=1 + text_len)
        text = np.array([t for t in text if t not in special] or [0])
        cut = (b * (text_len - 1)) // max(batch - 1, 1)
        rows.append(np.concatenate([text[:1], [start], np.full(n_img, cfg.image_token_id), [end],
                                    text[1:len(text) - cut]]))
    length = max(len(r) for r in rows)
    ids = np.zeros((batch, length), np.int64)
    mask = np.zeros((batch, length), np.int64)
    for b, row in enumerate(rows):
        sl = slice(0, len(row)) if padding == "right" else slice(length - len(row), length)
        ids[b, sl], mask[b, sl] = row, 1
    return patches, grid_thw, ids, mask


def reference_outputs(model, cfg: Qwen2VLConfig, patches, grid_thw, ids, mask) -> dict[str, np.ndarray]:
    """transformers' last hidden state, logits and last-attended-token embedding (L2-normalised)."""
    import torch

    kw = {}
    if patches is not None:
        kw = dict(pixel_values=torch.from_numpy(patches), image_grid_thw=torch.from_numpy(grid_thw),
                  mm_token_type_ids=torch.from_numpy((ids == cfg.image_token_id).astype(np.int64)))
    with torch.no_grad():
        hidden = model.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             **kw).last_hidden_state
        logits = model.lm_head(hidden)
    return mllm_verify.reference_dict(hidden.numpy(), logits.numpy(), mask)


@nnx.jit
def _port_run(m: Qwen2VLEmbedder, ids, mask, patches, vision_positions, vision_segments, position_ids):
    hidden = m.hidden_states_packed(ids, mask, patches, vision_positions, vision_segments, position_ids)
    return dict(last_hidden_state=hidden, logits=m.lm.logits(hidden),
                embedding=pooling.pool(hidden, mask, method="last"))


def port_outputs(model: Qwen2VLEmbedder, patches, grid_thw, ids, mask) -> dict[str, np.ndarray]:
    """The port's outputs for the same inputs (jitted; packed path)."""
    import jax.numpy as jnp

    arrays = [None, None, None, None]
    if patches is not None:
        packed = packed_inputs(model.cfg, ids, mask, grid_thw)
        arrays = [jnp.asarray(patches)] + [jnp.asarray(packed[k]) for k in
                                           ("vision_positions", "vision_segments", "position_ids")]
    return mllm_verify.as_numpy(_port_run(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), *arrays))


def verify(src: str | os.PathLike, *, port: str | os.PathLike | None = None, dtype: str = "float32",
           batch: int = 2, text_len: int = 6, seed: int = 0, out=None) -> tuple[float, dict[str, float]]:
    """Compares transformers' ``Qwen2VLForConditionalGeneration`` (from_pretrained of `src`, strict) with the port
    (converted from `src` in memory, or restored from `port`, an ``import`` output) on three batches: images of
    different sizes + text right-padded, the same left-padded, text only. Hidden states and logits are compared
    on attended positions; the embedding is the last attended token's, L2-normalised. Returns
    (max abs diff, {output: diff}); prints one line per output to `out` (stdout by default).
    """
    src = Path(src)
    ref_model = torch_reference(src)
    model, cfg = mllm_verify.load_port(src, port, dtype, kind="qwen2vl", load_hf=load_hf_qwen2vl)
    cases = {f"images+text/{padding}": verify_inputs(cfg, batch=batch, text_len=text_len, seed=seed, padding=padding)
             for padding in ("right", "left")}
    _, _, ids, mask = verify_inputs(cfg, batch=batch, text_len=text_len, seed=seed + 1)
    specials = [t for t in (cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id) if t is not None]
    ids = np.where(np.isin(ids, specials), 0, ids)
    cases["text/right"] = (None, None, ids, mask)
    return mllm_verify.compare_cases(
        cases, lambda *case: reference_outputs(ref_model, cfg, *case),
        lambda *case: port_outputs(model, *case), out=out, key_width=38)


# ``convert verify``'s entry (formats.FORMATS).
verify_format = mllm_verify.format_verify(verify)
