"""What the dataset converters may read and overwrite: the image read rules (dataset root, regular files, size
limit) of `idmr_jax.data.image_files`, applied by the OACIRR converter and the IDMR synthesis, and the refusal to
replace a manifest.json another tool wrote. Tiny fixtures, written by each test."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal

import numpy as np
import pytest
from PIL import Image

from data_prep import idmr_synth as synth_cli
from data_prep import oacirr as oacirr_cli
from idmr_jax.data import image_files
from idmr_jax.data.shards import ConversionError
from idmr_jax.tasks.idmr.synth import synthesis
from idmr_jax.tasks.idmr.synth.sources import load_coco
from idmr_jax.tasks.oacir import records, release
import oacirr_fixtures

VARIANT, SPLIT = "Fashion", "train"
IMG_DIR, ANNO_DIR = release.VARIANTS[VARIANT]
F_SPLIT = f"{ANNO_DIR}/image_splits/split.{SPLIT}.json"


@contextlib.contextmanager
def deadline(seconds: int):
    """Fails the test instead of hanging it (e.g. on a FIFO opened for reading)."""
    def expired(*_):
        raise TimeoutError(f"still running after {seconds}s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _jpeg(path, size=(64, 48), value=120) -> bytes:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path, format="JPEG")
    return open(path, "rb").read()


# --- the shared rules -------------------------------------------------------------------------------------------


def test_read_rules_refuse_before_opening(tmp_path, monkeypatch):
    root = tmp_path / "root"
    data = _jpeg(str(root / "a.jpg"))
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(data)
    os.symlink(outside, root / "out.jpg")
    os.symlink(root / "a.jpg", root / "in.jpg")  # a link inside the root is fine
    os.symlink("/dev/zero", root / "zero.jpg")
    os.mkfifo(root / "fifo.jpg")
    os.mkdir(root / "dir.jpg")

    def refused(name, rules=image_files.ReadRules()):
        with pytest.raises(image_files.ImageFileRefused) as err:
            image_files.read_image_file(str(root / name), str(root), rules)
        return err.value.code, str(err.value)

    with deadline(20):
        assert image_files.read_image_file(str(root / "in.jpg"), str(root))[0] == data
        code, reason = refused("out.jpg")
        assert code == "outside_root" and "outside the dataset root" in reason
        assert refused("zero.jpg")[0] == "outside_root"
        follow = image_files.ReadRules(follow_external_symlinks=True)
        got, checked = image_files.read_image_file(str(root / "out.jpg"), str(root), follow)
        assert got == data and checked.external and checked.path == os.path.realpath(outside)
        assert refused("zero.jpg", follow) == ("not_regular_file", "not a regular file (a character device); not read")
        assert refused("fifo.jpg") == ("not_regular_file", "not a regular file (a FIFO); not read")
        assert refused("dir.jpg")[0] == "not_regular_file"
        assert refused("gone.jpg")[0] == "missing_image"
        assert refused("a.jpg", image_files.ReadRules(max_bytes=100)) == (
            "image_too_large", f"image too large ({len(data)} bytes > 100)")
        # A file swapped for a FIFO after the check is refused on the open descriptor, not waited on.
        fifo = str(root / "fifo.jpg")
        monkeypatch.setattr(image_files, "check_image_file",
                            lambda *a: image_files.CheckedFile(fifo, 0, 0, False))
        assert refused("fifo.jpg")[0] == "not_regular_file"


# --- OACIRR converter ---------------------------------------------------------------------------------------------


@pytest.fixture
def layout(tmp_path):
    info = oacirr_fixtures.build_layout(str(tmp_path / "root"), variant=VARIANT, split=SPLIT, num_instances=2,
                                        per_instance=3, num_queries=6, no_box_every=0)
    return {**info, "out": str(tmp_path / "out")}


def _skips(manifest: dict) -> dict[str, tuple[str, str, str]]:
    return {s["name"]: (s["field"], s["code"], s["reason"]) for s in manifest["skipped"] if s["file"] == F_SPLIT}


def test_oacirr_symlink_outside_root_is_skipped_or_followed_and_reported(layout, tmp_path):
    victim = layout["paths"]["img_000_2"]
    outside = tmp_path / "elsewhere" / "photo.jpg"
    outside.parent.mkdir()
    shutil.move(victim, outside)
    os.symlink(outside, victim)
    os.remove(layout["paths"]["img_001_2"])
    os.symlink("/dev/zero", layout["paths"]["img_001_2"])  # not read even when external links are followed

    m = release.convert(layout["root"], VARIANT, SPLIT, layout["out"]).manifest
    skips = _skips(m)
    assert skips["img_000_2"][:2] == ("image", "outside_root") and "outside the dataset root" in skips["img_000_2"][2]
    assert skips["img_001_2"][1] == "outside_root"
    assert m["counts"]["gallery"] == 4 and m["external_links"] == [] and m["counts"]["external_links"] == 0
    with pytest.raises(ConversionError, match=rf"{F_SPLIT}: record \d+ \('img_000_2'\), field 'image': resolves "
                       r".* outside the dataset root"):
        release.convert(layout["root"], VARIANT, SPLIT, str(tmp_path / "strict"), strict=True)

    argv = ["--root", layout["root"], "--variant", VARIANT, "--split", SPLIT, "--out", str(tmp_path / "followed"),
            "--follow-external-symlinks"]
    assert oacirr_cli.main(argv) == 0
    m = json.load(open(tmp_path / "followed" / release.MANIFEST))
    assert m["args"]["follow_external_symlinks"] is True and m["counts"]["gallery"] == 5
    assert m["counts"]["external_links"] == 1 and m["external_links"] == [
        {"file": f"{IMG_DIR}/images/inst_000/img_000_2.jpg", "target": os.path.realpath(outside)}]
    assert _skips(m)["img_001_2"][1] == "not_regular_file"  # followed, then refused: not listed as read
    gallery = {g.name: g for g in records.read_shards(str(tmp_path / "followed" / "gallery-*.array_record"))}
    assert gallery["img_000_2"].image == outside.read_bytes()


def test_oacirr_fifo_and_large_images_are_skipped(layout):
    fifo = layout["paths"]["img_001_1"]
    os.remove(fifo)
    os.mkfifo(fifo)
    sizes = {n: os.path.getsize(p) for n, p in layout["paths"].items() if n != "img_001_1"}
    limit = max(sizes.values()) - 1
    big = [n for n, s in sizes.items() if s > limit]
    with deadline(60):
        m = release.convert(layout["root"], VARIANT, SPLIT, layout["out"], max_image_bytes=limit).manifest
    skips = _skips(m)
    assert skips["img_001_1"][1:] == ("not_regular_file", f"not a regular file (a FIFO); not read "
                                      f"({IMG_DIR}/images/inst_001/img_001_1.jpg)")
    for name in big:
        assert skips[name][1] == "image_too_large"
        assert skips[name][2].startswith(f"image too large ({sizes[name]} bytes > {limit})")
    assert m["args"]["max_image_bytes"] == limit and m["counts"]["gallery"] == 6 - 1 - len(big)
    assert m["counts"]["skipped"]["record_skipped"] == len(m["skipped"])


def test_oacirr_refuses_a_manifest_it_did_not_write(layout, capsys):
    out = layout["out"]
    os.makedirs(out)
    path = os.path.join(out, release.MANIFEST)
    argv = ["--root", layout["root"], "--variant", VARIANT, "--split", SPLIT, "--out", out]
    for foreign in ('{"tool": {"name": "someone.else"}}', "not json", '{"counts": {}}'):
        open(path, "w").write(foreign)
        with pytest.raises(ConversionError, match="did not write it"):
            release.convert(layout["root"], VARIANT, SPLIT, out)
        assert oacirr_cli.main(argv) == 2
        err = capsys.readouterr().err
        assert path in err and "pass --overwrite" in err and "choose another --out" in err
        assert open(path).read() == foreign and os.listdir(out) == [release.MANIFEST]  # nothing written
    assert oacirr_cli.main(argv + ["--overwrite"]) == 0
    assert json.load(open(path))["tool"]["name"] == release.TOOL_NAME
    assert oacirr_cli.main(argv) == 0  # its own manifest: rerun resumes


# --- IDMR synthesis -----------------------------------------------------------------------------------------------


def _coco(tmp_path, names: list[str]) -> tuple[str, str]:
    """A COCO file with one 64x48 image and one annotation per name; the images are written by the caller."""
    images = [{"id": i + 1, "file_name": n, "width": 64, "height": 48} for i, n in enumerate(names)]
    anns = [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [4, 4, 40, 30], "iscrowd": 0}
            for i in range(len(names))]
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "cup"}]}))
    return str(path), str(tmp_path / "images")


def test_idmr_synthesis_applies_the_read_rules(tmp_path):
    anns, img_dir = _coco(tmp_path, ["ok.jpg", "link.jpg", "fifo.jpg", "big.jpg"])
    small = _jpeg(os.path.join(img_dir, "ok.jpg"), value=90)
    outside = _jpeg(str(tmp_path / "elsewhere" / "photo.jpg"), value=30)
    os.symlink(tmp_path / "elsewhere" / "photo.jpg", os.path.join(img_dir, "link.jpg"))
    os.mkfifo(os.path.join(img_dir, "fifo.jpg"))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8)).save(
        os.path.join(img_dir, "big.jpg"), quality=100)
    limit = max(len(small), len(outside)) + 1
    assert os.path.getsize(os.path.join(img_dir, "big.jpg")) > limit
    rules = image_files.ReadRules(max_bytes=limit)
    opts = synthesis.SynthOptions(filters=synthesis.DEMO_FILTERS, read_rules=rules)
    with deadline(60):
        res = synthesis.synthesize(load_coco(anns, img_dir), str(tmp_path / "out"), options=opts)
    codes = {s["name"]: (s["code"], s["reason"]) for s in res.report["skipped"] if s["record"] == "images"}
    assert codes["link.jpg"][0] == "outside_root" and "outside the dataset root" in codes["link.jpg"][1]
    assert codes["fifo.jpg"][0] == "not_regular_file" and codes["big.jpg"][0] == "image_too_large"
    assert res.manifest["counts"]["instances"]["kept"] == 1 and res.manifest["external_links"] == []

    follow = dataclasses.replace(opts, read_rules=dataclasses.replace(rules, follow_external_symlinks=True))
    followed = synthesis.synthesize(load_coco(anns, img_dir), str(tmp_path / "followed"), options=follow)
    assert followed.manifest["counts"]["instances"]["kept"] == 2
    assert followed.manifest["external_links"] == [
        {"file": "link.jpg", "target": os.path.realpath(tmp_path / "elsewhere" / "photo.jpg")}]
    assert followed.manifest["args"]["follow_external_symlinks"] is True


def test_idmr_synth_cli_refuses_a_manifest_it_did_not_write(tmp_path, capsys):
    anns, img_dir = _coco(tmp_path, ["ok.jpg"])
    _jpeg(os.path.join(img_dir, "ok.jpg"))
    out = tmp_path / "out"
    out.mkdir()
    (out / synthesis.MANIFEST).write_text(json.dumps({"tool": {"name": release.TOOL_NAME}}))  # the other converter's
    argv = ["--annotations", anns, "--images", img_dir, "--out", str(out), "--min-side", "8"]
    assert synth_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert str(out / synthesis.MANIFEST) in err and "'data_prep.oacirr'" in err and "pass --overwrite" in err
    assert os.listdir(out) == [synthesis.MANIFEST]
    assert synth_cli.main(argv + ["--overwrite", "--max-image-bytes", "1000000"]) == 0
    m = json.load(open(out / synthesis.MANIFEST))
    assert m["tool"]["name"] == synthesis.TOOL_NAME and m["args"]["max_image_bytes"] == 1000000
    assert synth_cli.main(argv) == 0  # its own manifest


# --- a demo config used without prepare_data ------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["oacir", "idmr"])
def test_empty_train_dir_says_how_to_prepare_demo_data(task):
    import ml_collections

    config = ml_collections.ConfigDict({"data": {"source": "demo", "train_dir": ""}})
    if task == "oacir":
        from idmr_jax.tasks.oacir.pipeline import train_iterator

        call = lambda: train_iterator(config)
    else:
        from idmr_jax.tasks.idmr.pipeline import train_iterator

        call = lambda: train_iterator(config, None, None, 224)
    with pytest.raises(ValueError, match=r"train_dir is empty: .*\(for source='demo', call "
                       r"idmr_jax\.tasks\.prepare_data\(config\) first, as main does\)"):
        call()
