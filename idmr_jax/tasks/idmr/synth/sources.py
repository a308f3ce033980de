"""Detection-annotation sources for the IDMR synthesis, all turned into one internal form: `ImageEntry`s holding
`Annotation`s with pixel boxes, plus a `Skip` for every source record that could not be used.

Supported inputs:

- **COCO-format JSON** + an image folder (`load_coco`): ``images`` (``id``, ``file_name`` relative to the folder,
  ``width``, ``height``), ``annotations`` (``id``, ``image_id``, ``category_id``, ``bbox`` = [x, y, w, h] in pixels,
  ``iscrowd``; ``area`` and ``segmentation`` are ignored) and ``categories`` (``id``, ``name``). Objects365 ships
  in this format. OpenImages (CSV, boxes normalised ``XMin, XMax, YMin, YMax``) must be converted first: one image
  entry per ImageID with its pixel size, ``bbox = [XMin*W, YMin*H, (XMax-XMin)*W, (YMax-YMin)*H]``,
  ``iscrowd = IsGroupOf``, category names from the class-description CSV. Optional extra fields carried through:
  ``annotations[i].instance_id`` (identity of the same physical object across images) and ``images[i].scene``
  (a short description of the scene, used by the template captioner). Ids may be ints or strings.
- **TFDS-prepared COCO** (`TfdsSource`): ``tfds.data_source(name, split=..., data_dir=...)`` over ArrayRecord files,
  read without TensorFlow, images kept as their encoded bytes (``SkipDecoding``). Features: ``image``,
  ``image/id`` and ``image/filename`` (optional), ``objects/bbox`` (normalised [ymin, xmin, ymax, xmax]),
  ``objects/label`` (a ClassLabel: its names are the categories), ``objects/is_crowd`` and ``objects/id``
  (optional).
- **The demo benchmark** (`demo_coco`): `idmr_jax.data.demo_bench`'s images and exact boxes, as a COCO dict.

Every unusable record becomes a `Skip` naming the file, the record (list and position: ``annotations[12]``, or the
TFDS example), its id and the offending field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

from etils import epath
from idmr_jax.data import image_files
from idmr_jax.data.demo_bench import builder as demo_bench
from idmr_jax.data.shards import ConversionError, map_parallel
from idmr_jax.tasks.idmr.synth.geometry import Box, parse_xywh

# Skip.action: an annotation lost (it counts against the instances), an image entry lost (each of its annotations
# gets its own INSTANCE entry), or an entry dropped that loses no instance (a category, a repeated id).
INSTANCE = "instance_skipped"
IMAGE = "image_skipped"
IGNORED = "entry_ignored"


@dataclasses.dataclass(frozen=True)
class Skip:
    """One unusable source record: ``file``, ``record`` (the list it is in: images / annotations / categories /
    examples) and ``index`` (its position there), ``name`` (its id or file name), the offending ``field``, a
    ``code`` (counted in the report), a one-line ``reason`` and the ``action`` taken."""

    file: str
    record: str
    index: int | None
    name: str | None
    field: str
    code: str
    reason: str
    action: str

    def describe(self) -> str:
        """One line naming the file, the record and the field."""
        return (f"{self.file}: {self.record}[{self.index}] ({self.name!r}), field '{self.field}': {self.reason} "
                f"[{self.code}]")


@dataclasses.dataclass(frozen=True)
class Annotation:
    """One usable annotation: the unclipped box [x1, y1, x2, y2] in pixels of the image as annotated."""

    index: int  # position in the source's annotation list (TFDS: running object index over the examples)
    ann_id: str
    category: str
    box: Box
    iscrowd: bool
    instance_id: str | None  # identity across images when the source has it


@dataclasses.dataclass
class ImageEntry:
    """One image of the source with its annotations. ``ref`` is what the source's reader needs to fetch the bytes;
    ``width``/``height`` are the annotated size (None where the source does not state it)."""

    index: int
    image_id: str
    file_name: str
    ref: Any
    width: int | None
    height: int | None
    scene: str | None
    annotations: list[Annotation] = dataclasses.field(default_factory=list)
    probe: dict | None = None  # filled by sources that decode while loading (TFDS)


@dataclasses.dataclass
class Loaded:
    """A loaded source: its images (source order), the unusable records, and counts of the raw input."""

    name: str
    entries: list[ImageEntry]
    skips: list[Skip]
    counts: dict[str, int]
    # Picklable; ``reader.read(ref, rules) -> bytes``, ``reader.check(ref, rules) -> CheckedFile | None`` (both
    # raise `image_files.ImageFileRefused`), ``reader.stat(ref) -> token or None``.
    reader: Any
    describe: dict[str, Any]


def _id(v: Any) -> str | None:
    """Ids may be ints or non-empty strings (Objects365, hand-made sets); anything else is a bad id."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int) or (isinstance(v, str) and v.strip()):
        return str(v)
    return None


