"""A small, deterministic OACIR benchmark from real photographs, written in the released OACIRR layout.

Built by both tasks' laptop demos (`idmr_jax.tasks.oacir.demo`, `idmr_jax.tasks.idmr.demo`) and by the CLI
``python -m data_prep.demo_bench --out DIR``; converted like the real dataset (`idmr_jax.tasks.oacir.release`).

Following IDMR's cross-domain synthesis, objects are cut out of real photos (`idmr_jax.data.demo_bench.photos`:
the bundled scikit-image and scikit-learn sample images; nothing is downloaded) and pasted, with a random size,
position, flip and colour jitter, into other photos used as contexts; the box of every pasted object is exact.
An *instance* is one cut object; its images are that object in different contexts. A quadruple is (the instance
in context A, its box, a text describing context B with the object's position and size there, the instance in
context B).

Train and val hold disjoint instances (objects whose source boxes overlap stay on one side). The val gallery is
every val image: each instance appears in several contexts (R_ID positives) and each context holds several
instances (hard negatives). No context shows a val object in its background, so nothing leaks into train and no
val image shows two val instances. Output under ``out_dir`` (the dataset root):

- ``OACIRR-Subset/OACIRR-Demo/images/<instance>/<name>.jpg`` (the image root; split maps are relative to it);
- ``OACIRR-Subset/OACIRR-Demo/oacirr-demo/{quadruple_captions,image_splits,image_bounding_box}/...{train,val}.json``;
- ``demo_meta.json`` (per image: instance, context, view, box, position and size labels; per context: its text);
- ``contact_sheet.png`` (a few val quadruples: reference with its box, target, text) for a human check;
- ``build_info.json`` (written last): seed, size, recipe digest and the sha256 of every file. A rerun that finds
  a matching, intact build returns at once without writing anything.

Everything is a function of (seed, size, recipe): two builds are byte-identical (no timestamps anywhere).

``kind="context"`` builds the context benchmark (`idmr_jax.data.demo_bench.plan.KINDS`: a second shot of every
instance in every context, half of the texts keeping the reference's context) as variant ``DemoContext``, under
``OACIRR-Subset/OACIRR-DemoContext``; give it its own ``out_dir``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import textwrap
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from idmr_jax.data.demo_bench import photos, render, texts
from idmr_jax.data.demo_bench.plan import (CONTEXT_PAIRING, SIZES, SPLITS, Plan, plan_benchmark, render_image,
                                           rng_stream)

# Bump when the output changes for reasons the recipe digest cannot see (e.g. a new file format).
VERSION = "1"
VARIANTS = {"standard": "Demo", "context": "DemoContext"}  # benchmark kind -> its OACIRR variant


def roots(kind: str = "standard") -> tuple[str, str, str]:
    """(variant, image root, annotation root) of a benchmark kind, relative to the dataset root."""
    variant = VARIANTS[kind]
    image_root = f"OACIRR-Subset/OACIRR-{variant}"
    return variant, image_root, f"{image_root}/oacirr-{variant.lower()}"


VARIANT, IMAGE_ROOT, ANNOTATION_ROOT = roots("standard")
BUILD_INFO = "build_info.json"
META = "demo_meta.json"
CONTACT_SHEET = "contact_sheet.png"
_INSTANCES = {i.id: i for i in photos.INSTANCES}
_CONTEXTS = {c.id: c for c in photos.CONTEXTS}


def recipe_digest(seed: int, size: str, kind: str = "standard") -> str:
    """A digest of everything the output depends on besides the photo files: a changed catalog, template or size
    table invalidates a cached build by itself."""
    recipe = (VERSION, seed, size, SIZES[size], photos.INSTANCES, photos.CONTEXTS, texts.TEMPLATES,
              texts.POSITION_PHRASES, texts.SIZE_PHRASES, texts.SMALL, texts.LARGE, render.ASPECT_RANGE,
              render.MAX_UPSCALE, render.BOX_ALPHA)
    if kind != "standard":  # the standard recipe reads as it always did: its cached builds stay valid
        recipe += (kind, texts.KEEP_TEMPLATES, CONTEXT_PAIRING)
    return hashlib.sha256(repr(recipe).encode()).hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


def _cached(out: Path, seed: int, size: str, kind: str) -> bool:
    """True when ``out`` holds an intact build of this seed, size, kind and recipe (every listed file hashes
    right)."""
    try:
        info = json.loads((out / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return False
    if (info.get("version"), info.get("seed"), info.get("size"), info.get("recipe")) != (
            VERSION, seed, size, recipe_digest(seed, size, kind)):
        return False
    files = info.get("files", {})
    return bool(files) and all((out / rel).is_file() and _sha256(out / rel) == digest
                               for rel, digest in files.items())


def _contact_sheet(rows: list[tuple[np.ndarray, tuple, np.ndarray, tuple, str]]) -> Image.Image:
    """Reference (red box) | target (green box) | text, one quadruple per row."""
    thumb, text_w, pad = 200, 330, 8
    font = ImageFont.load_default(size=13)
    sheet = Image.new("RGB", (2 * thumb + text_w + 4 * pad, len(rows) * (thumb + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (ref, ref_box, tgt, tgt_box, text) in enumerate(rows):
        y = pad + r * (thumb + pad)
        for c, (img, box, colour) in enumerate(((ref, ref_box, "red"), (tgt, tgt_box, "lime"))):
            scale = thumb / max(img.shape[:2])
            tile = Image.fromarray(img).resize((round(img.shape[1] * scale), round(img.shape[0] * scale)))
            ImageDraw.Draw(tile).rectangle([v * scale for v in box], outline=colour, width=2)
            sheet.paste(tile, (pad + c * (thumb + pad), y))
        draw.multiline_text((3 * pad + 2 * thumb, y), textwrap.fill(text, 44), fill="black", font=font)
    return sheet


def _write_build(tmp: Path, plan: Plan, seed: int, size: str, kind: str) -> dict:
    """Render and write everything into ``tmp`` (laid out like the final root) -> per-split counts."""
    spec = SIZES[size]
    variant, image_root, annotation_root = roots(kind)
    img_root, ann_root = tmp / image_root, tmp / annotation_root
    rendered: dict[str, tuple[np.ndarray, tuple[int, int, int, int]]] = {}
    meta_images = {}
    split_map: dict[str, dict[str, str]] = {s: {} for s in SPLITS}
    boxes: dict[str, dict[str, list[int]]] = {s: {} for s in SPLITS}
    for im in plan.images:
        image, _, box = render_image(im, size)
        rel = f"images/{im.instance}/{im.name}.jpg"
        (img_root / rel).parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=spec.jpeg_quality)
        (img_root / rel).write_bytes(buf.getvalue())
        rendered[im.name] = (image, box)
        split_map[im.split][im.name] = rel
        boxes[im.split][im.name] = list(box)
        h, w = image.shape[:2]
        meta_images[im.name] = {
            "split": im.split, "instance": im.instance, "view_photo": _INSTANCES[im.instance].views[im.view][0],
            "context": im.context, "box": list(box), "width": w, "height": h,
            "position": list(texts.position_key(box, w, h)), "size": texts.size_key(box, w, h),
            "object_flipped": im.place.flip, "context_flipped": im.crop.flip}
    captions: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for q, (side, ref, tgt) in enumerate(plan.pairs):
        t_img, t_box = rendered[tgt]
        t_ctx = _CONTEXTS[meta_images[tgt]["context"]]
        inst = _INSTANCES[meta_images[ref]["instance"]]
        keeps = meta_images[ref]["context"] == t_ctx.id  # the context kind only: the text then does not name it
        text = texts.modification_text(rng_stream(seed, 4, q), inst.category, None if keeps else t_ctx.description,
                                       t_box, t_img.shape[1], t_img.shape[0])
        captions[side].append({"reference": ref, "target": tgt, "modification_text_mllm": text,
                               "reference_bounding_box": list(rendered[ref][1]), "object_category": inst.category})
    for side in SPLITS:
        for rel, obj in ((f"quadruple_captions/caption_full.{side}.json", captions[side]),
                         (f"image_splits/split.{side}.json", split_map[side]),
                         (f"image_bounding_box/bounding_box.{side}.json", boxes[side])):
            (ann_root / rel).parent.mkdir(parents=True, exist_ok=True)
            (ann_root / rel).write_bytes(_json_bytes(obj))
    used = sorted({m["view_photo"] for m in meta_images.values()}
                  | {_CONTEXTS[m["context"]].photo for m in meta_images.values()})
    meta = {"variant": variant, "image_root": image_root, "annotation_root": annotation_root,
            "photos": {k: photos.PHOTO_SOURCES[k] for k in used},
            "instances": {i: {"category": _INSTANCES[i].category, "scene": _INSTANCES[i].scene,
                              "split": next(m["split"] for m in meta_images.values() if m["instance"] == i)}
                          for i in dict.fromkeys(m["instance"] for m in meta_images.values())},
            "contexts": {c.id: {"description": c.description, "photo": c.photo, "box": photos.context_box(c)}
                         for c in photos.CONTEXTS if any(m["context"] == c.id for m in meta_images.values())},
            "images": meta_images}
    (tmp / META).write_bytes(_json_bytes(meta))
    # Contact sheet: the first quadruple of up to six different val instances (in the context kind, alternately
    # one that keeps the context and one that changes it).
    rows, seen = [], set()
    for q in captions["val"]:
        inst = meta_images[q["reference"]]["instance"]
        keeps = meta_images[q["reference"]]["context"] == meta_images[q["target"]]["context"]
        if kind == "context" and keeps != (len(rows) % 2 == 0):
            continue
        if inst not in seen and len(rows) < 6:
            seen.add(inst)
            rows.append((*rendered[q["reference"]], *rendered[q["target"]], q["modification_text_mllm"]))
    buf = io.BytesIO()
    _contact_sheet(rows).save(buf, format="PNG")
    (tmp / CONTACT_SHEET).write_bytes(buf.getvalue())
    return {side: {"instances": len({meta_images[n]["instance"] for n in split_map[side]}),
                   "images": len(split_map[side]), "quadruples": len(captions[side])} for side in SPLITS}


def build_demo_benchmark(out_dir: str | os.PathLike, seed: int = 0, size: str = "small", force: bool = False,
                         kind: str = "standard") -> Path:
    """Build (or reuse) the demo benchmark under ``out_dir`` -> the dataset root (``out_dir``), to be converted
    as variant ``VARIANTS[kind]`` (`idmr_jax.tasks.oacir.release.convert`, or ``python -m data_prep.oacirr
    --root``).

    Only this builder's own paths in ``out_dir`` are replaced (``OACIRR-Subset/OACIRR-Demo``, the meta file, the
    contact sheet, ``build_info.json``), so it may share a root with real OACIRR subsets."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
    if kind not in VARIANTS:
        raise ValueError(f"unknown demo benchmark kind {kind!r}; choose from {sorted(VARIANTS)}")
    out = Path(out_dir)
    if not force and _cached(out, seed, size, kind):
        logging.info("reusing the build in %s (seed %d, size %s, kind %s)", out, seed, size, kind)
        return out
    start = time.perf_counter()
    plan = plan_benchmark(seed, size, kind)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".demo_build.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    counts = _write_build(tmp, plan, seed, size, kind)
    variant, image_root, annotation_root = roots(kind)
    files = {p.relative_to(tmp).as_posix(): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    # Swap in: drop the old marker first, so an interrupted swap is never taken for a complete build.
    (out / BUILD_INFO).unlink(missing_ok=True)
    for rel in (image_root, META, CONTACT_SHEET):
        dst = out / rel
        if dst.is_dir():
            shutil.rmtree(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / rel, dst)
    shutil.rmtree(tmp)
    content = hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in files.items()).encode()).hexdigest()
    # "builder" names the CLI, as before the builder moved into the library: cached builds stay byte-identical.
    info = {"builder": "data_prep.demo_bench", "version": VERSION, "seed": seed, "size": size,
            "recipe": recipe_digest(seed, size, kind), "variant": variant, "image_root": image_root,
            "annotation_root": annotation_root, "counts": counts, "content_sha256": content, "files": files}
    (out / BUILD_INFO).write_bytes(_json_bytes(info))
    logging.info("built %s in %.1f s: %s", out, time.perf_counter() - start, counts)
    return out
