"""CIRCO (miccunifi/CIRCO): the release reader, the official mAP@K of ``src/evaluation.py`` (compute_metrics, the
evaluation server's code) and the test server's submission file (README "Submission Format").

Layout under ``--root``: ``annotations/{val,test}.json`` (a list of queries, ``id`` = list position),
``COCO2017_unlabeled/annotations/image_info_unlabeled2017.json`` (``images[]`` with ``id`` and ``file_name``) and
the images in ``COCO2017_unlabeled/unlabeled2017/<file_name>``. The gallery is every image of that file; image keys
and candidate ids are the COCO ids as strings.

The model reads ``relative_caption`` only. SEARLE and other zero-shot methods may build their prompt from
``shared_concept`` too, so it is kept in ``extra`` (with ``semantic_aspects``), where a prompt template can use it.
Queries on val hold all ``gt_img_ids`` as targets, ``target_img_id`` first; test rows have none.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

from idmr_jax.data.shards import file_sha256
from idmr_jax.tasks.cir.benchmarks.base import ConversionError, Image, Query, Release, Skip, load_json, \
    require_ranking

NAME = "circo"
SPLITS = ("val", "test")
LABELLED_SPLITS = ("val",)
MAP_KS = (5, 10, 25, 50)
# The server reads the top 50 of each query; so does the official val evaluation.
OUTPUT_TOP = MAP_KS[-1]
IMAGE_INFO = "COCO2017_unlabeled/annotations/image_info_unlabeled2017.json"
IMAGE_DIR = "COCO2017_unlabeled/unlabeled2017"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field_problem(entry: Mapping[str, Any], field: str, kind: type, expected: str) -> tuple[str, str, str] | None:
    """A missing field, or one whose value is not of `kind` (bool never counts as int)."""
    if field not in entry:
        return field, "missing_field", f"no '{field}'"
    value = entry[field]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        return field, "bad_type", f"'{field}' is {type(value).__name__}, expected {expected}"
    return None


def _label_problem(entry: Mapping[str, Any], gallery: set[int]) -> tuple[str, str, str] | None:
    """The first problem of a val row's labels: target_img_id, gt_img_ids and semantic_aspects."""
    problem = _field_problem(entry, "target_img_id", int, "an int") or \
        _field_problem(entry, "gt_img_ids", list, "a list of ints")
    if problem:
        return problem
    gt_ids = entry["gt_img_ids"]
    if not gt_ids:
        return "gt_img_ids", "missing_field", "no ground truth ids (AP would divide by zero)"
    for j, gt_id in enumerate(gt_ids):
        if not _is_int(gt_id):
            return f"gt_img_ids[{j}]", "bad_type", f"gt id is {type(gt_id).__name__}, expected an int"
        if gt_id not in gallery:
            return f"gt_img_ids[{j}]", "unknown_name", f"image {gt_id} is not in the gallery"
    # The release states target_img_id == gt_img_ids[0]; Recall@K and the targets' order rely on it being a gt.
    if entry["target_img_id"] not in gt_ids:
        return "target_img_id", "inconsistent_field", f"{entry['target_img_id']} is not among gt_img_ids"
    aspects = entry.get("semantic_aspects")
    problem = _field_problem(entry, "semantic_aspects", list, "a list of strings")
    if problem is None and not all(isinstance(a, str) for a in aspects):
        problem = "semantic_aspects", "bad_type", "'semantic_aspects' holds a non-string"
    return problem


