"""FashionIQ (XiaoxiaoGuo/fashion-iq): three categories, each its own gallery; R@10 and R@50 per category.

Release layout under ``root``:

    captions/cap.<cat>.<split>.json       [{"target": asin, "candidate": asin, "captions": [str, str]}, ...]
                                          (test rows have no "target")
    image_splits/split.<cat>.<split>.json [asin, ...]  the category's gallery, in this order
    images/<asin>.<ext>                   the CLIP4Cir / SEARLE convention, or
    resized_images/<cat>/<asin>.<ext>     the start_kit convention

for cat in dress, shirt, toptee; ``<ext>`` is .jpg, .png or .jpeg, found per image (either folder convention, also
mixed). Keys: an image is ``"<cat>/<asin>"`` (an ASIN can sit in two categories' galleries), a query
``"<cat>/<index in the caption file>"``.

The text is CLIP4Cir's join (``src/validate.py``), the form most CIR papers report: the first caption stripped of
``".?, "`` and capitalized, " and ", the second stripped, in the released order. The release has a few queries
whose first caption is empty (shirt val 1, toptee val 2); they are valid and joined literally, giving e.g.
``" and is grey with a design on the back"``, as CLIP4Cir does. SEARLE's reversed-order variant is not offered:
it makes two texts per query, which the one-text `Query` of this contract cannot carry (both raw captions are
kept in ``Query.extra["captions"]`` for anyone who wants it).

Protocol (CLIP4Cir ``validate.py``, SEARLE): per category, rank the category's gallery; the reference stays in
the ranking; R@K = % of the category's queries whose target is in the top K, K in (10, 50); the average is the
plain mean over the categories.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from idmr_jax.data.shards import file_sha256
from idmr_jax.tasks.cir.benchmarks.base import (ConversionError, Image, ImageFolders, Query, Release, Skip,
                                                group_recalls, load_json, require_ranking)

NAME = "fashioniq"
SPLITS = ("val", "test")
LABELLED_SPLITS = ("val",)
CATEGORIES = ("dress", "shirt", "toptee")
IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg")
RECALL_AT = (10, 50)
TOP_K = 50  # the longest cut the metrics need


def join_captions(first: str, second: str) -> str:
    """The model's text for one query: CLIP4Cir ``src/validate.py``'s join of the two relative captions."""
    return first.strip(".?, ").capitalize() + " and " + second.strip(".?, ")


def annotation_files(category: str, split: str) -> tuple[str, str]:
    """The caption file and the image-split file of one category, relative to the release root."""
    return (os.path.join("captions", f"cap.{category}.{split}.json"),
            os.path.join("image_splits", f"split.{category}.{split}.json"))


def image_path(folders: ImageFolders, category: str, asin: str) -> str:
    """An ASIN's image path relative to the root, in either folder convention and with any accepted extension;
    for an absent file, the .jpg path in the convention present (the converter reports the file missing)."""
    return folders.find(("images", os.path.join("resized_images", category)),
                        [asin + ext for ext in IMAGE_EXTENSIONS])


def _record_skip(file: str, index: int, name: str | None, field: str, code: str, reason: str) -> Skip:
    return Skip(file, index, name, field, code, reason, "record_skipped")


def _read_gallery(category: str, names: list, file: str, folders: ImageFolders,
                  skips: list[Skip]) -> dict[str, Image]:
    """The category's gallery, ASIN -> Image, in split-file order; unusable entries go to `skips`."""
    gallery: dict[str, Image] = {}
    for index, asin in enumerate(names):
        if not isinstance(asin, str) or not asin:
            skips.append(Skip(file, index, None, "", "bad_type", f"expected a non-empty ASIN string, got {asin!r}",
                              "entry_ignored"))
        elif asin in gallery:
            skips.append(Skip(file, index, asin, "", "duplicate_name", "ASIN listed twice; the first is kept",
                              "entry_ignored"))
        else:
            gallery[asin] = Image(key=f"{category}/{asin}", image_id=asin, path=image_path(folders, category, asin),
                                  group=category)
    return gallery