def unsafe_path(rel: str) -> bool:
    """True for file names that could leave the image folder: absolute, drive-qualified, or with a '..' part."""
    norm = rel.replace("\\", "/")
    return norm.startswith("/") or bool(re.match(r"^[A-Za-z]:", norm)) or ".." in norm.split("/")


@dataclasses.dataclass(frozen=True)
class FolderReader:
    """Reads image files under a folder (local or gs://, through etils.epath) under the read rules: in a local
    folder all of `image_files.check_image_file` with the folder as the dataset root; in an object store (no
    links, no special files) the size limit."""

    root: str

    def check(self, ref: str, rules: image_files.ReadRules = image_files.ReadRules()) -> image_files.CheckedFile | None:
        """Applies the read rules without opening the file (None for an object store, whose limit `read` checks)."""
        local = "://" not in self.root
        return image_files.check_image_file(os.path.join(self.root, ref), self.root, rules) if local else None

    def read(self, ref: str, rules: image_files.ReadRules = image_files.ReadRules()) -> bytes:
        """The file's bytes; raises `image_files.ImageFileRefused` for a file the rules refuse."""
        if "://" not in self.root:
            return image_files.read_image_file(os.path.join(self.root, ref), self.root, rules)[0]
        path = epath.Path(self.root) / ref
        image_files.check_size(path.stat().length, rules)
        return path.read_bytes()

    def stat(self, ref: str) -> tuple[int, float] | None:
        """(size, mtime) of the file, or None when it cannot be stat'ed; the probe cache key."""
        try:
            st = (epath.Path(self.root) / ref).stat()
        except (OSError, FileNotFoundError):
            return None
        return (st.length, st.mtime)


