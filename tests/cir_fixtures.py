"""Tiny releases of the CIR benchmarks written in their released layouts (EVAL_FORMATS.md), for the reader,
converter and evaluation tests. Each writer takes a root folder and returns what the tests need to know about it
(the expected query ids, which records are broken and why, ...). Images are small PNG/JPEG files with distinct
colours, so a tiny random model still tells them apart."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image


def write_image(path: str, seed: int, size: tuple[int, int] = (40, 32), fmt: str | None = None) -> None:
    """A small random-coloured image at `path` (format from the extension unless `fmt`)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=3)
    pixels = np.clip(base + rng.integers(-30, 30, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


def write_json(path: str, obj) -> None:
    """`obj` as JSON at `path` (folders created)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


# --- CIRR and CIRCO (helper A) --------------------------------------------------------------------------------

# Two img_sets of six images each; every image is a set member, as in the release.
CIRR_SETS = [[f"dev-{s}-{m}-img{m % 2}" for m in range(6)] for s in range(2)]
# Valid queries: (pairid, set, reference member, target member, soft labels by member, caption).
CIRR_VALID = [
    (100, 0, 0, 1, {1: 1.0, 2: 0.5}, "make it red"),
    (101, 0, 2, 3, {3: 1.0, 4: -1.0}, "add a dog"),
    (102, 0, 4, 5, {4: 1.0}, "zoom out"),  # target_hard absent from target_soft (a documented oddity, pairid 12130)
    (103, 1, 0, 1, {1: 1.0, 3: 0.2}, "at night"),
    (104, 1, 2, 4, {4: 1.0}, "two of them"),
    (105, 1, 5, 0, {0: 1.0, 1: 0.5}, "from above"),
]
CIRR_MISSING_FILE = "dev-2-0-img0"  # in the split map, no file on disk (broken=True): the converter's case


def _cirr_record(pairid, set_id, members, reference, target, soft, caption, labelled):
    record = {"pairid": pairid, "reference": reference, "caption": caption,
              "img_set": {"id": set_id, "members": list(members), "reference_rank": 0}}
    if labelled:
        record.update(target_hard=target, target_soft=soft)
        record["img_set"]["target_rank"] = 1
    return record


def _cirr_broken_records(labelled: bool) -> tuple[list[dict], dict[str, str], dict[str, str]]:
    """One broken record of each kind: (records, {name: code}, {name: field})."""
    members = CIRR_SETS[0]

    def record(pairid, **change):
        rec = _cirr_record(pairid, 0, members, members[0], members[1], {members[1]: 1.0}, "make it blue", labelled)
        rec.update(change)
        return rec

    no_caption = record(200)
    del no_caption["caption"]
    bad_member = record(204)
    bad_member["img_set"] = dict(bad_member["img_set"], members=members[:3] + ["dev-9-3-img1"] + members[4:])
    records = [no_caption, record(201, caption="  "), record(202, reference="dev-9-0-img0"), bad_member,
               record("205"), record(206, img_set=[members]), record(100, caption="a repeated pairid")]
    broken = {"200": ("missing_field", "caption"), "201": ("empty_text", "caption"),
              "202": ("unknown_name", "reference"), "204": ("unknown_name", "img_set.members[3]"),
              "205": ("bad_type", "pairid"), "206": ("bad_type", "img_set"), "100": ("duplicate_query", "pairid")}
    if labelled:  # test1 has no target_hard
        records.insert(3, record(203, target_hard="dev-9-1-img1"))
        broken["203"] = ("unknown_name", "target_hard")
    return records, {k: v[0] for k, v in broken.items()}, {k: v[1] for k, v in broken.items()}


def write_cirr(root: str, layout: str = "readme", split: str = "val", broken: bool = False) -> dict:
    """A tiny CIRR split in the README layout (``root`` = the cirr folder, images under img_raw/) or the
    CLIP4Cir/SEARLE one (``root/cirr/{captions,image_splits}`` beside ``root/dev``): 12 images in two img_sets,
    six valid queries (pairid 102's target_hard is absent from its target_soft). broken=True adds one broken
    record of each kind, a split-map entry with a non-string path, and query 107 whose reference has no file."""
    ann_dir, image_dir = {"readme": ("", "img_raw"), "clip4cir": ("cirr", "")}[layout]
    file_split, folder = {"val": ("val", "dev"), "test": ("test1", "test1")}[split]
    labelled = split == "val"
    names = [name for members in CIRR_SETS for name in members]
    for seed, name in enumerate(names):
        write_image(os.path.join(root, image_dir, folder, f"{name}.png"), seed=100 + seed)
    split_map = {name: f"./{folder}/{name}.png" for name in names}
    records = []
    for pairid, set_id, ref, target, soft, caption in CIRR_VALID:
        members = CIRR_SETS[set_id]
        records.append(_cirr_record(pairid, set_id, members, members[ref], members[target],
                                    {members[m]: v for m, v in soft.items()}, caption, labelled))
    info = {"valid_query_ids": [str(r["pairid"]) for r in records], "broken": {}, "fields": {},
            "missing_file_query_ids": [], "num_images": len(names), "split_map": split_map,
            "captions": os.path.join(root, ann_dir, "captions", f"cap.rc2.{file_split}.json")}
    if broken:
        bad, info["broken"], info["fields"] = _cirr_broken_records(labelled)
        split_map["dev-8-0-img0"] = 5
        info["broken"]["dev-8-0-img0"], info["fields"]["dev-8-0-img0"] = "bad_type", "path"
        split_map[CIRR_MISSING_FILE] = f"./{folder}/{CIRR_MISSING_FILE}.png"
        members = [CIRR_MISSING_FILE] + CIRR_SETS[1][1:]
        records.append(_cirr_record(107, 2, members, CIRR_MISSING_FILE, CIRR_SETS[1][3],
                                    {CIRR_SETS[1][3]: 1.0}, "in the snow", labelled))
        records[3:3] = bad  # broken records among the valid ones
        info["broken"][CIRR_MISSING_FILE] = "missing_image_file"
        info["valid_query_ids"].append("107")
        info["missing_file_query_ids"] = ["107"]
        info["num_images"] += 1
    write_json(info["captions"], records)
    write_json(os.path.join(root, ann_dir, "image_splits", f"split.rc2.{file_split}.json"), split_map)
    return info


CIRCO_IDS = [100 + 7 * i for i in range(14)]
# Valid val rows: (reference index, gt indices with the target first, semantic aspects).
CIRCO_VALID = [
    (0, [1], ["cardinality"]),
    (2, [3, 4], ["addition", "negation"]),
    (5, [6, 7, 8], ["viewpoint"]),
    (9, [10, 11], ["spatial_relations_background"]),
    (12, [13, 0, 2], ["compare_change"]),
]
CIRCO_MISSING_FILE = 99  # in the image info, no file on disk (broken=True)


def _circo_row(query_id, reference, gts, aspects, labelled):
    row = {"id": query_id, "reference_img_id": reference, "relative_caption": f"caption {query_id}",
           "shared_concept": "a thing"}
    if labelled:
        row.update(target_img_id=gts[0], gt_img_ids=list(gts), semantic_aspects=list(aspects))
    return row


def write_circo(root: str, split: str = "val", broken: bool = False) -> dict:
    """A tiny CIRCO split: 14 gallery images (listed out of id order), five valid queries with 1-3 ground truths.
    broken=True adds one broken row of each kind, two broken image entries and query 12 whose reference has no
    file."""
    labelled = split == "val"
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 40, "height": 32} for i in reversed(CIRCO_IDS)]
    for seed, image_id in enumerate(CIRCO_IDS):
        write_image(os.path.join(root, "COCO2017_unlabeled/unlabeled2017", f"{image_id:012d}.jpg"), seed=200 + seed)
    rows = [_circo_row(q, CIRCO_IDS[ref], [CIRCO_IDS[g] for g in gts], aspects, labelled)
            for q, (ref, gts, aspects) in enumerate(CIRCO_VALID)]
    info = {"valid_query_ids": [str(r["id"]) for r in rows], "broken": {}, "fields": {},
            "missing_file_query_ids": [], "num_images": len(CIRCO_IDS)}
    if broken:
        def row(query_id, **change):
            r = _circo_row(query_id, CIRCO_IDS[0], [CIRCO_IDS[1]], ["addition"], labelled)
            r.update(change)
            return r

        no_caption = row(5)
        del no_caption["relative_caption"]
        bad = [no_caption, row(6, relative_caption=""), row(7, reference_img_id=99999),
               row(10, reference_img_id=str(CIRCO_IDS[0]))]
        codes = {"5": ("missing_field", "relative_caption"), "6": ("empty_text", "relative_caption"),
                 "7": ("unknown_name", "reference_img_id"), "10": ("bad_type", "reference_img_id"),
                 "2": ("duplicate_query", "id")}
        if labelled:
            bad += [row(8, gt_img_ids=[CIRCO_IDS[1], 88888]), row(11, gt_img_ids=str(CIRCO_IDS[1]))]
            codes.update({"8": ("unknown_name", "gt_img_ids[1]"), "11": ("bad_type", "gt_img_ids")})
        images += [{"id": 77777}, {"id": CIRCO_IDS[0], "file_name": "again.jpg"},
                   {"id": CIRCO_MISSING_FILE, "file_name": f"{CIRCO_MISSING_FILE:012d}.jpg"}]
        codes.update({"77777": ("missing_field", "file_name"), str(CIRCO_IDS[0]): ("duplicate_name", "id")})
        rows = rows[:2] + bad + rows[2:]
        rows.append(_circo_row(12, CIRCO_MISSING_FILE, [CIRCO_IDS[5]], ["negation"], labelled))
        rows.append(row(2, relative_caption="a repeated id"))
        info["broken"] = {k: v[0] for k, v in codes.items()}
        info["fields"] = {k: v[1] for k, v in codes.items()}
        info["broken"][str(CIRCO_MISSING_FILE)] = "missing_image_file"
        info["valid_query_ids"].append("12")
        info["missing_file_query_ids"] = ["12"]
        info["num_images"] += 1
    write_json(os.path.join(root, "annotations", f"{split}.json"), rows)
    write_json(os.path.join(root, "COCO2017_unlabeled/annotations/image_info_unlabeled2017.json"),
               {"info": {"description": "tiny"}, "images": images})
    return info


# --- FashionIQ and GeneCIS (helper B) -------------------------------------------------------------------------

FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")
FASHIONIQ_SHARED_ASIN = "B0SHARED"  # in the dress and the toptee gallery
FASHIONIQ_EMPTY_CAPTION_QUERY = "shirt/1"  # first caption empty: a valid oddity of the release
# ASIN -> file extension where it is not .jpg (the reader detects it per image)
_FIQ_EXTENSIONS = {"B0SHIRT02": ".png", "B0TOPTEE03": ".jpeg"}


# CLIP4Cir's join of each valid query's captions, written out by hand
FASHIONIQ_TEXTS = {
    "dress/0": "Is red and has long sleeves", "dress/1": "Is shorter and and more formal",
    "dress/2": "Is silver and fit and flare", "shirt/0": "Has a collar and is blue",
    "shirt/1": " and is grey with a design on the back", "shirt/2": "Is plain and is white",
    "toptee/0": "Is a tank top and is green", "toptee/1": "Has stripes and is looser",
    "toptee/2": "Is black and has a print"}


def _fiq_gallery(category: str) -> list[str]:
    sixth = "B0SHIRT06" if category == "shirt" else FASHIONIQ_SHARED_ASIN
    return [f"B0{category.upper()}{i:02d}" for i in range(1, 6)] + [sixth]


def _fiq_valid_rows(category: str) -> list[dict]:
    g = _fiq_gallery(category)
    captions = {
        "dress": [["is red.", "has long sleeves"], ["Is Shorter ", "and more formal?"], ["is silver", "fit and flare"]],
        "shirt": [["has a collar", "is blue"], ["", "is grey with a design on the back"], ["is plain", "is white."]],
        "toptee": [["is a tank top", "is green"], ["has stripes", "is looser"], ["is black.", "has a print"]],
    }[category]
    pairs = [(g[0], g[1]), (g[2], g[3]), (g[5], g[4])]  # the third query of dress/toptee uses the shared ASIN
    return [{"target": t, "candidate": c, "captions": caps} for (c, t), caps in zip(pairs, captions)]


def write_fashioniq(root: str, layout: str = "images", split: str = "val", broken: bool = False) -> dict:
    """A tiny FashionIQ release: 3 categories x 6 images x 3 queries in `layout` ("images": CLIP4Cir/SEARLE
    ``images/<asin>.<ext>``; "resized_images": start_kit ``resized_images/<cat>/<asin>.<ext>``). `broken` appends one
    broken record of each kind, a duplicate ASIN in a split file and a query whose candidate's file is missing.

    Returns valid_query_ids (kept by reader and converter), reader_query_ids, broken ({query id or ASIN: code}),
    broken_fields ({query id or ASIN: field}), num_images (gallery entries with a file), reader_num_images and
    galleries ({category: [asin, ...]}, split order)."""
    assert layout in ("images", "resized_images") and split in ("val", "test")
    labelled = split == "val"
    info: dict = {"valid_query_ids": [], "reader_query_ids": [], "broken": {}, "broken_fields": {},
                  "galleries": {}, "num_images": 0, "reader_num_images": 0}
    seed = 0
    for category in FASHIONIQ_CATEGORIES:
        gallery = _fiq_gallery(category)
        for asin in gallery:
            seed += 1
            name = asin + _FIQ_EXTENSIONS.get(asin, ".jpg")
            folder = "images" if layout == "images" else os.path.join("resized_images", category)
            write_image(os.path.join(root, folder, name), seed)
        rows = _fiq_valid_rows(category)
        names = list(gallery)
        for i in range(len(rows)):
            info["valid_query_ids"].append(f"{category}/{i}")
        if broken:
            extra_rows, codes = _fiq_broken_rows(category)
            for row, (code, field) in zip(extra_rows, codes):
                qid = f"{category}/{len(rows)}"
                rows.append(row)
                if code == "missing_image_file":
                    info["reader_query_ids"].append(qid)
                info["broken"][qid] = code
                info["broken_fields"][qid] = field
            if category == "toptee":
                names.append("B0NOFILE")  # listed in the split, no file on disk
                names.insert(2, names[1])  # a duplicate entry: ignored, the first is kept
                info["broken"]["B0NOFILE"] = "missing_image_file"
                info["broken"][names[1]] = "duplicate_name"
                info["broken_fields"][names[1]] = ""
        if not labelled:
            rows = [{k: v for k, v in row.items() if k != "target"} for row in rows]
        write_json(os.path.join(root, "captions", f"cap.{category}.{split}.json"), rows)
        write_json(os.path.join(root, "image_splits", f"split.{category}.{split}.json"), names)
        info["galleries"][category] = list(dict.fromkeys(names))
        info["num_images"] += len(gallery)
        info["reader_num_images"] += len(set(names))
    info["reader_query_ids"] = sorted(info["valid_query_ids"] + info["reader_query_ids"])
    return info


def _fiq_broken_rows(category: str) -> tuple[list[dict], list[tuple[str, str]]]:
    """Broken caption rows of one category and their (code, field), spread over the categories."""
    g = _fiq_gallery(category)
    if category == "dress":
        return ([{"target": g[1], "candidate": g[0], "captions": ["", " . "]},
                 {"target": g[1], "candidate": g[0], "captions": ["only one"]}],
                [("empty_text", "captions"), ("bad_type", "captions")])
    if category == "shirt":
        unknown = {"target": g[1], "candidate": "B0NOSUCH", "captions": ["is red", "is long"]}
        missing = {"target": g[1], "captions": ["is red", "is long"]}  # no candidate (test rows lack only target)
        return [unknown, missing], [("unknown_name", "candidate"), ("missing_field", "candidate")]
    return ([{"target": g[0], "candidate": "B0NOFILE", "captions": ["is blue", "is long"]}],
            [("missing_image_file", "")])


GENECIS_TASKS = ("focus_attribute", "change_attribute", "focus_object", "change_object")
GENECIS_REPEATED_TARGET_QUERY = "change_object/1"  # its target is listed again in its own gallery


def _vg_entry(image_id: str, box: list[float]) -> dict:
    return {"image_id": image_id, "instance_bbox": box}


def _vg_key(image_id: str, box: list[float]) -> str:
    """The expected crop key, computed independently of the reader: widened by 0.7 w / 0.7 h up-left (clamped at
    0), right/bottom = left/top + 1.7 w/h (vaw_dataset.py); numbers printed without trailing zeros."""
    x, y, w, h = box
    left, top = max(0.0, x - 0.7 * w), max(0.0, y - 0.7 * h)
    nums = [left, top, left + 1.7 * w, top + 1.7 * h]
    return image_id + "@" + ",".join(f"{round(v, 6):.6f}".rstrip("0").rstrip(".") for v in nums)


def _genecis_rows() -> dict[str, list[dict]]:
    vg = {i: str(2000 + i) for i in range(1, 7)}
    a = [_vg_entry(vg[1], [10, 10, 20, 20]), _vg_entry(vg[2], [50, 40, 30, 20]), _vg_entry(vg[3], [0, 5, 40, 30]),
         _vg_entry(vg[4], [60.5, 30.25, 20, 10]), _vg_entry(vg[5], [5, 60, 30, 25]), _vg_entry(vg[6], [30, 20, 50, 40])]
    coco = [{"val_image_id": i} for i in (101, 102, 103, 104, 105, 106, 107)]
    return {
        "focus_attribute": [
            {"reference": a[0], "target": a[1], "gallery": [a[2], a[3], a[4]], "condition": "color"},
            {"reference": a[3], "target": a[5], "gallery": [a[0], a[1], a[2], a[4]], "condition": "material"}],
        "change_attribute": [
            {"reference": a[1], "target": a[2], "gallery": [a[3], a[0], a[5]], "condition": "red"},
            {"reference": a[4], "target": a[0], "gallery": [a[1], a[2], a[3]], "condition": "wooden"},
            {"reference": a[5], "target": a[4], "gallery": [a[0], a[3], a[1]], "condition": "striped"}],
        "focus_object": [
            {"reference": coco[0], "target": coco[1], "gallery": [coco[2], coco[3], coco[4]], "condition": "dog"},
            {"reference": coco[5], "target": coco[6], "gallery": [coco[0], coco[1], coco[2]], "condition": "car"}],
        "change_object": [
            {"reference": coco[1], "target": coco[2], "gallery": [coco[3], coco[4], coco[5]], "condition": "wall"},
            {"reference": coco[3], "target": coco[0], "gallery": [coco[5], coco[0], coco[6], coco[2]],
             "condition": "bench"}],
    }


def _genecis_broken_rows() -> dict[str, list[tuple[dict, str, str]]]:
    """task -> broken rows with their (code, field)."""
    box = [10, 10, 20, 20]
    coco = [{"val_image_id": i} for i in (101, 102, 103, 104)]
    return {
        "focus_attribute": [({"reference": _vg_entry("2001", box), "target": _vg_entry("2002", box),
                              "gallery": [_vg_entry("2003", box)], "condition": "  "}, "empty_text", "condition")],
        "change_attribute": [({"reference": _vg_entry("2001", box), "target": _vg_entry("2002", box),
                               "gallery": [_vg_entry("2003", box), _vg_entry("2004", [1, 2, 3])],
                               "condition": "red"}, "bad_type", "gallery[1].instance_bbox")],
        "focus_object": [({"reference": coco[0], "target": coco[1], "gallery": [coco[2]]}, "missing_field",
                          "condition")],
        "change_object": [({"reference": {"val_image_id": "101"}, "target": coco[1], "gallery": [coco[2]],
                            "condition": "wall"}, "bad_type", "reference.val_image_id"),
                          ({"reference": coco[0], "target": coco[1], "gallery": [{"val_image_id": 999}, coco[3]],
                            "condition": "tree"}, "missing_image_file", "")],
    }


def write_genecis(root: str, broken: bool = False, layout: str = "coco_vg") -> dict:
    """A tiny GeneCIS release: the 4 tasks, 2-3 queries each, galleries of 3-4 entries, one target repeated in its
    gallery, 120x90 Visual Genome images. `layout` "coco_vg": ``coco/val2017/`` and ``vg/``; "flat": ``val2017/``
    and VG 1.2's two folders ``VG_100K/``, ``VG_100K_2/``. `broken` appends one broken record of each kind and a
    query whose gallery image (COCO 999) has no file.

    Returns valid_query_ids, reader_query_ids, broken ({query id or image id: code}), broken_fields, num_images
    (distinct image keys of the valid queries), reader_num_images, keys ({query id: (reference, candidates)}) with
    expected keys computed independently of the reader."""
    assert layout in ("coco_vg", "flat")
    rows = _genecis_rows()
    info: dict = {"valid_query_ids": [], "reader_query_ids": [], "broken": {}, "broken_fields": {}, "keys": {}}
    coco_dir = os.path.join("coco", "val2017") if layout == "coco_vg" else "val2017"
    for coco_id in range(101, 108):
        write_image(os.path.join(root, coco_dir, f"{coco_id:012d}.jpg"), 500 + coco_id, size=(48, 40))
    for i in range(1, 7):
        vg_dir = "vg" if layout == "coco_vg" else ("VG_100K" if i % 2 else "VG_100K_2")
        write_image(os.path.join(root, vg_dir, f"{2000 + i}.jpg"), 600 + i, size=(120, 90))

    def key(entry: dict) -> str:
        return str(entry["val_image_id"]) if "val_image_id" in entry else _vg_key(entry["image_id"],
                                                                                    entry["instance_bbox"])

    valid_keys: set[str] = set()
    reader_keys: set[str] = set()
    for task in GENECIS_TASKS:
        task_rows = list(rows[task])
        for i, row in enumerate(task_rows):
            qid = f"{task}/{i}"
            info["valid_query_ids"].append(qid)
            info["keys"][qid] = (key(row["reference"]), tuple(key(e) for e in [row["target"], *row["gallery"]]))
            valid_keys.update([info["keys"][qid][0], *info["keys"][qid][1]])
        if broken:
            for row, code, field in _genecis_broken_rows()[task]:
                qid = f"{task}/{len(task_rows)}"
                task_rows.append(row)
                info["broken"][qid] = code
                info["broken_fields"][qid] = field
                if code == "missing_image_file":
                    info["reader_query_ids"].append(qid)
                    info["broken"]["999"] = code
                    reader_keys.update(key(e) for e in [row["reference"], row["target"], *row["gallery"]])
        write_json(os.path.join(root, "genecis", f"{task}.json"), task_rows)
    info["reader_query_ids"] = sorted(info["valid_query_ids"] + info["reader_query_ids"])
    info["num_images"] = len(valid_keys)
    info["reader_num_images"] = len(valid_keys | reader_keys)
    return info
