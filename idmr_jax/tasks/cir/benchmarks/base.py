"""What every benchmark module gives the converter and the evaluator: a release read into `Image`s and `Query`s,
its rankings in the benchmark's own ids, and the official metrics and submission files.

A benchmark module (``idmr_jax/tasks/cir/benchmarks/<name>.py``; the registry finds it by file name) defines

    NAME: str                         its name, equal to the file name ("cirr")
    SPLITS: tuple[str, ...]           the splits its release has, as the CLI names them ("val", "test")
    LABELLED_SPLITS: tuple[str, ...]  the splits with ground truth (metrics); the others get submission files
    read_release(root, split) -> Release
        Parses the released annotation files under `root` (every documented folder convention), resolves each
        image to a file path, and lists every entry it cannot use as a `Skip` (file, record, field). It does not
        open images: the converter checks and reads them (`idmr_jax.tasks.cir.convert`).
    output_ranking(query, ranked, images) -> list[str]
        The line written to ``rankings.jsonl`` for one query: ``ranked`` is the evaluator's ranking of the query's
        candidate pool, best first (`idmr_jax.tasks.cir.ranking.rank_queries`: image keys, at least the top 51 and
        every ``subset`` member; or, for a module with ``RANKS_SLOTS = True``, the slot numbers of the query's own
        pool); ``images`` maps key -> `Image`. The result is candidate ids (the benchmark's image names or ids;
        GeneCIS: slot numbers) in rank order, cut where the official protocol no longer needs them.
    compute_metrics(queries, rankings) -> dict[str, float]
        The official metrics, flat keys with the benchmark's prefix ("cirr/R@1"), in percent, computed from the
        ``rankings.jsonl`` lines alone (``{query_id: [candidate ids]}``), so that anyone can recompute them.
        A labelled query without a ranking, or whose target cannot be found in its ranking where the protocol
        needs it, is an error naming the query.
    submission_files(queries, rankings) -> dict[str, object]
        For an unlabelled split: file name -> JSON object in the test server's format ({} where there is none).

The candidate pool of a query is ``query.candidates`` when set (GeneCIS: its own small gallery, in slot order),
else every image of the release whose ``group`` equals ``query.group`` (FashionIQ: the category's gallery; CIRR
and CIRCO: the one gallery, group "").
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from idmr_jax.data.shards import ConversionError, Skip

__all__ = ["ConversionError", "Image", "ImageFolders", "Query", "Release", "Skip", "group_recalls", "load_json",
           "require_ranking"]


@dataclasses.dataclass(frozen=True)
class Image:
    """One image a release names (gallery member, reference, or a per-query candidate).

    key: unique within the release; the benchmark's image name or id as a string, or for a crop
        ``"<image_id>@<x1>,<y1>,<x2>,<y2>"`` (GeneCIS attribute tasks: several crops of one photo).
    image_id: the benchmark's own name or id of the photo (CIRR name, CIRCO/COCO id, FashionIQ ASIN, VG/COCO id).
    path: the image file (absolute, or relative to the release root).
    group: the gallery this image belongs to ("" = the release's one gallery; FashionIQ: the category;
        GeneCIS: the task, whose queries bring their own candidates).
    crop: [x1, y1, x2, y2] in source pixels when the benchmark uses a region of the photo (the official
        widening already applied); the converter crops it and pads it to a black square, as the official loader.
    """

    key: str
    image_id: str
    path: str
    group: str = ""
    crop: tuple[float, float, float, float] | None = None


@dataclasses.dataclass(frozen=True)
class Query:
    """One composed query: reference image + text -> targets.

    query_id: the benchmark's own id (CIRR pairid, CIRCO id, "<category>/<index>", "<task>/<index>") as a string.
    reference: key of the reference `Image`.
    text: the modification text the model reads (FashionIQ: both captions joined as the standard code joins them;
        GeneCIS: the condition).
    targets: keys of the relevant images, the main target first (CIRR target_hard; CIRCO gt_img_ids, i.e.
        target_img_id first; FashionIQ target; GeneCIS the target slot's image). () on unlabelled splits.
    group: the gallery the query ranks (see `Image.group`).
    candidates: the query's own candidate pool in the release's order (GeneCIS: ``[target] + gallery``, so slot
        j is ``candidates[j]``); None = the group's gallery.
    subset: CIRR's img_set members (keys), reference included, in the released order; () elsewhere.
    extra: what else the release says about the query, JSON-serialisable (CIRR target_soft, the raw captions,
        CIRCO shared_concept and semantic_aspects, ...): kept in the records, never read by a model.
    source: the annotation file the query comes from (relative to the root); source_index: its position there.
        Together they name the record in skip reports.
    """

    query_id: str
    reference: str
    text: str
    targets: tuple[str, ...] = ()
    group: str = ""
    candidates: tuple[str, ...] | None = None
    subset: tuple[str, ...] = ()
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    source: str = ""
    source_index: int = 0


@dataclasses.dataclass
class Release:
    """One benchmark split as released: its images (in a fixed order: the gallery's rank-tie order), queries
    (in annotation-file order), every entry not used (`skips`), the annotation files read (relative path ->
    sha256) and counts for the manifest."""

    benchmark: str
    split: str
    images: list[Image]
    queries: list[Query]
    skips: list[Skip]
    sources: dict[str, str]
    counts: dict[str, int] = dataclasses.field(default_factory=dict)


def load_json(path: str, root: str) -> Any:
    """A release's JSON file; `ConversionError` naming the file (relative to `root`) if missing or malformed."""
    rel = os.path.relpath(path, root)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise ConversionError(f"{rel}: missing (is --root the release's folder?)") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{rel}: not valid JSON: {e}") from e


def require_ranking(rankings: Mapping[str, Sequence[str]], query: Query, benchmark: str) -> Sequence[str]:
    """The ranking of a labelled query; ValueError naming the query when it has none."""
    try:
        return rankings[query.query_id]
    except KeyError:
        raise ValueError(f"{benchmark}: query {query.query_id!r} has no ranking") from None


def group_recalls(benchmark: str, ranks: Mapping[str, Sequence[int | None]], ks: Sequence[int],
                  order: Sequence[str], avg_ks: Sequence[int]) -> dict[str, float]:
    """Recall@K in percent per group of queries: ``"<benchmark>/<group>/R@K"`` = the share of the group's queries
    whose target rank (0-based; None = not in the ranking) is below K, groups in `order` first, then any other
    sorted; and ``"<benchmark>/avg/R@K"`` for K in `avg_ks`, the plain mean over the groups."""
    present = [g for g in order if g in ranks] + sorted(set(ranks) - set(order))
    metrics = {f"{benchmark}/{g}/R@{k}": 100.0 * sum(r is not None and r < k for r in ranks[g]) / len(ranks[g])
               for g in present for k in ks}
    if present:
        for k in avg_ks:
            metrics[f"{benchmark}/avg/R@{k}"] = sum(metrics[f"{benchmark}/{g}/R@{k}"] for g in present) / len(present)
    return metrics


class ImageFolders:
    """Finds image files among a release's accepted folders, listing each folder once: a release folder holds up to
    10^5 images (Visual Genome), and one listing is cheaper than a stat per file, extension and convention."""

    def __init__(self, root: str):
        self.root = root
        self._listings: dict[str, set[str]] = {}

    def names(self, folder: str) -> set[str]:
        """The file names in `folder` (relative to the root); empty when it does not exist."""
        if folder not in self._listings:
            try:
                self._listings[folder] = set(os.listdir(os.path.join(self.root, folder)))
            except (FileNotFoundError, NotADirectoryError):
                self._listings[folder] = set()
        return self._listings[folder]

    def find(self, folders: Sequence[str], file_names: Sequence[str]) -> str:
        """The path, relative to the root, of the first of `file_names` in the first of `folders` that holds one
        (folder by folder). None found: ``file_names[0]`` in the first folder present (else ``folders[0]``), so
        that the converter reports that file missing."""
        for folder in folders:
            names = self.names(folder)
            for name in file_names:
                if name in names:
                    return os.path.join(folder, name)
        present = next((f for f in folders if self.names(f)), folders[0])
        return os.path.join(present, file_names[0])