def load_coco(coco: dict | str, images_dir: str, *, source: str = "coco", file_label: str | None = None
              ) -> Loaded:
    """Reads a COCO-format annotation dict (or JSON file path) -> `Loaded`; see the module docstring.

    ``file_label`` names the annotation file in skip entries (default: the path, or ``"<dict>"``). Raises
    `ConversionError` when the top level is not a COCO object."""
    label = file_label or (coco if isinstance(coco, str) else "<dict>")
    if isinstance(coco, str):
        path = epath.Path(coco)
        if not path.is_file():
            raise ConversionError(f"{coco}: annotation file not found")
        try:
            coco = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(f"{label}: not valid JSON: {e}") from e
    if not isinstance(coco, dict):
        raise ConversionError(f"{label}: expected a JSON object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise ConversionError(f"{label}: field '{key}' must be a list (COCO detection format)")
    skips: list[Skip] = []

    def skip(record, index, name, field, code, reason, action):
        skips.append(Skip(label, record, index, name, field, code, reason, action))

    categories: dict[str, str] = {}
    for i, c in enumerate(coco["categories"]):
        cid = _id(c.get("id")) if isinstance(c, dict) else None
        name = c.get("name") if isinstance(c, dict) else None
        if not isinstance(c, dict):
            skip("categories", i, None, "(record)", "bad_type", f"expected an object, got {type(c).__name__}",
                 IGNORED)
        elif cid is None:
            skip("categories", i, None, "id", "bad_type", f"expected an int or string id, got {c.get('id')!r}",
                 IGNORED)
        elif not isinstance(name, str) or not name.strip():
            skip("categories", i, cid, "name", "bad_type", f"expected a non-empty name, got {name!r}", IGNORED)
        elif cid in categories:
            skip("categories", i, cid, "id", "duplicate_id", "category id repeated; first kept", IGNORED)
        else:
            categories[cid] = name.strip()

    entries: dict[str, ImageEntry] = {}
    bad_images: dict[str, str] = {}  # image id -> why its entry was dropped (its annotations cite it)
    for i, im in enumerate(coco["images"]):
        if not isinstance(im, dict):
            skip("images", i, None, "(record)", "bad_type", f"expected an object, got {type(im).__name__}", IMAGE)
            continue
        iid = _id(im.get("id"))
        if iid is None:
            skip("images", i, None, "id", "missing_field" if "id" not in im else "bad_type",
                 f"image id must be an int or string, got {im.get('id')!r}", IMAGE)
            continue
        if iid in entries or iid in bad_images:
            skip("images", i, iid, "id", "duplicate_id", "image id repeated; first kept", IMAGE)
            continue
        fn = im.get("file_name")
        code = reason = field = None
        if not isinstance(fn, str) or not fn.strip():
            field, code, reason = "file_name", "bad_type", f"expected a relative file name, got {fn!r}"
        elif unsafe_path(fn):
            field, code, reason = "file_name", "unsafe_path", f"file name {fn!r} escapes the image folder"
        else:
            for key in ("width", "height"):
                v = im.get(key)
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                    field, code, reason = key, "bad_type", f"expected a positive int, got {v!r}"
                    break
        scene = im.get("scene")
        if code is None and scene is not None and not isinstance(scene, str):
            field, code, reason = "scene", "bad_type", f"expected a string, got {type(scene).__name__}"
        if code:
            skip("images", i, iid if fn is None else fn, field, code, reason, IMAGE)
            bad_images[iid] = reason
            continue
        entries[iid] = ImageEntry(i, iid, fn, fn, im.get("width"), im.get("height"),
                                  scene.strip() if isinstance(scene, str) and scene.strip() else None)

    seen_ann: set[str] = set()
    defaulted = 0  # annotations without 'iscrowd', taken as 0 and counted
    for i, a in enumerate(coco["annotations"]):
        if not isinstance(a, dict):
            skip("annotations", i, None, "(record)", "bad_type", f"expected an object, got {type(a).__name__}",
                 INSTANCE)
            continue
        aid = _id(a.get("id"))
        if aid is None:
            skip("annotations", i, None, "id", "missing_field" if "id" not in a else "bad_type",
                 f"annotation id must be an int or string, got {a.get('id')!r}", INSTANCE)
            continue
        if aid in seen_ann:
            skip("annotations", i, aid, "id", "duplicate_id", "annotation id repeated; first kept", INSTANCE)
            continue
        seen_ann.add(aid)
        iid, cid = _id(a.get("image_id")), _id(a.get("category_id"))
        if iid is None or (iid not in entries and iid not in bad_images):
            skip("annotations", i, aid, "image_id", "unknown_image", f"no image with id {a.get('image_id')!r}",
                 INSTANCE)
            continue
        if iid in bad_images:
            skip("annotations", i, aid, "image_id", "unusable_image", f"image {iid} unusable: {bad_images[iid]}",
                 INSTANCE)
            continue
        if cid is None or cid not in categories:
            skip("annotations", i, aid, "category_id", "unknown_category",
                 f"no category with id {a.get('category_id')!r}", INSTANCE)
            continue
        if "bbox" not in a:
            skip("annotations", i, aid, "bbox", "missing_field", "field 'bbox' missing", INSTANCE)
            continue
        box, code, reason = parse_xywh(a["bbox"])
        if code:
            skip("annotations", i, aid, "bbox", code, reason, INSTANCE)
            continue
        if "iscrowd" not in a:
            defaulted += 1
        crowd = a.get("iscrowd", 0)
        if crowd not in (0, 1) or isinstance(crowd, float):  # ints or bools only
            skip("annotations", i, aid, "iscrowd", "bad_type", f"expected 0 or 1, got {crowd!r}", INSTANCE)
            continue
        inst = a.get("instance_id")
        if inst is not None and _id(inst) is None:
            skip("annotations", i, aid, "instance_id", "bad_type",
                 f"expected an int or non-empty string, got {inst!r}", INSTANCE)
            continue
        entries[iid].annotations.append(Annotation(i, aid, categories[cid], box, bool(crowd), _id(inst)))

    counts = {"images": len(coco["images"]), "annotations": len(coco["annotations"]),
              "categories": len(coco["categories"]), "iscrowd_missing_taken_as_0": defaulted}
    return Loaded(source, list(entries.values()), skips, counts, FolderReader(str(images_dir)),
                  {"kind": "coco", "label": label, "annotations": label, "images_dir": str(images_dir)})


# --- TFDS (ArrayRecord, no TensorFlow) -------------------------------------------------------------------------

_TFDS_SOURCES: dict[tuple, Any] = {}  # per-process cache: opening a data source reads its metadata


@dataclasses.dataclass(frozen=True)
class TfdsReader:
    """Reads image bytes of a TFDS data source by example index (picklable: reopens the source per process)."""

    name: str
    split: str
    data_dir: str | None

    def source(self):
        key = (self.name, self.split, self.data_dir)
        if key not in _TFDS_SOURCES:
            import tensorflow_datasets as tfds

            _TFDS_SOURCES[key] = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir,
                                                  decoders={"image": tfds.decode.SkipDecoding()})
        return _TFDS_SOURCES[key]

    def check(self, ref: int, rules: image_files.ReadRules = image_files.ReadRules()) -> None:
        return None  # the images are inside the prepared dataset's records: no user file is opened

    def read(self, ref: int, rules: image_files.ReadRules = image_files.ReadRules()) -> bytes:
        data = self.source()[ref]["image"]
        if not isinstance(data, bytes):
            raise ConversionError(f"tfds {self.name}/{self.split}[{ref}]: field 'image': expected encoded bytes")
        return data

    def stat(self, ref: int) -> None:
        return None  # prepared TFDS files are immutable per version: nothing to re-check per example


