"""Clean, small OACIRR datasets in the released layout (REFERENCE.md section 3), converted to ArrayRecord.

Shared by the pipeline tests and the throughput tool's smoke run. Unlike `tests/test_oacirr_convert.py`
(which plants one bad entry of each kind), every entry here is valid, so each quadruple becomes one query
record and each image one gallery record. Images are crops of scikit-image's bundled photographs (real JPEG
statistics, no download); each instance uses its own photograph region.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page")


def _photo(k: int) -> np.ndarray:
    import skimage.data

    photo = getattr(skimage.data, PHOTOS[k % len(PHOTOS)])()
    if photo.ndim == 2:
        photo = np.repeat(photo[..., None], 3, axis=-1)
    return photo[..., :3]


def build_layout(root: str, *, variant: str = "Fashion", split: str = "train", num_instances: int = 12,
                 per_instance: int = 3, num_queries: int = 40, image_size: tuple[int, int] = (64, 48),
                 jpeg_quality: int = 90, no_box_every: int = 7) -> dict:
    """Writes a valid OACIRR variant/split under `root`; returns the captions, sizes and paths written.

    Image ``k`` of instance ``i`` is a crop of a photograph resized to about `image_size` (w, h), alternating
    landscape/portrait so TargetPad is exercised both ways. Query ``q`` uses instance ``q % num_instances``,
    reference ``j`` and target ``j + 1`` (mod `per_instance`); every `no_box_every`-th query has no box.
    """
    from idmr_jax.tasks.oacir import release

    img_dir, anno_dir = release.VARIANTS[variant]
    img_root = os.path.join(root, img_dir)
    for sub in ("quadruple_captions", "image_splits", "image_bounding_box"):
        os.makedirs(os.path.join(root, anno_dir, sub), exist_ok=True)
    split_map, boxes, sizes, instance_of = {}, {}, {}, {}
    photos = {}
    for i in range(num_instances):
        photo = photos.setdefault(i % len(PHOTOS), _photo(i))
        h, w = photo.shape[:2]
        inst = f"inst_{i:03d}"
        os.makedirs(os.path.join(img_root, "images", inst), exist_ok=True)
        for j in range(per_instance):
            k = i * per_instance + j
            name = f"img_{i:03d}_{j}"
            y, x = (17 * k) % (h // 3), (29 * k) % (w // 3)
            bw, bh = image_size
            size = (bw + 8 * (k % 3), bh + 6 * (k % 4)) if k % 2 == 0 else (bh + 6 * (k % 4), bw + 8 * (k % 3))
            rel = f"images/{inst}/{name}.jpg"
            Image.fromarray(photo[y: y + 2 * h // 3, x: x + 2 * w // 3]).resize(size, Image.Resampling.BILINEAR).save(
                os.path.join(img_root, rel), format="JPEG", quality=jpeg_quality)
            split_map[name], sizes[name], instance_of[name] = rel, size, inst
            boxes[name] = [1, 2, size[0] - 3, size[1] - 2]
    caps = []
    for q in range(num_queries):
        i = q % num_instances
        j = (q // num_instances) % per_instance
        ref, tgt = f"img_{i:03d}_{j}", f"img_{i:03d}_{(j + 1) % per_instance}"
        w, h = sizes[ref]
        # Boxes of varied position and size (some touch the border), in the reference's pixels.
        fx, fy = (q * 37 % 50) / 100, (q * 53 % 50) / 100
        box = [round(fx * w, 2), round(fy * h, 2), round(min(w, fx * w + (0.2 + (q % 5) / 10) * w), 2),
               round(min(h, fy * h + (0.25 + (q % 4) / 10) * h), 2)]
        caps.append({"reference": ref, "target": tgt,
                     "modification_text_mllm": f"Put the Item on a Beach; it's sunny (number {q})!",
                     "reference_bounding_box": None if no_box_every and q % no_box_every == no_box_every - 1
                     else box,
                     "object_category": ("jacket", "shoe", "bag")[q % 3],
                     **({"target_subset_vitG": [tgt, f"img_{(i + 1) % num_instances:03d}_0"]}
                        if split == "val" else {})})
    for sub, fname, obj in (("quadruple_captions", f"caption_full.{split}.json", caps),
                            ("image_splits", f"split.{split}.json", split_map),
                            ("image_bounding_box", f"bounding_box.{split}.json", boxes)):
        with open(os.path.join(root, anno_dir, sub, fname), "w") as f:
            json.dump(obj, f)
    return {"root": root, "variant": variant, "split": split, "captions": caps, "sizes": sizes,
            "instance_of": instance_of, "paths": {n: os.path.join(img_root, r) for n, r in split_map.items()}}


def build_converted(root: str, out: str, *, num_shards: int = 4, gallery_shards: int = 2, **layout) -> dict:
    """`build_layout` then `idmr_jax.tasks.oacir.release.convert` (strict: nothing may be skipped) into `out`."""
    from idmr_jax.tasks.oacir import release

    info = build_layout(root, **layout)
    result = release.convert(root, info["variant"], info["split"], out, num_shards=num_shards,
                            gallery_shards=gallery_shards, strict=True)
    assert result.manifest["counts"]["queries"] == len(info["captions"])
    return {**info, "out": out, "manifest": result.manifest}


def pipeline_config(train_dir: str = "", *, batch_size: int = 4, num_workers: int = 0, shuffle_seed: int = 0,
                    val_dir: str = "", **extra):
    """The ``config.data`` fields `idmr_jax.tasks.oacir.pipeline.train_iterator` reads (cf. configs/oacir.py)."""
    import ml_collections

    c = ml_collections.ConfigDict()
    c.data = ml_collections.ConfigDict(dict(train_dir=train_dir, val_dir=val_dir, batch_size=batch_size,
                                            num_workers=num_workers, shuffle_seed=shuffle_seed, tokenizer="",
                                            max_text_len=32, text_entity=False, roi_crop=False, **extra))
    return c
