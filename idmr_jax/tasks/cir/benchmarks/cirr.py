"""CIRR (Cuberick-Orion/CIRR, branch ``cirr_dataset``): the release reader, the validation protocol of CLIP4Cir
``src/validate.py`` (compute_cirr_val_metrics, also SEARLE's) and the test server's two submission files
(Test-split_server.md; CLIP4Cir ``src/cirr_test_submission.py``).

Two folder conventions are read (EVAL_FORMATS.md, CIRR section):

- README layout, ``--root`` = the ``cirr`` folder: ``captions/cap.rc2.<split>.json``,
  ``image_splits/split.rc2.<split>.json`` and the images under ``img_raw/`` (split paths such as ``./dev/x.png``
  are relative to ``img_raw``);
- CLIP4Cir/SEARLE layout, ``--root`` = the folder holding ``cirr/{captions,image_splits}`` beside
  ``{train,dev,test1}/`` (split paths relative to ``--root``).

The split map ``{name: path}`` lists every image of the split (the gallery, ranked in name order on ties); every
caption record is one query, in file order. ``test1`` has no ``target_hard``/``target_soft``: the split is scored
by the server only. Documented oddities (a ``target_hard`` absent from ``target_soft``, soft values -1.0/0.2/0.5/1.0)
are valid records: target_soft is kept in ``extra`` and never read by the metrics, as in the official code.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

from idmr_jax.data.shards import file_sha256
from idmr_jax.tasks.cir.benchmarks.base import ConversionError, Image, Query, Release, Skip, load_json, \
    require_ranking

NAME = "cirr"
SPLITS = ("val", "test")
LABELLED_SPLITS = ("val",)
# The released file names call the test split "test1".
FILE_SPLIT = {"val": "val", "test": "test1"}
RECALL_KS = (1, 5, 10, 50)
SUBSET_KS = (1, 2, 3)
# Written per query: the top 51, so that 50 remain once the reference is removed (R@50), plus every img_set member.
OUTPUT_TOP = RECALL_KS[-1] + 1
# (layout name, annotation folder, image folder), both relative to --root, in the order they are tried.
LAYOUTS = (("readme", "", "img_raw"), ("clip4cir", "cirr", ""))


def detect_layout(root: str) -> tuple[str, str, str]:
    """Which folder convention `root` holds: (layout name, annotation folder, image folder) relative to `root`;
    `ConversionError` naming both expected places when neither is there."""
    for layout in LAYOUTS:
        ann_dir = os.path.join(root, layout[1])
        if os.path.isdir(os.path.join(ann_dir, "captions")) and os.path.isdir(os.path.join(ann_dir, "image_splits")):
            return layout
    raise ConversionError(
        f"{root}: no CIRR annotations: expected captions/ and image_splits/ under the root (README layout, with "
        "img_raw/) or under cirr/ beside train/, dev/, test1/ (CLIP4Cir/SEARLE layout)")


def _problem(field: str, code: str, reason: str) -> tuple[str, str, str]:
    return field, code, reason


def _bad_type(field: str, value: Any, expected: str) -> tuple[str, str, str]:
    return field, "bad_type", f"'{field}' is {type(value).__name__}, expected {expected}"


def _check_str(entry: Mapping[str, Any], field: str, names: set[str] | None = None) -> tuple[str, str, str] | None:
    """First problem of a string field naming a split image (when `names` is given)."""
    if field not in entry:
        return _problem(field, "missing_field", f"no '{field}'")
    value = entry[field]
    if not isinstance(value, str):
        return _bad_type(field, value, "a string")
    if names is not None and value not in names:
        return _problem(field, "unknown_name", f"{value!r} is not in the split map")
    return None


def _check_target_soft(entry: Mapping[str, Any]) -> tuple[str, str, str] | None:
    if "target_soft" not in entry:
        return _problem("target_soft", "missing_field", "no 'target_soft'")
    soft = entry["target_soft"]
    if not isinstance(soft, dict):
        return _bad_type("target_soft", soft, "an object")
    for name, value in soft.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return _bad_type(f"target_soft.{name}", value, "a number")
    return None


def _check_img_set(entry: Mapping[str, Any], names: set[str]) -> tuple[str, str, str] | None:
    if "img_set" not in entry:
        return _problem("img_set", "missing_field", "no 'img_set'")
    img_set = entry["img_set"]
    if not isinstance(img_set, dict):
        return _bad_type("img_set", img_set, "an object")
    if "id" not in img_set:
        return _problem("img_set.id", "missing_field", "no 'img_set.id'")
    if isinstance(img_set["id"], bool) or not isinstance(img_set["id"], int):
        return _bad_type("img_set.id", img_set["id"], "an int")
    if "members" not in img_set:
        return _problem("img_set.members", "missing_field", "no 'img_set.members'")
    members = img_set["members"]
    if not isinstance(members, list):
        return _bad_type("img_set.members", members, "a list")
    for j, member in enumerate(members):
        field = f"img_set.members[{j}]"
        if not isinstance(member, str):
            return _bad_type(field, member, "a string")
        if member not in names:
            return _problem(field, "unknown_name", f"{member!r} is not in the split map")
    return None


def check_caption_record(entry: Any, names: set[str], labelled: bool) -> tuple[str, str, str] | None:
    """The first problem of one caption record as (field, code, reason), or None when it is usable.

    `names` are the split's images; `labelled` (val) also requires target_hard and target_soft.
    """
    if not isinstance(entry, dict):
        return _problem("", "bad_type", f"record is {type(entry).__name__}, expected an object")
    if "pairid" not in entry:
        return _problem("pairid", "missing_field", "no 'pairid'")
    if isinstance(entry["pairid"], bool) or not isinstance(entry["pairid"], int):
        return _bad_type("pairid", entry["pairid"], "an int")
    problem = _check_str(entry, "caption")
    if problem is None and not entry["caption"].strip():
        problem = _problem("caption", "empty_text", "empty caption")
    problem = problem or _check_str(entry, "reference", names)
    if labelled:
        problem = problem or _check_str(entry, "target_hard", names) or _check_target_soft(entry)
    return problem or _check_img_set(entry, names)


def _read_split_map(split_map: Mapping[str, Any], file: str, image_dir: str) -> tuple[list[Image], list[Skip]]:
    """The split's images sorted by name (the official gallery lists them in file order; ties in a ranking are
    broken by this order, so it is fixed here) and a Skip for each entry whose path is not a string."""
    images, skips = [], []
    for index, (name, path) in enumerate(split_map.items()):
        if not isinstance(path, str) or not path:
            skips.append(Skip(file, index, name, "path", "bad_type", f"path is {path!r}, expected a relative path",
                              "record_skipped"))
            continue
        rel = posixpath.normpath(posixpath.join(image_dir, path.replace("\\", "/")))
        images.append(Image(key=name, image_id=name, path=rel))
    images.sort(key=lambda image: image.key)
    return images, skips


def _read_captions(captions: list[Any], file: str, names: set[str], labelled: bool) -> tuple[list[Query], list[Skip]]:
    queries, skips = [], []
    first_use: dict[int, int] = {}  # pairid -> index of the first record that gives it
    for index, entry in enumerate(captions):
        pairid = entry.get("pairid") if isinstance(entry, dict) else None
        name = str(pairid) if isinstance(pairid, (int, str)) and not isinstance(pairid, bool) else None
        problem = check_caption_record(entry, names, labelled)
        if problem is None and pairid in first_use:
            problem = _problem("pairid", "duplicate_query", f"pairid already given by record {first_use[pairid]}")
        if isinstance(pairid, int) and not isinstance(pairid, bool):
            first_use.setdefault(pairid, index)
        if problem is not None:
            skips.append(Skip(file, index, name, *problem, "record_skipped"))
            continue
        extra: dict[str, Any] = {"img_set_id": entry["img_set"]["id"]}
        if labelled:
            extra["target_soft"] = dict(entry["target_soft"])
        queries.append(Query(query_id=str(pairid), reference=entry["reference"], text=entry["caption"],
                             targets=(entry["target_hard"],) if labelled else (),
                             subset=tuple(entry["img_set"]["members"]), extra=extra, source=file,
                             source_index=index))
    return queries, skips


def read_release(root: str, split: str) -> Release:
    """Reads CIRR's `split` ("val" or "test") under `root` in either folder convention (module docstring).

    Images: every name of the split map, sorted by name, paths relative to `root`. Queries: the caption records
    in file order, query_id = str(pairid); a record is skipped (and listed) for a missing or mistyped field, an
    empty caption, a reference, target_hard or img_set member not in the split map, or a repeated pairid.
    """
    if split not in SPLITS:
        raise ValueError(f"cirr: unknown split {split!r}; known: {SPLITS}")
    _, ann_dir, image_dir = detect_layout(root)
    file_split = FILE_SPLIT[split]
    split_rel = posixpath.join(ann_dir, "image_splits", f"split.rc2.{file_split}.json")
    captions_rel = posixpath.join(ann_dir, "captions", f"cap.rc2.{file_split}.json")
    split_map = load_json(os.path.join(root, split_rel), root)
    captions = load_json(os.path.join(root, captions_rel), root)
    if not isinstance(split_map, dict):
        raise ConversionError(f"{split_rel}: expected a JSON object {{name: path}}, got {type(split_map).__name__}")
    if not isinstance(captions, list):
        raise ConversionError(f"{captions_rel}: expected a JSON list of records, got {type(captions).__name__}")
    images, image_skips = _read_split_map(split_map, split_rel, image_dir)
    names = {image.key for image in images}
    queries, query_skips = _read_captions(captions, captions_rel, names, split in LABELLED_SPLITS)
    sources = {rel: file_sha256(os.path.join(root, rel)) for rel in (split_rel, captions_rel)}
    counts = {"images": len(images), "queries": len(queries), "split_map_entries": len(split_map),
              "caption_records": len(captions), "skipped": len(image_skips) + len(query_skips)}
    return Release(NAME, split, images, queries, image_skips + query_skips, sources, counts)


def output_ranking(query: Query, ranked: Sequence[str], images: Mapping[str, Image]) -> list[str]:
    """The top 51 as ranked (the reference is still in it: the metrics remove it, so 50 remain), then every
    img_set member not yet listed, in rank order, so that Rs@K can be computed from the written line alone."""
    del images  # CIRR's candidate ids are the keys (image names)
    head = list(ranked[:OUTPUT_TOP])
    members = set(query.subset) - set(head)
    return head + [key for key in ranked[OUTPUT_TOP:] if key in members]


def _without_reference(query: Query, ranking: Sequence[str]) -> list[str]:
    if len(set(ranking)) != len(ranking):
        raise ValueError(f"cirr: query {query.query_id!r}: its ranking lists a candidate twice")
    return [name for name in ranking if name != query.reference]


def _subset_ranking(query: Query, ranking: Sequence[str]) -> list[str]:
    """The ranking (reference already removed) restricted to the query's img_set members, in rank order."""
    members = set(query.subset) - {query.reference}
    return [name for name in ranking if name in members]