def _scalar(v: Any) -> Any:
    """numpy scalars / 0-d arrays / bytes -> plain Python values."""
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        v = v.item()
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


def _tfds_example(reader: TfdsReader, labels: list[str], i: int, ex: dict, label: str,
                  skips: list[Skip]) -> tuple[ImageEntry | None, int]:
    """One TFDS example -> (ImageEntry, or None when its image is unusable; the number of objects it held).
    Annotation indices are per example here (the caller makes them running indices)."""
    objects = ex.get("objects") or {}
    boxes = list(objects.get("bbox", []))
    n = len(boxes)
    file_name = _scalar(ex.get("image/filename", f"{reader.split}[{i}]"))
    image_id = _id(_scalar(ex.get("image/id", i))) or str(i)
    data = ex.get("image")
    probe = image_files.probe_bytes(data) if isinstance(data, bytes) and data else {
        "width": None, "height": None, "format": None, "error": "field 'image' holds no encoded bytes"}
    probe["size"] = len(data) if isinstance(data, bytes) else None
    ids = list(objects.get("id", []))
    names = [str(_scalar(ids[j])) if j < len(ids) else f"{image_id}:{j}" for j in range(n)]
    if probe["error"]:
        skips.append(Skip(label, "examples", i, str(file_name), "image", "undecodable_image", probe["error"], IMAGE))
        for j in range(n):
            skips.append(Skip(label, "examples", i, names[j], f"objects[{j}]", "unusable_image",
                              f"image unusable: {probe['error']}", INSTANCE))
        return None, n
    entry = ImageEntry(i, image_id, str(file_name), i, probe["width"], probe["height"], None, probe=probe)
    w, h = probe["width"], probe["height"]
    labels_ = list(objects.get("label", []))
    crowd = list(objects.get("is_crowd", [False] * n))
    for j, name in enumerate(names):
        def bad(field: str, code: str, reason: str, _j=j, _name=name) -> None:
            skips.append(Skip(label, "examples", i, _name, f"objects/{field}[{_j}]", code, reason, INSTANCE))

        if j >= len(labels_) or j >= len(crowd):
            bad("label" if j >= len(labels_) else "is_crowd", "missing_field", "no value for this object")
            continue
        lab = _scalar(labels_[j])
        if isinstance(lab, bool) or not isinstance(lab, int) or not 0 <= lab < len(labels):
            bad("label", "unknown_category", f"label {lab!r} out of range")
            continue
        ymin, xmin, ymax, xmax = (float(c) for c in boxes[j])
        if not all(math.isfinite(c) for c in (ymin, xmin, ymax, xmax)):
            bad("bbox", "box_nonfinite", f"non-finite box {[float(c) for c in boxes[j]]}")
            continue
        box, code, reason = parse_xywh([xmin * w, ymin * h, (xmax - xmin) * w, (ymax - ymin) * h])
        if code:
            bad("bbox", code, reason)
            continue
        entry.annotations.append(Annotation(j, name, labels[lab], box, bool(_scalar(crowd[j])), None))
    return entry, n


