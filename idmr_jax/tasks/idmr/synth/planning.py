"""Planning steps of the IDMR synthesis (`idmr_jax.tasks.idmr.synth.synthesis`): image probing, the per-instance
checks and filters, CLIP scoring and captioning (both cached in the output folder), and the train/val split.

Everything here runs before a shard is written, so the set of triplets and the report are fixed first.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from idmr_jax.data import image_files
from idmr_jax.data.shards import ConversionError, map_parallel, write_json_atomic
from idmr_jax.tasks.idmr.synth import geometry
from idmr_jax.tasks.idmr.synth.captions import CaptionRequest, TemplateCaptioner
from idmr_jax.tasks.idmr.synth.clip_filter import PROMPT, Scorer
from idmr_jax.tasks.idmr.synth.sources import IMAGE, INSTANCE, ImageEntry, Loaded, Skip

TOOL_VERSION = "1.0.0"  # bump when probing or planning changes what is written (it also keys the probe cache)
PROBE_CACHE, SCORE_CACHE, CAPTION_CACHE = ".probe_cache.json", ".clip_scores.json", ".captions.json"
FILTER_CODES = ("crowd", "too_small", "area_ratio_low", "area_ratio_high", "clip_score_low", "empty_caption")


# --- image probing (workers) -------------------------------------------------------------------------------------


def probe_chunk(args: tuple[Any, list, image_files.ReadRules]) -> list[dict]:
    """Worker entry point: fully decode a batch of images -> probe dicts (with ``size``: the byte count; a file
    the read rules refuse gets ``size`` None and its skip ``code``)."""
    reader, refs, rules = args
    out = []
    for ref in refs:
        try:
            data = reader.read(ref, rules)
        except image_files.ImageFileRefused as e:
            out.append({"size": None, "width": None, "height": None, "format": None, "error": str(e),
                        "code": e.code})
            continue
        except (FileNotFoundError, OSError) as e:
            out.append({"size": None, "width": None, "height": None, "format": None,
                        "error": f"image file cannot be read: {type(e).__name__}"})
            continue
        out.append({**image_files.probe_bytes(data), "size": len(data)})
    return out


def probe_all(loaded: Loaded, entries: list[ImageEntry], out: str, pool: Any, workers: int,
              rules: image_files.ReadRules = image_files.ReadRules()) -> list[dict]:
    """Sets ``entry.probe`` for entries without one, reusing cached probes of files with the same size and mtime.

    The read rules are applied to every file first (``reader.check``; no file is opened for that), so a refused
    file is never read and a cached probe never outlives a change of the rules. Returns the files followed
    outside the image folder (``{"file", "target"}``; only with ``rules.follow_external_symlinks``)."""
    todo = [e for e in entries if e.probe is None]
    external = []
    accepted = []
    for e in todo:
        try:
            checked = loaded.reader.check(e.ref, rules)
        except image_files.ImageFileRefused as err:
            e.probe = {"size": None, "width": None, "height": None, "format": None, "error": str(err),
                       "code": err.code, "stat": None}
            continue
        if checked is not None and checked.external:
            external.append({"file": e.file_name, "target": checked.path})
        accepted.append(e)
    todo = accepted
    if not todo:
        return external
    cache_path = os.path.join(out, PROBE_CACHE)
    key = json.dumps(loaded.describe, sort_keys=True)
    cache: dict[str, dict] = {}
    if os.path.isfile(cache_path):
        with open(cache_path, encoding="utf-8") as f:
            saved = json.load(f)
        if saved.get("source") == key and saved.get("tool_version") == TOOL_VERSION:
            cache = saved.get("entries", {})
    stats = {e.file_name: loaded.reader.stat(e.ref) for e in todo}
    missing = []
    for e in todo:
        hit, st = cache.get(e.file_name), stats[e.file_name]
        if hit is not None and st is not None and hit.get("stat") == list(st):
            e.probe = hit
        else:
            missing.append(e)
    if missing:
        logging.info("decoding %d images (%d cached)", len(missing), len(todo) - len(missing))
        step = max(1, min(256, math.ceil(len(missing) / max(1, 4 * workers))))
        chunks = [missing[i : i + step] for i in range(0, len(missing), step)]
        results = map_parallel(probe_chunk, [(loaded.reader, [e.ref for e in c], rules) for c in chunks], pool)
        for chunk, res in zip(chunks, results):
            for e, p in zip(chunk, res):
                st = stats[e.file_name]
                e.probe = {**p, "stat": None if st is None else list(st)}
    # Refused or missing files (no size) are never cached: the rules may differ on the next run.
    entries_cache = {e.file_name: e.probe for e in todo
                     if e.probe.get("stat") is not None and e.probe["size"] is not None}
    write_json_atomic(cache_path, {"source": key, "tool_version": TOOL_VERSION, "entries": entries_cache})
    return external


# --- planning: every decision about what is written, before anything is written -----------------------------------


def decode_image(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


class ImageLoader:
    """Decoded source images, one at a time (consecutive requests for the same image decode it once), read under
    the read rules."""

    def __init__(self, reader: Any, rules: image_files.ReadRules = image_files.ReadRules()):
        self.reader, self.rules, self.ref, self.image = reader, rules, None, None

    def __call__(self, ref: Any) -> Image.Image:
        if ref != self.ref:
            try:
                data = self.reader.read(ref, self.rules)
            except image_files.ImageFileRefused as e:
                raise ConversionError(f"{ref}: changed since it was checked: {e}") from e
            self.ref, self.image = ref, decode_image(data)
        return self.image


def candidates(loaded: Loaded, entries: list[ImageEntry], spec: geometry.FilterSpec
                ) -> tuple[list[dict], list[Skip], dict[str, list[str]], int]:
    """Applies the image checks and the geometric filters -> (candidate instances, bad-input skips,
    filtered annotation ids per reason, boxes clipped)."""
    label = loaded.describe["label"]
    tfds = loaded.describe["kind"] == "tfds"
    record, ann_record = ("examples", "objects") if tfds else ("images", "annotations")
    cands, skips, filtered, clipped = [], [], {c: [] for c in FILTER_CODES}, 0
    for e in entries:
        p = e.probe
        problem = None
        if p["error"] is not None:
            # Probes cached by an older version carry no code: a size means the file was read.
            code = p.get("code") or ("missing_image" if p["size"] is None else "undecodable_image")
            problem = ("file_name", code, f"{p['error']} ({e.file_name})")
        else:
            for key, declared, actual in (("width", e.width, p["width"]), ("height", e.height, p["height"])):
                if declared is not None and declared != actual:
                    problem = (key, "image_size_mismatch",
                               f"annotated {key} {declared} != {actual} of the file {e.file_name}")
                    break
        if problem:
            field, code, reason = problem
            skips.append(Skip(label, record, e.index, e.file_name, field, code, reason, IMAGE))
            for a in e.annotations:
                skips.append(Skip(label, ann_record, a.index, a.ann_id, "image_id", "unusable_image",
                                  f"image {e.file_name} unusable: {code}", INSTANCE))
            continue
        w, h = p["width"], p["height"]
        boxes = [geometry.clip_box(a.box, w, h) for a in e.annotations]
        for k, a in enumerate(e.annotations):
            aid = f"{loaded.name}:{a.ann_id}"
            if a.iscrowd:
                filtered["crowd"].append(aid)
                continue
            box = boxes[k]
            if box is None:
                skips.append(Skip(label, ann_record, a.index, a.ann_id, "bbox", "box_outside",
                                  f"box {list(a.box)} does not overlap the {w}x{h} image", INSTANCE))
                continue
            code, _ = geometry.filter_reason(box, w, h, spec)
            if code:
                filtered[code].append(aid)
                continue
            clipped += box != a.box
            neighbours = tuple((o.category, boxes[j]) for j, o in enumerate(e.annotations)
                               if j != k and boxes[j] is not None)
            cands.append({"entry": e, "ann": a, "annotation_id": aid, "box": box, "width": w, "height": h,
                          "rect": geometry.crop_rect(box, w, h, spec.context_pad), "neighbours": neighbours})
    return cands, skips, filtered, clipped


def _load_cache(path: str, owner: str) -> dict:
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        if saved.get("owner") == owner:
            return saved.get("entries", {})
    return {}


def score(cands: list[dict], loaded: Loaded, scorer: Scorer, out: str, batch: int = 64,
          rules: image_files.ReadRules = image_files.ReadRules()) -> None:
    """Sets ``cand["clip_score"]`` with the scorer, reusing cached scores of the same scorer and crop."""
    path = os.path.join(out, SCORE_CACHE)
    cache = _load_cache(path, scorer.name)
    todo = [c for c in cands if cache.get(c["annotation_id"], {}).get("rect") != list(c["rect"])]
    load = ImageLoader(loaded.reader, rules)
    for s in range(0, len(todo), batch):
        part = todo[s : s + batch]
        crops = [load(c["entry"].ref).crop(c["rect"]).convert("RGB") for c in part]
        texts = [PROMPT.format(category=c["ann"].category) for c in part]
        scores = np.asarray(scorer.score(crops, texts), np.float64)
        if scores.shape != (len(part),) or not np.all(np.isfinite(scores)):
            raise ConversionError(f"scorer {scorer.name} returned {scores.shape} scores (need {len(part)} finite)")
        for c, v in zip(part, scores):
            cache[c["annotation_id"]] = {"rect": list(c["rect"]), "score": float(v)}
        write_json_atomic(path, {"owner": scorer.name, "entries": cache})  # a crash keeps what was scored
    for c in cands:
        c["clip_score"] = cache[c["annotation_id"]]["score"]


def caption(cands: list[dict], loaded: Loaded, captioner: Any, out: str,
            rules: image_files.ReadRules = image_files.ReadRules()) -> None:
    """Sets ``cand["caption"]``; captions of model-based captioners are cached (they are the expensive part)."""
    cached = captioner.name != TemplateCaptioner.name
    path = os.path.join(out, CAPTION_CACHE)
    cache = _load_cache(path, captioner.name) if cached else {}
    load = ImageLoader(loaded.reader, rules)
    for n, c in enumerate(cands):
        hit = cache.get(c["annotation_id"])
        if hit is not None and hit["box"] == list(c["box"]):
            c["caption"] = hit["caption"]
            continue
        e = c["entry"]
        req = CaptionRequest(key=c["annotation_id"], category=c["ann"].category, box=c["box"], width=c["width"],
                             height=c["height"], neighbours=c["neighbours"], scene=e.scene,
                             load_image=lambda ref=e.ref: load(ref))
        c["caption"] = captioner.caption(req).strip()
        if cached:
            cache[c["annotation_id"]] = {"box": list(c["box"]), "caption": c["caption"]}
            if n % 100 == 99:
                write_json_atomic(path, {"owner": captioner.name, "entries": cache})
    if cached:
        write_json_atomic(path, {"owner": captioner.name, "entries": cache})


def assign_splits(keys: Sequence[str], val_fraction: float, seed: int, *, by_category: bool = False
                  ) -> list[str]:
    """'train' / 'val' per item from its split key (image id, instance id or category), chosen by ``seed``.

    Per key (image / instance): ``round(f * #keys)`` keys go to val (at least one when f > 0 and there are two or
    more). ``by_category``: whole categories, in seeded random order, go to val until it holds >= f of the items,
    leaving at least one category in train."""
    if val_fraction <= 0 or not keys:
        return ["train"] * len(keys)
    uniq = sorted(set(keys))
    order = [uniq[i] for i in np.random.default_rng(seed).permutation(len(uniq))]
    if by_category:
        sizes = Counter(keys)
        val, held = set(), 0
        for k in order[: max(len(order) - 1, 0)]:
            if held >= val_fraction * len(keys):
                break
            val.add(k)
            held += sizes[k]
    else:
        n = min(max(round(val_fraction * len(uniq)), 1), len(uniq) - 1)
        val = set(order[:n])
    return ["val" if k in val else "train" for k in keys]
