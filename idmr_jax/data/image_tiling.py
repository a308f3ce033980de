"""InternVL's dynamic tiling of high-resolution images (transformers 5.23 ``GotOcr2ImageProcessor`` with
``crop_to_patches=True``, as ``InternVLProcessor`` calls it), in NumPy / PIL.

1. Grid choice (:func:`optimal_grid`): among every (columns, rows) with ``min_tiles <= columns * rows <=
   max_tiles`` (sorted by tile count, stable), the one whose aspect ratio ``columns / rows`` is closest to the
   image's ``width / height``; on a tie a later (larger) grid wins while the image area exceeds half the grid's
   pixel area.
2. The image is resized (PIL bicubic, on uint8 RGB) to ``(columns * S) x (rows * S)`` and cut into S x S tiles,
   row-major (tile i is column ``i % columns``, row ``i // columns``).
3. With more than one tile, a thumbnail (the whole image resized to S x S) is appended last.
4. Each tile is rescaled to [0, 1] (float64 product, stored float32) and normalised ``(x - mean) / std`` in
   float32, as the reference's NumPy backend.

An image of n tiles owns ``n * tokens_per_tile`` image tokens in the prompt (InternVL2.5 at 448 px: 256 per tile);
the tiles go to the model as consecutive rows of the pixel batch, in the order returned here.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from idmr_jax.data.image_ops import IMAGENET_MEAN, IMAGENET_STD  # InternVL's checkpoints normalise with these


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """Every (columns, rows) with ``min_tiles <= columns * rows <= max_tiles``, sorted by tile count (stable
    over the columns-major enumeration, as the reference)."""
    grids = [(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
             if min_tiles <= c * r <= max_tiles]
    return sorted(grids, key=lambda g: g[0] * g[1])


def optimal_grid(height: int, width: int, tile_size: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(columns, rows) of the tiling of a `height` x `width` image (see the module docstring, step 1)."""
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for grid in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best, best_diff = grid, diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * grid[0] * grid[1]:
            best = grid
    return best


def _as_rgb_image(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected a PIL image or a uint8 [H, W, 3] array, got {arr.dtype} {arr.shape}")
    return Image.fromarray(arr)


def tile_image(image, *, tile_size: int = 448, min_tiles: int = 1, max_tiles: int = 12,
               use_thumbnail: bool = True) -> tuple[np.ndarray, int]:
    """The uint8 tiles ``[n, S, S, 3]`` of `image` (PIL image or uint8 HWC RGB array) and their count n, in the
    reference order (row-major tiles, then the thumbnail when there is more than one tile)."""
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")
    img = _as_rgb_image(image)
    s = tile_size
    columns, rows = optimal_grid(img.height, img.width, s, min_tiles, max_tiles)
    canvas = np.asarray(img.resize((columns * s, rows * s), resample=Image.BICUBIC))
    tiles = [canvas[r * s:(r + 1) * s, c * s:(c + 1) * s] for r in range(rows) for c in range(columns)]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(np.asarray(img.resize((s, s), resample=Image.BICUBIC)))
    return np.stack(tiles), len(tiles)


def normalize_tiles(tiles: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """uint8 tiles -> float32 model input: ``x / 255`` then ``(x - mean) / std`` per channel (NHWC)."""
    x = (np.asarray(tiles).astype(np.float64) * (1 / 255)).astype(np.float32)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def dynamic_tiles(image, *, tile_size: int = 448, min_tiles: int = 1, max_tiles: int = 12,
                  use_thumbnail: bool = True, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> tuple[np.ndarray, int]:
    """(normalised float32 tiles ``[n, S, S, 3]``, n): what ``InternVLProcessor`` gives one image as
    ``pixel_values`` (NCHW there) and ``num_patches``."""
    tiles, n = tile_image(image, tile_size=tile_size, min_tiles=min_tiles, max_tiles=max_tiles,
                          use_thumbnail=use_thumbnail)
    return normalize_tiles(tiles, mean, std), n
