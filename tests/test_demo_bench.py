"""The real-photo demo benchmark (`idmr_jax.data.demo_bench`): determinism, splits, boxes, OACIRR format, texts,
galleries and the build cache, all on the "tiny" size."""

import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import demo_bench as demo_bench_cli
from idmr_jax.data.demo_bench import builder as db
from idmr_jax.data.demo_bench import photos, texts
from idmr_jax.data.demo_bench.plan import (SIZES, SPLITS, context_kind_contexts, overlap_groups, plan_benchmark,
                                           render_image)

ANN = db.ANNOTATION_ROOT


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One tiny build per seed (0 twice, in separate folders, and 1)."""
    base = tmp_path_factory.mktemp("demo")
    return {name: db.build_demo_benchmark(base / name, seed=seed, size="tiny")
            for name, seed in (("a", 0), ("b", 0), ("c", 1))}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(root: Path, kind: str, split: str):
    rel = {"captions": f"quadruple_captions/caption_full.{split}.json", "split": f"image_splits/split.{split}.json",
           "boxes": f"image_bounding_box/bounding_box.{split}.json"}[kind]
    return json.loads((root / ANN / rel).read_text())


def test_same_seed_is_byte_identical_and_another_seed_differs(built):
    a, b, c = _files(built["a"]), _files(built["b"]), _files(built["c"])
    assert a == b
    assert any(name.endswith(".jpg") for name in a)
    assert _load(built["a"], "captions", "train") != _load(built["c"], "captions", "train")


def test_train_and_val_instances_are_disjoint():
    for size in ("tiny", "small"):
        plan = plan_benchmark(0, size)
        by_split = defaultdict(set)
        for im in plan.images:
            by_split[im.split].add(im.instance)
        assert by_split["train"] and by_split["val"]
        assert not by_split["train"] & by_split["val"]
        # Objects cut from overlapping source boxes (a motorcycle and its wheel) stay on one side.
        for group in overlap_groups(photos.INSTANCES):
            assert len({im.split for im in plan.images if im.instance in {g.id for g in group}}) <= 1
        # No context shows a val object in its background.
        contexts = {c.id: c for c in photos.CONTEXTS}
        val = [i for i in photos.INSTANCES if i.id in by_split["val"]]
        for im in plan.images:
            assert not any(photos.context_shows(contexts[im.context], i) for i in val), im.name
    small = plan_benchmark(0, "small")
    assert 20 <= len({im.instance for im in small.images}) <= 40 and len(small.pairs) >= 300


def test_boxes_lie_inside_and_cover_the_pasted_pixels(built):
    root = built["a"]
    boxes = {**_load(root, "boxes", "train"), **_load(root, "boxes", "val")}
    for spec in plan_benchmark(0, "tiny").images:
        image, canvas, box = render_image(spec, "tiny")
        h, w = image.shape[:2]
        x1, y1, x2, y2 = box
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h, (spec.name, box)
        assert boxes[spec.name] == list(box)
        diff = np.abs(image.astype(np.int64) - canvas.astype(np.int64)).sum(-1)
        inside = diff[y1:y2, x1:x2]
        assert inside.mean() > 10, spec.name  # the object really is there
        assert inside.sum() / diff.sum() > 0.85, spec.name  # and (almost) nothing was changed outside the box
        # The JPEG on disk is that image.
        with Image.open(root / db.IMAGE_ROOT / f"images/{spec.instance}/{spec.name}.jpg") as f:
            assert f.size == (w, h)
            assert np.abs(np.asarray(f.convert("RGB"), np.float64) - image).mean() < 6


def test_oacirr_json_format(built):
    root = built["a"]
    for split in SPLITS:
        caps, smap, boxes = (_load(root, k, split) for k in ("captions", "split", "boxes"))
        assert caps and set(boxes) == set(smap)
        for name, rel in smap.items():
            assert rel == f"images/{Path(rel).parent.name}/{name}.jpg"
            assert (root / db.IMAGE_ROOT / rel).is_file()
            assert len(boxes[name]) == 4 and all(type(v) is int for v in boxes[name])
        for q in caps:
            assert list(q) == ["reference", "target", "modification_text_mllm", "reference_bounding_box",
                               "object_category"]
            assert q["reference"] != q["target"]
            assert Path(smap[q["reference"]]).parent == Path(smap[q["target"]]).parent  # same instance
            assert q["reference_bounding_box"] == boxes[q["reference"]]
            assert isinstance(q["object_category"], str) and q["object_category"].strip()
    info = json.loads((root / db.BUILD_INFO).read_text())
    assert info["image_root"] == "OACIRR-Subset/OACIRR-Demo" and info["annotation_root"].endswith("oacirr-demo")
    assert (root / db.CONTACT_SHEET).stat().st_size > 0


def test_texts_are_non_empty_varied_and_true(built):
    root = built["a"]
    meta = json.loads((root / db.META).read_text())
    caps = _load(root, "captions", "train") + _load(root, "captions", "val")
    found = [q["modification_text_mllm"] for q in caps]
    assert all(t.strip() for t in found)
    assert len(set(found)) >= 0.9 * len(found)
    templates = {next(i for i, tpl in enumerate(texts.TEMPLATES) if t.startswith(tpl.split("{")[0]))
                 for t in found}
    assert len(templates) >= 4
    for q in caps:
        target = meta["images"][q["target"]]
        assert meta["contexts"][target["context"]]["description"] in q["modification_text_mllm"]
        assert q["object_category"] in q["modification_text_mllm"]


def test_val_gallery_has_instance_positives_and_context_hard_negatives(built):
    root = built["a"]
    meta = json.loads((root / db.META).read_text())["images"]
    gallery = _load(root, "split", "val")
    for q in _load(root, "captions", "val"):
        inst, ctx = meta[q["target"]]["instance"], meta[q["target"]]["context"]
        same_instance = [n for n in gallery if meta[n]["instance"] == inst and n not in (q["reference"], q["target"])]
        same_context = [n for n in gallery if meta[n]["context"] == ctx and meta[n]["instance"] != inst]
        assert same_instance and same_context, q


def test_cache_is_reused_and_a_damaged_build_is_redone(tmp_path):
    root = db.build_demo_benchmark(tmp_path, seed=0, size="tiny")
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    start = time.perf_counter()
    assert db.build_demo_benchmark(tmp_path, seed=0, size="tiny") == root
    assert time.perf_counter() - start < 0.5
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    # A damaged file, or another seed, is not taken for a matching build.
    victim = next(root.rglob("*.jpg"))
    good = victim.read_bytes()
    victim.write_bytes(b"broken")
    db.build_demo_benchmark(tmp_path, seed=0, size="tiny")
    assert victim.read_bytes() == good
    demo_bench_cli.main(["--out", str(tmp_path), "--size", "tiny", "--seed", "1"])
    assert json.loads((root / db.BUILD_INFO).read_text())["seed"] == 1
    assert not (root / ".demo_build.tmp").exists()


# ---------------------------------------------------------------- the context benchmark (plan.KINDS)


def test_context_plan_adds_a_second_shot_and_pairs_each_reference_with_keep_and_change():
    for size in ("tiny", "small"):
        standard, context = plan_benchmark(0, size), plan_benchmark(0, size, "context")
        by_name = {im.name: im for im in context.images}
        # The same instances and splits; about as many images and quadruples as the standard benchmark.
        assert {(im.instance, im.split) for im in context.images} == {(im.instance, im.split) for im in standard.images}
        assert 0.6 <= len(context.images) / len(standard.images) <= 1.4
        assert len(context.pairs) == 2 * len(context.images)
        # Every (instance, context) has two shots, differently placed.
        lo, hi = context_kind_contexts(SIZES[size])
        per_instance = defaultdict(set)
        for im in context.images:
            if not im.name.endswith("-shot2"):
                shot2 = by_name[f"{im.name}-shot2"]
                assert (shot2.instance, shot2.context, shot2.split) == (im.instance, im.context, im.split)
                assert shot2.place != im.place
                per_instance[im.instance].add(im.context)
        assert all(lo <= len(c) <= hi for c in per_instance.values())
        targets = defaultdict(list)
        for side, ref, tgt in context.pairs:
            assert by_name[ref].split == by_name[tgt].split == side
            assert by_name[ref].instance == by_name[tgt].instance and ref != tgt
            targets[ref].append(tgt)
        assert set(targets) == set(by_name)
        for ref, (keep, change) in targets.items():  # one of each, in this order; keep = the other shot
            assert by_name[keep].context == by_name[ref].context
            assert keep in (f"{ref}-shot2", ref.removesuffix("-shot2"))
            assert by_name[change].context != by_name[ref].context
    with pytest.raises(ValueError, match="kind"):
        plan_benchmark(0, "tiny", "nope")


def test_context_build_texts_keep_or_name_the_context_and_convert(tmp_path):
    from idmr_jax.tasks.oacir import release

    demo_bench_cli.main(["--out", str(tmp_path), "--size", "tiny", "--kind", "context"])
    variant, image_root, ann = db.roots("context")
    assert variant == "DemoContext" and json.loads((tmp_path / db.BUILD_INFO).read_text())["variant"] == variant
    meta = json.loads((tmp_path / db.META).read_text())
    descriptions = [c["description"] for c in meta["contexts"].values()]
    kept = changed = 0
    for split in SPLITS:
        for q in json.loads((tmp_path / ann / f"quadruple_captions/caption_full.{split}.json").read_text()):
            ref, tgt, text = meta["images"][q["reference"]], meta["images"][q["target"]], q["modification_text_mllm"]
            assert q["object_category"] in text
            if ref["context"] == tgt["context"]:
                kept += 1
                assert any(text.startswith(t.split("{")[0]) for t in texts.KEEP_TEMPLATES), text
                assert not any(d in text for d in descriptions), text  # the context is only in the reference image
            else:
                changed += 1
                assert meta["contexts"][tgt["context"]]["description"] in text
    assert kept == changed > 0
    # Not a standard build, whatever the folder: the kind is part of the recipe.
    assert db.recipe_digest(0, "tiny", "context") != db.recipe_digest(0, "tiny")
    result = release.convert(str(tmp_path), variant, "val", str(tmp_path / "shards"), strict=True)
    per_subset = result.manifest["counts"]["per_subset"]
    assert list(per_subset) == ["democontext"] and per_subset["democontext"]["queries"] == 2 * len(
        [n for n, m in meta["images"].items() if m["split"] == "val"])
    db.build_demo_benchmark(tmp_path, seed=0, size="tiny")  # a standard build there is not the context one
    assert json.loads((tmp_path / db.BUILD_INFO).read_text())["variant"] == "Demo"