def _read_query(category: str, index: int, row: object, gallery: Mapping[str, Image], file: str,
                labelled: bool) -> Query | Skip:
    """One caption row as a `Query`, or the `Skip` saying why it cannot be used."""
    query_id = f"{category}/{index}"
    if not isinstance(row, dict):
        return _record_skip(file, index, query_id, "", "bad_type", f"expected an object, got {type(row).__name__}")
    required = ("candidate", "captions", "target") if labelled else ("candidate", "captions")
    for field in required:
        if field not in row:
            return _record_skip(file, index, query_id, field, "missing_field", f"no '{field}'")
    captions = row["captions"]
    if not (isinstance(captions, list) and len(captions) == 2 and all(isinstance(c, str) for c in captions)):
        return _record_skip(file, index, query_id, "captions", "bad_type",
                            f"expected a list of 2 strings, got {captions!r}")
    if not any(c.strip(".?, \t\n") for c in captions):
        # One empty caption is a documented oddity of the release (valid); with both empty there is no text at all.
        return _record_skip(file, index, query_id, "captions", "empty_text", "both captions are empty")
    named = [f for f in ("candidate", "target") if f in required]
    for field in named:
        value = row[field]
        if not isinstance(value, str):
            return _record_skip(file, index, query_id, field, "bad_type", f"expected an ASIN string, got {value!r}")
        if value not in gallery:
            return _record_skip(file, index, query_id, field, "unknown_name",
                                f"{value!r} is not in image_splits/split.{category}.*.json")
    targets = (gallery[row["target"]].key,) if labelled else ()
    return Query(query_id=query_id, reference=gallery[row["candidate"]].key, text=join_captions(*captions),
                 targets=targets, group=category, extra={"captions": list(captions)}, source=file, source_index=index)


def read_release(root: str, split: str) -> Release:
    """FashionIQ `split` ("val" or "test") under `root`: one gallery per category, queries in caption-file order.

    Every category's two annotation files must be present (`ConversionError` naming the missing ones)."""
    if split not in SPLITS:
        raise ValueError(f"{NAME}: unknown split {split!r}; expected one of {SPLITS}")
    missing = [rel for cat in CATEGORIES for rel in annotation_files(cat, split)
               if not os.path.isfile(os.path.join(root, rel))]
    if missing:
        raise ConversionError(f"{NAME}: missing under {root}: {', '.join(missing)}")
    labelled = split in LABELLED_SPLITS
    folders = ImageFolders(root)
    images: list[Image] = []
    queries: list[Query] = []
    skips: list[Skip] = []
    sources: dict[str, str] = {}
    counts: dict[str, int] = {}
    for category in CATEGORIES:
        captions_file, split_file = annotation_files(category, split)
        names = load_json(os.path.join(root, split_file), root)
        rows = load_json(os.path.join(root, captions_file), root)
        for rel, obj in ((split_file, names), (captions_file, rows)):
            if not isinstance(obj, list):
                raise ConversionError(f"{rel}: expected a JSON list, got {type(obj).__name__}")
            sources[rel] = file_sha256(os.path.join(root, rel))
        gallery = _read_gallery(category, names, split_file, folders, skips)
        images.extend(gallery.values())
        category_queries = 0
        for index, row in enumerate(rows):
            parsed = _read_query(category, index, row, gallery, captions_file, labelled)
            if isinstance(parsed, Skip):
                skips.append(parsed)
            else:
                queries.append(parsed)
                category_queries += 1
        counts[f"images/{category}"] = len(gallery)
        counts[f"queries/{category}"] = category_queries
    counts.update(images=len(images), queries=len(queries), skipped=len(skips))
    return Release(NAME, split, images, queries, skips, sources, counts)


def output_ranking(query: Query, ranked: Sequence[str], images: Mapping[str, Image]) -> list[str]:
    """The top 50 ASINs of the category's gallery as ranked; the reference is kept (CLIP4Cir and SEARLE score
    the ranking as is). `images` maps a key to its `Image`."""
    return [images[key].image_id for key in ranked[:TOP_K]]


def _target_asin(query: Query) -> str:
    # A target key is "<category>/<asin>" (see read_release); the ranking holds ASINs.
    return query.targets[0].split("/", 1)[1]


def compute_metrics(queries: Sequence[Query], rankings: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """R@10 and R@50 per category and their plain mean over the categories with queries (CLIP4Cir validate.py
    main), in percent: ``fashioniq/<cat>/R@K``, ``fashioniq/avg/R@K``. Unlabelled queries are ignored; a labelled
    query without a ranking, with an ASIN twice in it, or whose target is missing from a ranking shorter than 50
    (so the whole gallery lacks it), is a ValueError naming it."""
    ranks: dict[str, list[int | None]] = {}
    for query in queries:
        if not query.targets:
            continue
        ranking = list(require_ranking(rankings, query, NAME))
        if len(set(ranking)) != len(ranking):
            raise ValueError(f"{NAME}: query {query.query_id!r} ranks an image twice")
        target = _target_asin(query)
        if target not in ranking and len(ranking) < TOP_K:
            raise ValueError(f"{NAME}: query {query.query_id!r}: target {target!r} is not in its ranking of "
                             f"{len(ranking)} images (the whole gallery or the top {TOP_K})")
        ranks.setdefault(query.group, []).append(ranking.index(target) if target in ranking else None)
    return group_recalls(NAME, ranks, RECALL_AT, CATEGORIES, avg_ks=RECALL_AT)


def submission_files(queries: Sequence[Query], rankings: Mapping[str, Sequence[str]]) -> dict[str, object]:
    """FashionIQ has no test server: nothing to write."""
    del queries, rankings
    return {}