def check_query_record(entry: Any, gallery: set[int], labelled: bool) -> tuple[str, str, str] | None:
    """The first problem of one annotation row as (field, code, reason), or None when it is usable.

    `gallery` holds the gallery's COCO ids; `labelled` (val) also requires target_img_id, gt_img_ids (each in the
    gallery) and semantic_aspects.
    """
    if not isinstance(entry, dict):
        return "", "bad_type", f"record is {type(entry).__name__}, expected an object"
    problem = (_field_problem(entry, "id", int, "an int")
               or _field_problem(entry, "relative_caption", str, "a string"))
    if problem is None and not entry["relative_caption"].strip():
        problem = "relative_caption", "empty_text", "empty relative_caption"
    problem = (problem or _field_problem(entry, "shared_concept", str, "a string")
               or _field_problem(entry, "reference_img_id", int, "an int"))
    if problem is None and entry["reference_img_id"] not in gallery:
        problem = "reference_img_id", "unknown_name", f"image {entry['reference_img_id']} is not in the gallery"
    if problem is None and labelled:
        problem = _label_problem(entry, gallery)
    return problem


def _read_gallery(info: Any, file: str) -> tuple[list[Image], list[Skip]]:
    """Every usable entry of ``images[]``, sorted by id (the rank-tie order); a Skip for each other entry."""
    if not isinstance(info, dict) or not isinstance(info.get("images"), list):
        raise ConversionError(f"{file}: expected a JSON object with an 'images' list")
    by_id: dict[int, Image] = {}
    skips = []
    for index, entry in enumerate(info["images"]):
        image_id = entry.get("id") if isinstance(entry, dict) else None
        name = str(image_id) if image_id is not None else None
        if not isinstance(entry, dict):
            problem = "", "bad_type", f"entry is {type(entry).__name__}, expected an object"
        else:
            problem = _field_problem(entry, "id", int, "an int") or _field_problem(entry, "file_name", str, "a string")
        if problem is None and not entry["file_name"]:
            problem = "file_name", "missing_field", "empty file_name"
        if problem is None and image_id in by_id:
            problem = "id", "duplicate_name", f"id {image_id} already listed; first entry kept"
        if problem is not None:
            skips.append(Skip(file, index, name, *problem, "record_skipped"))
            continue
        by_id[image_id] = Image(key=str(image_id), image_id=str(image_id),
                                path=posixpath.join(IMAGE_DIR, entry["file_name"]))
    return [by_id[i] for i in sorted(by_id)], skips


def _query(entry: Mapping[str, Any], labelled: bool, file: str, index: int) -> Query:
    extra: dict[str, Any] = {"shared_concept": entry["shared_concept"]}
    targets: tuple[str, ...] = ()
    if labelled:
        gt_ids = list(entry["gt_img_ids"])
        gt_ids.remove(entry["target_img_id"])  # first occurrence: the length (|gt| of the AP) is kept
        targets = tuple(str(i) for i in [entry["target_img_id"], *gt_ids])
        extra["semantic_aspects"] = list(entry["semantic_aspects"])
    return Query(query_id=str(entry["id"]), reference=str(entry["reference_img_id"]),
                 text=entry["relative_caption"], targets=targets, extra=extra, source=file, source_index=index)


def read_release(root: str, split: str) -> Release:
    """Reads CIRCO's `split` ("val" or "test") under `root` (module docstring).

    Images: every usable entry of the unlabeled-2017 image info, sorted by id. Queries: the annotation rows in
    file order; a row is skipped (and listed) for a missing or mistyped field, an empty relative_caption, a
    reference or gt id outside the gallery, or a repeated id.
    """
    if split not in SPLITS:
        raise ValueError(f"circo: unknown split {split!r}; known: {SPLITS}")
    ann_rel = f"annotations/{split}.json"
    rows = load_json(os.path.join(root, ann_rel), root)
    info = load_json(os.path.join(root, IMAGE_INFO), root)
    if not isinstance(rows, list):
        raise ConversionError(f"{ann_rel}: expected a JSON list of queries, got {type(rows).__name__}")
    images, skips = _read_gallery(info, IMAGE_INFO)
    gallery = {int(image.key) for image in images}
    labelled = split in LABELLED_SPLITS
    queries: list[Query] = []
    first_use: dict[int, int] = {}  # id -> index of the first row that gives it
    for index, entry in enumerate(rows):
        query_id = entry.get("id") if isinstance(entry, dict) else None
        problem = check_query_record(entry, gallery, labelled)
        if problem is None and query_id in first_use:
            problem = "id", "duplicate_query", f"id already given by row {first_use[query_id]}"
        if _is_int(query_id):
            first_use.setdefault(query_id, index)
        if problem is not None:
            name = str(query_id) if query_id is not None else None
            skips.append(Skip(ann_rel, index, name, *problem, "record_skipped"))
            continue
        queries.append(_query(entry, labelled, ann_rel, index))
    sources = {rel: file_sha256(os.path.join(root, rel)) for rel in (ann_rel, IMAGE_INFO)}
    counts = {"images": len(images), "queries": len(queries), "image_entries": len(info["images"]),
              "annotation_rows": len(rows), "skipped": len(skips)}
    return Release(NAME, split, images, queries, skips, sources, counts)


