"""GeneCIS (facebookresearch/genecis): four tasks, each query ranking its own small gallery; R@1, R@2, R@3.

Release layout under ``root`` (the GeneCIS templates, then the two image collections it builds on):

    genecis/<task>.json     [{"reference": entry, "target": entry, "gallery": [entry, ...], "condition": str}, ...]
                            for task in focus_attribute, change_attribute, focus_object, change_object
    coco/val2017/<id:012d>.jpg   object tasks, entry {"val_image_id": int}: the whole COCO val2017 image
        (also accepted: val2017/)
    vg/<image_id>.jpg            attribute tasks, entry {"image_id": str|int, "instance_bbox": [x, y, w, h]} on
        Visual Genome 1.2 (also accepted: VG_100K/ and VG_100K_2/, the two folders VG 1.2 ships in)

Each image is looked up in the accepted folders in that order; one absent everywhere keeps the path in the first
folder present, and the converter reports it missing. A missing task file is reported as a skip ("missing_file",
the task is not evaluated); with none of the four present the layout is broken (`ConversionError`).

Attribute tasks use a region of the photo. The official loader (``datasets/vaw_dataset.py``, DILATION = 0.7)
widens the box: left = max(0, x - 0.7 w), top = max(0, y - 0.7 h), right = min(W, left + 1.7 w),
bottom = min(H, top + 1.7 h) -- note right/bottom start from the *clamped* left/top -- then pads the crop to a
black square. The reader applies everything that does not need the image size and stores
``(left, top, left + 1.7 w, top + 1.7 h)`` in `Image.crop` (rounded to 1e-6 px); the converter clamps right/bottom
to the image, which gives the official box exactly. Keys: an object image is its COCO id, a crop
``"<image_id>@<left>,<top>,<right>,<bottom>"`` with those numbers.

Queries: id ``"<task>/<index>"``, text = the condition, candidates = ``[target] + gallery`` in slot order
(``Query.candidates[j]`` is slot j; a target listed again in its own gallery -- one change_object query does -- is
valid: two slots with the same key), targets = (target key,). Images: every distinct key, sorted; an image two
tasks share (the object tasks share COCO images) is listed once, with the group of the first task in `TASKS`
order that names it -- the group is informational here, since every query ranks its own candidates.

Rankings (``RANKS_SLOTS``): a key does not identify a slot when the target is repeated, so for GeneCIS the
evaluator passes ``ranked`` as slot numbers, as strings ("0" .. "14"), best first, and `output_ranking` writes them
unchanged (the whole pool: it is smaller than 50). Protocol (``eval/eval_functions.py`` validate with topk (1, 2, 3),
``utils/metric_utils.py`` get_recall): R@K = % of the task's queries with slot "0" (the target) in the top K.
The official loaders (``datasets/coco_dataset.py``, ``datasets/vaw_dataset.py``) evaluate only the queries whose
gallery has the task's most common length (``np.unique`` + ``argmax``: on a tie the shorter length) and discard the
others; `compute_metrics` does the same, and `modal_queries` says which queries count. The converter keeps every
query, so the rankings file has them all.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from idmr_jax.data.shards import file_sha256
from idmr_jax.tasks.cir.benchmarks.base import (ConversionError, Image, ImageFolders, Query, Release, Skip,
                                                group_recalls, load_json, require_ranking)

NAME = "genecis"
SPLITS = ("val",)
LABELLED_SPLITS = ("val",)
TASKS = ("focus_attribute", "change_attribute", "focus_object", "change_object")
OBJECT_TASKS = ("focus_object", "change_object")
COCO_FOLDERS = (os.path.join("coco", "val2017"), "val2017")
VG_FOLDERS = ("vg", "VG_100K", "VG_100K_2")
DILATION = 0.7  # datasets/vaw_dataset.py
RECALL_AT = (1, 2, 3)
RANKS_SLOTS = True  # the evaluator passes `ranked` as slot numbers (see the module docstring)
TARGET_SLOT = "0"


def task_file(task: str) -> str:
    """A task's annotation file, relative to the release root."""
    return os.path.join("genecis", f"{task}.json")