def compute_metrics(queries: Sequence[Query], rankings: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """CIRR val metrics in percent, as CLIP4Cir ``validate.py`` compute_cirr_val_metrics: the reference is removed
    from each ranking; R@K (K = 1, 5, 10, 50) = share of queries whose target_hard is in the top K; Rs@K
    (K = 1, 2, 3) = the same on the ranking restricted to the img_set members; ``cirr/avg`` = (R@5 + Rs@1) / 2.

    ValueError naming the query when it has no ranking, lists a candidate twice, misses its target although it
    holds fewer than 50 candidates (so it is not the top 50 of the gallery), or leaves out its target although the
    target is one of its img_set members. A target outside its own img_set (none in the released val split) is
    a miss at every Rs@K, as in the official code.
    """
    labelled = [q for q in queries if q.targets]
    if not labelled:
        raise ValueError("cirr: no labelled query to score (the test split is scored by the server)")
    recall_hits = dict.fromkeys(RECALL_KS, 0)
    subset_hits = dict.fromkeys(SUBSET_KS, 0)
    for query in labelled:
        ranking = _without_reference(query, require_ranking(rankings, query, NAME))
        target = query.targets[0]
        if target in ranking:
            rank = ranking.index(target)
            for k in RECALL_KS:
                recall_hits[k] += rank < k
        elif len(ranking) < RECALL_KS[-1]:
            raise ValueError(f"cirr: query {query.query_id!r}: target {target!r} is not in its ranking, which holds "
                             f"only {len(ranking)} candidates besides the reference (the whole gallery or >= 50)")
        subset = _subset_ranking(query, ranking)
        if target not in query.subset:
            continue  # as the official code: a target outside its img_set is a miss at every Rs@K
        if target not in subset:
            raise ValueError(f"cirr: query {query.query_id!r}: target {target!r} is an img_set member but its "
                             f"ranking does not list it ({subset}): write every member (output_ranking)")
        rank = subset.index(target)
        for k in SUBSET_KS:
            subset_hits[k] += rank < k
    n = len(labelled)
    metrics = {f"cirr/R@{k}": 100.0 * recall_hits[k] / n for k in RECALL_KS}
    metrics.update({f"cirr/Rs@{k}": 100.0 * subset_hits[k] / n for k in SUBSET_KS})
    # The papers' headline number (CLIP4Cir, SEARLE): the mean of R@5 and Rs@1.
    metrics["cirr/avg"] = (metrics["cirr/R@5"] + metrics["cirr/Rs@1"]) / 2
    return metrics


def submission_files(queries: Sequence[Query], rankings: Mapping[str, Sequence[str]]) -> dict[str, object]:
    """The test server's two files (Test-split_server.md): ``cirr_recall.json`` with each pairid's top 50 and
    ``cirr_recall_subset.json`` with its top 3 img_set members, the reference removed from both, each object also
    holding ``"version": "rc2"`` and its ``"metric"``."""
    recall: dict[str, Any] = {"version": "rc2", "metric": "recall"}
    recall_subset: dict[str, Any] = {"version": "rc2", "metric": "recall_subset"}
    for query in queries:
        ranking = _without_reference(query, require_ranking(rankings, query, NAME))
        recall[query.query_id] = ranking[:RECALL_KS[-1]]
        recall_subset[query.query_id] = _subset_ranking(query, ranking)[:SUBSET_KS[-1]]
    return {"cirr_recall.json": recall, "cirr_recall_subset.json": recall_subset}
