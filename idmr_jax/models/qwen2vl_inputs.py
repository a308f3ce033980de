"""Qwen2-VL inputs: image sizes, the flattened patch layout, vision positions and the M-RoPE position ids.

Semantics of transformers 5.23 (``Qwen2VLImageProcessor``, ``Qwen2VisionTransformerPretrainedModel`` and
``Qwen2VLModel.get_rope_index``), rewritten in NumPy (host side, any image sizes) and jnp (jittable, one fixed
grid):

* :func:`smart_resize`: the size an image is resized to: both sides multiples of ``patch * merge`` (28), the area
  within ``[min_pixels, max_pixels]``, the aspect ratio kept as closely as possible. The resize itself (bicubic)
  and the ``(x / 255 - mean) / std`` normalisation (:func:`normalize`, CLIP mean / std) come before patchifying.
* :func:`patchify`: an ``[H, W, C]`` image -> ``[gh * gw, C * T * P * P]`` patches and its ``grid_thw`` ``(1, gh,
  gw)``, gh = H / P. Patches are ordered block-major: the ``merge x merge`` patches that the merger later joins
  into one LM token are consecutive (row-major inside the block, blocks row-major over the image). Each patch is
  laid out ``[C, T, P, P]`` with the still image repeated ``T = temporal_patch_size`` times (the Conv3d input).
  :func:`patchify_images` concatenates several images (variable sizes) as the reference ``pixel_values``.
* :func:`vision_positions` / :func:`vision_segments`: per patch, its (row, column) for the ViT's 2D RoPE and the
  index of the image (frame) it belongs to: attention never crosses images (the reference's ``cu_seqlens``).
* :func:`rope_index`: M-RoPE position ids ``[3, B, T]`` for any grids (NumPy): text tokens count up on all three
  rows; an image's ``lh x lw`` tokens (lh = gh / merge) get ``(start, start + row, start + col)``, and the text after
  it resumes at ``start + max(lh, lw)``. Only attended tokens are numbered; padding gets 0. Each run of consecutive
  image tokens is one image, in the order of ``grid_thw`` over the batch (row-major).
* :func:`fixed_grid_rope_index`: the same, jittable, when every image has the same ``(lh, lw)`` token grid.

Buckets (why a fixed grid): in JAX every distinct image size is a new shape and a recompilation. The trainer
therefore resizes every image to one fixed square ``data.image_size`` (a multiple of 28: ``(S / 28) ** 2`` LM
tokens per image, e.g. 448 -> 256) and pads prompts to a fixed ``max_length``, so a step sees one shape: the
embedder's ``vision_features`` / ``embed_from_vision`` path (:func:`patchify_fixed`, :func:`fixed_grid_rope_index`).
Variable sizes (the reference's dynamic resolution) go through the packed path (:func:`patchify_images` ->
``Qwen2VLEmbedder.hidden_states_packed``), used by ``convert verify`` and the parity tests; to serve variable sizes
without a recompile per size, round images to a few bucket sizes (e.g. areas of 224^2, 448^2, 672^2) and
pad the packed patch count to the bucket's total.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(height, width) of the resized image: multiples of `factor`, area in ``[min_pixels, max_pixels]``."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be below 200, got {max(height, width) / min(height, width)}")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / shrink / factor) * factor)
        w = max(factor, math.floor(width / shrink / factor) * factor)
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * grow / factor) * factor
        w = math.ceil(width * grow / factor) * factor
    return h, w


def normalize(image: np.ndarray, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """``(image / 255 - mean) / std`` for a uint8-range ``[H, W, C]`` image, in float32."""
    x = np.asarray(image, np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _check_divisible(height: int, width: int, patch_size: int, merge_size: int) -> tuple[int, int]:
    unit = patch_size * merge_size
    if height % unit or width % unit:
        raise ValueError(f"image size {height}x{width} is not a multiple of patch_size * merge_size = {unit} "
                         "(resize it to smart_resize's size first)")
    return height // patch_size, width // patch_size


def patchify(image: np.ndarray, *, patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2
             ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(patches ``[gh * gw, C * T * P * P]``, grid_thw ``(1, gh, gw)``) of a normalised ``[H, W, C]`` image."""
    image = np.asarray(image)
    h, w, c = image.shape
    gh, gw = _check_divisible(h, w, patch_size, merge_size)
    m, p = merge_size, patch_size
    x = image.reshape(gh // m, m, p, gw // m, m, p, c)
    x = x.transpose(0, 3, 1, 4, 6, 2, 5)  # [bh, bw, mh, mw, C, P, P]: block-major patch order
    x = np.broadcast_to(x[..., None, :, :], x.shape[:5] + (temporal_patch_size, p, p))
    return np.ascontiguousarray(x.reshape(gh * gw, c * temporal_patch_size * p * p)), (1, gh, gw)


def patchify_images(images, **kw) -> tuple[np.ndarray, np.ndarray]:
    """The reference's ``(pixel_values, image_grid_thw)`` of several normalised images of any valid sizes:
    patches concatenated ``[sum(gh * gw), C * T * P * P]`` and grids ``[n, 3]``."""
    out = [patchify(im, **kw) for im in images]
    return np.concatenate([p for p, _ in out]), np.asarray([g for _, g in out], np.int64)


def patchify_fixed(pixels: jax.Array, *, patch_size: int, merge_size: int, temporal_patch_size: int) -> jax.Array:
    """:func:`patchify` of a batch of same-size images ``[B, H, W, C]`` -> ``[B, gh * gw, C * T * P * P]`` (jnp)."""
    b, h, w, c = pixels.shape
    gh, gw = _check_divisible(h, w, patch_size, merge_size)
    m, p = merge_size, patch_size
    x = pixels.reshape(b, gh // m, m, p, gw // m, m, p, c).transpose(0, 1, 4, 2, 5, 7, 3, 6)
    x = jnp.broadcast_to(x[..., None, :, :], x.shape[:6] + (temporal_patch_size, p, p))
    return x.reshape(b, gh * gw, c * temporal_patch_size * p * p)


def grid_positions(height: int, width: int, merge_size: int) -> np.ndarray:
    """(row, column) ``[height * width, 2]`` of a patch grid in the block-major order of :func:`patchify`."""
    m = merge_size
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    block = (height // m, m, width // m, m)
    rows = rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    cols = cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    return np.stack([rows, cols], axis=-1).astype(np.int32)


def vision_positions(grid_thw, merge_size: int) -> np.ndarray:
    """2D RoPE positions ``[N, 2]`` of packed patches (each frame of each grid repeats its spatial positions)."""
    grids = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    return np.concatenate([np.tile(grid_positions(int(h), int(w), merge_size), (int(t), 1)) for t, h, w in grids])


def vision_segments(grid_thw) -> np.ndarray:
    """Attention segment id ``[N]`` of packed patches: one segment per frame of each grid (``cu_seqlens``)."""
    grids = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    lengths = np.repeat(grids[:, 1] * grids[:, 2], grids[:, 0])
    return np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)


def rope_index(input_ids, attention_mask, image_grid_thw, *, image_token_id: int, spatial_merge_size: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE (position ids ``[3, B, T]`` int64, deltas ``[B]``) as ``get_rope_index`` (images only; see the
    module docstring). ``deltas[b] = max position + 1 - attended length`` (what generation adds afterwards)."""
    ids = np.asarray(input_ids)
    mask = np.ones_like(ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = iter(np.asarray(image_grid_thw, np.int64).reshape(-1, 3)) if image_grid_thw is not None else iter(())
    positions = np.zeros((3,) + ids.shape, np.int64)
    deltas = np.zeros(ids.shape[0], np.int64)
    m = spatial_merge_size
    for b in range(ids.shape[0]):
        is_image = ids[b][mask[b]] == image_token_id
        pos, start, i = [], 0, 0
        while i < len(is_image):
            j = i
            while j < len(is_image) and is_image[j] == is_image[i]:
                j += 1
            if not is_image[i]:
                pos.append(np.broadcast_to(np.arange(start, start + j - i), (3, j - i)))
                start += j - i
            else:
                try:
                    t, h, w = next(grids)
                except StopIteration:
                    raise ValueError("more image-token runs in the prompts than image grids") from None
                lt, lh, lw = int(t), int(h) // m, int(w) // m
                tt, hh, ww = np.meshgrid(np.arange(lt), np.arange(lh), np.arange(lw), indexing="ij")
                run = np.stack([tt, hh, ww]).reshape(3, -1) + start
                if run.shape[1] != j - i:
                    raise ValueError(f"row {b}: an image run of {j - i} tokens, but its grid {(t, h, w)} gives "
                                     f"{run.shape[1]}")
                pos.append(run)
                start += max(lh, lw)
            i = j
        row = np.concatenate(pos, axis=1) if pos else np.zeros((3, 0), np.int64)
        positions[:, b, mask[b]] = row
        deltas[b] = (row.max() + 1 if row.size else 0) - len(is_image)
    return positions, deltas


def fixed_grid_rope_index(input_ids: jax.Array, attention_mask: jax.Array, *, image_token_id: int,
                          grid: tuple[int, int]) -> jax.Array:
    """:func:`rope_index` ``[3, B, T]`` (int32) when every image has the LM token grid `grid` ``(lh, lw)``
    (jittable). Each image's ``lh * lw`` tokens must be consecutive, and consecutive images separated by text
    (Qwen2-VL prompts wrap each image in ``<|vision_start|> ... <|vision_end|>``)."""
    lh, lw = grid
    per_image = lh * lw
    attended = jnp.asarray(attention_mask).astype(bool)
    is_image = (jnp.asarray(input_ids) == image_token_id) & attended
    is_text = attended & ~is_image
    text_before = jnp.cumsum(is_text, axis=1) - is_text  # attended text tokens strictly before
    images_so_far = jnp.cumsum(is_image, axis=1) - is_image  # image tokens strictly before
    start = text_before + (images_so_far // per_image) * max(lh, lw)
    k = images_so_far % per_image  # index inside the current image (image tokens only)
    h = jnp.where(is_image, start + k // lw, start)
    w = jnp.where(is_image, start + k % lw, start)
    pos = jnp.stack([start, h, w]).astype(jnp.int32)
    return jnp.where(attended[None], pos, 0)