def output_ranking(query: Query, ranked: Sequence[str], images: Mapping[str, Image]) -> list[str]:
    """The top 50 as ranked, the reference kept: the official evaluation scores the ranking as submitted."""
    del query, images  # the keys are the COCO ids
    return list(ranked[:OUTPUT_TOP])


def _checked(query: Query, ranking: Sequence[str]) -> list[str]:
    ranking = [str(c) for c in ranking]
    if len(set(ranking)) != len(ranking):
        # The evaluation server refuses a submission that lists an image twice.
        raise ValueError(f"circo: query {query.query_id!r}: its ranking lists an image twice")
    return ranking


def average_precisions(ranking: Sequence[str], ground_truth: Sequence[str]) -> dict[int, float]:
    """AP@K for K in MAP_KS as CIRCO ``evaluation.py``: sum over r <= K of precision@r at each relevant rank,
    divided by min(|gt|, K) (|gt| counts ``gt_img_ids`` as released)."""
    relevant = set(ground_truth)
    precision_sum = [0.0]  # precision_sum[r] = sum of precision@i over relevant ranks i <= r
    hits = 0
    for r, candidate in enumerate(ranking[:MAP_KS[-1]], start=1):
        if candidate in relevant:
            hits += 1
        precision_sum.append(precision_sum[-1] + (hits / r if candidate in relevant else 0.0))
    return {k: precision_sum[min(k, len(ranking))] / min(len(ground_truth), k) for k in MAP_KS}


def compute_metrics(queries: Sequence[Query], rankings: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """CIRCO val mAP@K (K = 5, 10, 25, 50) in percent, each ranking scored as written (reference kept).

    ValueError naming the query when it has no ranking, lists an image twice, or is shorter than 50 (so it is
    the whole gallery) yet misses one of its ground truths.
    """
    labelled = [q for q in queries if q.targets]
    if not labelled:
        raise ValueError("circo: no labelled query to score (the test split is scored by the server)")
    totals = dict.fromkeys(MAP_KS, 0.0)
    for query in labelled:
        ranking = _checked(query, require_ranking(rankings, query, NAME))
        missing = sorted(set(query.targets) - set(ranking))
        if missing and len(ranking) < OUTPUT_TOP:
            raise ValueError(f"circo: query {query.query_id!r}: ground truth {missing} not in its ranking of "
                             f"{len(ranking)} images (the whole gallery or >= 50)")
        for k, ap in average_precisions(ranking, query.targets).items():
            totals[k] += ap
    return {f"circo/mAP@{k}": 100.0 * totals[k] / len(labelled) for k in MAP_KS}


def submission_files(queries: Sequence[Query], rankings: Mapping[str, Sequence[str]]) -> dict[str, object]:
    """The test server's file (README "Submission Format"): ``{"<id>": [top-50 COCO ids as ints]}`` for every
    query."""
    submission = {}
    for query in queries:
        ranking = _checked(query, require_ranking(rankings, query, NAME))
        submission[query.query_id] = [int(c) for c in ranking[:OUTPUT_TOP]]
    return {"circo_test_submission.json": submission}