def widened_box(x: float, y: float, w: float, h: float) -> tuple[float, float, float, float]:
    """The official crop of an attribute box before the right/bottom clamp to the image (vaw_dataset.py)."""
    left, top = max(0.0, x - DILATION * w), max(0.0, y - DILATION * h)
    box = (left, top, left + (1 + DILATION) * w, top + (1 + DILATION) * h)
    return tuple(round(v, 6) + 0.0 for v in box)  # + 0.0: no "-0" in keys


def _number(value: float) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".")


class _EntryError(Exception):
    """A gallery/reference/target entry that cannot be used: the field (relative to the entry), code, reason."""

    def __init__(self, field: str, code: str, reason: str):
        super().__init__(reason)
        self.field, self.code, self.reason = field, code, reason


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _entry_image(task: str, entry: object, folders: ImageFolders) -> Image:
    """One released entry as an `Image`; `_EntryError` when it cannot be used."""
    if not isinstance(entry, dict):
        raise _EntryError("", "bad_type", f"expected an object, got {type(entry).__name__}")
    if task in OBJECT_TASKS:
        if "val_image_id" not in entry:
            raise _EntryError(".val_image_id", "missing_field", "no 'val_image_id'")
        coco_id = entry["val_image_id"]
        if not isinstance(coco_id, int) or isinstance(coco_id, bool) or coco_id < 0:
            raise _EntryError(".val_image_id", "bad_type", f"expected a COCO id (int), got {coco_id!r}")
        return Image(key=str(coco_id), image_id=str(coco_id), path=folders.find(COCO_FOLDERS, [f"{coco_id:012d}.jpg"]),
                     group=task)
    for field in ("image_id", "instance_bbox"):
        if field not in entry:
            raise _EntryError(f".{field}", "missing_field", f"no '{field}'")
    image_id, bbox = entry["image_id"], entry["instance_bbox"]
    if isinstance(image_id, bool) or not isinstance(image_id, (str, int)) or str(image_id) == "":
        raise _EntryError(".image_id", "bad_type", f"expected a Visual Genome id, got {image_id!r}")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        raise _EntryError(".instance_bbox", "bad_type", f"expected [x, y, w, h] numbers, got {bbox!r}")
    if bbox[2] <= 0 or bbox[3] <= 0:
        raise _EntryError(".instance_bbox", "bad_type", f"box width and height must be > 0, got {bbox!r}")
    crop = widened_box(*(float(v) for v in bbox))
    image_id = str(image_id)
    return Image(key=f"{image_id}@{','.join(_number(v) for v in crop)}", image_id=image_id,
                 path=folders.find(VG_FOLDERS, [f"{image_id}.jpg"]), group=task, crop=crop)


def _read_query(task: str, index: int, row: object, folders: ImageFolders) -> tuple[Query, list[Image]] | Skip:
    """One released query with the images it names, or the `Skip` saying why it cannot be used."""
    file, query_id = task_file(task), f"{task}/{index}"

    def skip(field: str, code: str, reason: str) -> Skip:
        return Skip(file, index, query_id, field, code, reason, "record_skipped")

    if not isinstance(row, dict):
        return skip("", "bad_type", f"expected an object, got {type(row).__name__}")
    for field in ("reference", "target", "gallery", "condition"):
        if field not in row:
            return skip(field, "missing_field", f"no '{field}'")
    condition, gallery = row["condition"], row["gallery"]
    if not isinstance(condition, str):
        return skip("condition", "bad_type", f"expected a string, got {condition!r}")
    if not condition.strip():
        return skip("condition", "empty_text", "empty condition")
    if not isinstance(gallery, list) or not gallery:
        return skip("gallery", "bad_type", f"expected a non-empty list of entries, got {gallery!r}")
    fields = ["reference", "target"] + [f"gallery[{j}]" for j in range(len(gallery))]
    entries = [row["reference"], row["target"], *gallery]
    images = []
    for field, entry in zip(fields, entries):
        try:
            images.append(_entry_image(task, entry, folders))
        except _EntryError as e:
            return skip(field + e.field, e.code, e.reason)
    reference, *candidates = images  # candidates = [target] + gallery: slot j is candidates[j]
    query = Query(query_id=query_id, reference=reference.key, text=condition, targets=(candidates[0].key,),
                  group=task, candidates=tuple(image.key for image in candidates), source=file, source_index=index)
    return query, images