def _tfds_range(args: tuple[TfdsReader, int, int]) -> tuple[list[tuple[ImageEntry, int]], list[Skip]]:
    """Worker entry point: examples [start, stop) of a TFDS source."""
    reader, start, stop = args
    src = reader.source()
    labels = list(src.dataset_info.features["objects"]["label"].names)
    label = f"tfds:{reader.name}/{reader.split}"  # must match load_tfds' describe["label"]
    out, skips = [], []
    for i in range(start, stop):
        out.append(_tfds_example(reader, labels, i, src[i], label, skips))
    return out, skips


def load_tfds(name: str, split: str, data_dir: str | None, *, pool: Any = None, chunk: int = 512) -> Loaded:
    """Reads a TFDS-prepared detection dataset (e.g. ``coco/2017``) -> `Loaded`; see the module docstring.

    Every image is decoded once here (its bytes are in hand anyway), so no separate probe pass is needed."""
    reader = TfdsReader(name, split, data_dir)
    try:
        n = len(reader.source())
    except Exception as e:  # tfds raises several types for a missing dataset / split
        raise ConversionError(f"tfds {name} split {split!r} under {data_dir}: cannot open: {e}") from e
    ranges = [(reader, s, min(s + chunk, n)) for s in range(0, n, chunk)]
    entries, skips, total = [], [], 0
    for part, part_skips in map_parallel(_tfds_range, ranges, pool):
        for entry, count in part:
            if entry is not None:
                # Object indices are running positions over the examples, fixed here in example order.
                entry.annotations = [dataclasses.replace(a, index=total + a.index) for a in entry.annotations]
                entries.append(entry)
            total += count
        skips.extend(part_skips)
    info = reader.source().dataset_info
    counts = {"images": n, "annotations": total, "categories": len(info.features["objects"]["label"].names)}
    describe = {"kind": "tfds", "label": f"tfds:{name}/{split}", "name": name, "split": split, "data_dir": data_dir,
                "version": str(info.version)}
    return Loaded(f"tfds:{name}", entries, skips, counts, reader, describe)


# --- the demo benchmark ------------------------------------------------------------------------------------------


def demo_coco(demo_root: str, split: str | None = None) -> tuple[dict, str]:
    """The demo benchmark (`idmr_jax.data.demo_bench`) as COCO -> (coco dict, image folder).

    One annotation per image (the pasted instance, exact box); ``instance_id`` is the demo instance (the same
    object in several contexts), ``images[i].scene`` the context's description; ``split`` keeps only that split's
    images ('train' / 'val')."""
    root = epath.Path(demo_root)
    meta = json.loads((root / demo_bench.META).read_text())
    cats = sorted({v["category"] for v in meta["instances"].values()})
    cat_id = {c: k + 1 for k, c in enumerate(cats)}
    coco = {"images": [], "annotations": [], "categories": [{"id": cat_id[c], "name": c} for c in cats]}
    for name in sorted(meta["images"]):
        m = meta["images"][name]
        if split is not None and m["split"] != split:
            continue
        iid = len(coco["images"]) + 1
        x1, y1, x2, y2 = m["box"]
        coco["images"].append({"id": iid, "file_name": f"images/{m['instance']}/{name}.jpg", "width": m["width"],
                               "height": m["height"], "scene": meta["contexts"][m["context"]]["description"],
                               "demo_split": m["split"]})
        coco["annotations"].append({"id": iid, "image_id": iid, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                    "area": (x2 - x1) * (y2 - y1), "iscrowd": 0, "instance_id": m["instance"],
                                    "category_id": cat_id[meta["instances"][m["instance"]]["category"]]})
    return coco, str(root / demo_bench.IMAGE_ROOT)


def load_demo(demo_root: str, split: str | None = None, *, source: str = "demo") -> Loaded:
    """The demo benchmark as a `Loaded` source (`demo_coco` + `load_coco`). Its pasted instances are small in
    small images: synthesise with `idmr_jax.tasks.idmr.synth.synthesis.DEMO_FILTERS` to keep all of them."""
    coco, image_dir = demo_coco(demo_root, split)
    return load_coco(coco, image_dir, source=source, file_label=str(epath.Path(demo_root) / "demo_meta.json"))