def read_release(root: str, split: str = "val") -> Release:
    """GeneCIS under `root` (one split, read as "val"): the tasks whose file is present, queries in file order."""
    if split not in SPLITS:
        raise ValueError(f"{NAME}: unknown split {split!r}; GeneCIS has one split, read as 'val'")
    present = [t for t in TASKS if os.path.isfile(os.path.join(root, task_file(t)))]
    if not present:
        raise ConversionError(f"{NAME}: no task file under {root}: expected {', '.join(map(task_file, TASKS))}")
    folders = ImageFolders(root)
    images: dict[str, Image] = {}
    queries: list[Query] = []
    skips: list[Skip] = []
    sources: dict[str, str] = {}
    counts: dict[str, int] = {}
    for task in TASKS:
        rel = task_file(task)
        if task not in present:
            skips.append(Skip(rel, None, task, "", "missing_file", "task file absent: the task is not evaluated",
                              "entry_ignored"))
            continue
        rows = load_json(os.path.join(root, rel), root)
        if not isinstance(rows, list):
            raise ConversionError(f"{rel}: expected a JSON list, got {type(rows).__name__}")
        sources[rel] = file_sha256(os.path.join(root, rel))
        task_queries = 0
        for index, row in enumerate(rows):
            parsed = _read_query(task, index, row, folders)
            if isinstance(parsed, Skip):
                skips.append(parsed)
                continue
            query, named = parsed
            queries.append(query)
            task_queries += 1
            for image in named:
                images.setdefault(image.key, image)  # first task naming it gives the group
        counts[f"queries/{task}"] = task_queries
    counts.update(images=len(images), queries=len(queries), skipped=len(skips))
    return Release(NAME, split, [images[k] for k in sorted(images)], queries, skips, sources, counts)


def output_ranking(query: Query, ranked: Sequence[str], images: Mapping[str, Image]) -> list[str]:
    """The slot numbers as ranked, unchanged (``RANKS_SLOTS``: `ranked` already holds slots, the whole pool).
    ValueError when `ranked` is not a permutation of the query's slots."""
    del images
    slots = [str(j) for j in range(len(query.candidates or ()))]
    if sorted(ranked, key=lambda s: (len(s), s)) != slots:
        raise ValueError(f"{NAME}: query {query.query_id!r}: ranking {list(ranked)!r} is not a permutation of its "
                         f"{len(slots)} slots")
    return list(ranked)


def modal_queries(queries: Sequence[Query]) -> list[Query]:
    """The labelled queries the official protocol scores: per task, those whose candidate pool has the task's most
    common size (ties: the smaller size, as ``np.unique`` then ``argmax``); see the module docstring."""
    sizes: dict[str, dict[int, int]] = {}
    for q in queries:
        if q.targets:
            by_size = sizes.setdefault(q.group, {})
            by_size[len(q.candidates or ())] = by_size.get(len(q.candidates or ()), 0) + 1
    modal = {task: min(by_size, key=lambda n: (-by_size[n], n)) for task, by_size in sizes.items()}
    return [q for q in queries if q.targets and len(q.candidates or ()) == modal[q.group]]


def compute_metrics(queries: Sequence[Query], rankings: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """R@1, R@2, R@3 per task (eval_functions.validate / metric_utils.get_recall), in percent, over the queries
    the official loaders keep (`modal_queries`), and ``genecis/avg/R@1`` = the mean over the tasks with queries.
    A scored query without a ranking, or whose ranking lacks slot "0", is a ValueError naming it."""
    ranks: dict[str, list[int | None]] = {}
    for query in modal_queries(queries):
        ranking = list(require_ranking(rankings, query, NAME))
        if TARGET_SLOT not in ranking:
            raise ValueError(f"{NAME}: query {query.query_id!r}: the target slot {TARGET_SLOT!r} is not in its ranking")
        ranks.setdefault(query.group, []).append(ranking.index(TARGET_SLOT))
    return group_recalls(NAME, ranks, RECALL_AT, TASKS, avg_ks=(1,))


def submission_files(queries: Sequence[Query], rankings: Mapping[str, Sequence[str]]) -> dict[str, object]:
    """GeneCIS has no test server: nothing to write."""
    del queries, rankings
    return {}
