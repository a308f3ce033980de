"""The CIR benchmarks end to end: records, the shared converter (CLI, manifest, strict mode, resume), the TFDS
builders, and the evaluation of a tiny random model of each family on fixtures in each release's layout, with
``metrics.json`` recomputed from ``rankings.jsonl`` by an independent implementation of each official metric."""

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cir_fixtures as fx
from idmr_jax.tasks.cir import benchmarks, convert, records
from idmr_jax.tasks.cir.convert import ConversionError

ROOT = Path(__file__).resolve().parents[1]
WRITERS = {"cirr": fx.write_cirr, "circo": fx.write_circo, "fashioniq": fx.write_fashioniq,
           "genecis": fx.write_genecis}


def _write(bench, root, *, broken=False, split="val"):
    kw = {} if bench == "genecis" else {"split": split}
    return WRITERS[bench](str(root), broken=broken, **kw)


def _converted_ids(info):
    """The query ids a conversion keeps: the valid ones minus those naming an image without a file."""
    return sorted(q for q in info["valid_query_ids"] if q not in info.get("missing_file_query_ids", ()))


# --- records ---------------------------------------------------------------------------------------------------


def test_records_round_trip_and_name_the_bad_field():
    q = records.QueryRecord(query_id="12", text="make it red", reference="a", reference_index=0, targets=("b",),
                            group="", candidates=None, subset=("a", "b"), extra='{"target_soft": {"b": 1.0}}',
                            source_index=3, benchmark="cirr", split="val")
    assert records.decode_query(records.encode_query(q)) == q
    img = records.ImageRecord(image=b"\x89PNG", key="x@1,2,3,4", image_id="x", group="focus_attribute",
                              crop=(1.0, 2.0, 3.0, 4.0), image_size=(2, 2), benchmark="genecis", split="val")
    assert records.decode_image(records.encode_image(img)) == img
    with pytest.raises(records.RecordError, match="field 'text'"):
        records.encode_query(dataclasses.replace(q, text="  "))
    with pytest.raises(records.RecordError, match="field 'extra'"):
        records.encode_query(dataclasses.replace(q, extra="[1]"))
    with pytest.raises(records.RecordError, match="field 'crop'"):
        records.encode_image(dataclasses.replace(img, crop=(3.0, 2.0, 1.0, 4.0)))


# --- the converter -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bench", sorted(WRITERS))
def test_convert_reports_every_skip_and_strict_fails(bench, tmp_path):
    info = _write(bench, tmp_path / "release", broken=True)
    release = benchmarks.get(bench).read_release(str(tmp_path / "release"), "val")
    out = tmp_path / "out"
    manifest = convert.convert(bench, str(tmp_path / "release"), "val", str(out))
    queries = records.read_queries(sorted(map(str, out.glob("queries-*.array_record"))))
    images = records.read_images(sorted(map(str, out.glob("images-*.array_record"))))
    assert sorted(q.query_id for q in queries) == _converted_ids(info)
    assert manifest["counts"]["queries"] == len(queries) and manifest["counts"]["images"] == len(images)
    skipped = manifest["skipped"]
    # The reader's skips come first, then the converter's: the missing file, and each query that named it.
    assert skipped[:len(release.skips)] == [dict(vars(s)) for s in release.skips]
    own = skipped[len(release.skips):]
    assert [s["code"] for s in own if s["field"] == "image"] == ["missing_image"]
    dropped = {q.query_id for q in release.queries} - {q.query_id for q in queries}
    assert dropped and {s["name"] for s in own if s["code"] == "unusable_image"} == dropped
    # Every query points at its reference's record, and every key it names is an image of the shards.
    keys = {img.key for img in images}
    for q in queries:
        assert images[q.reference_index].key == q.reference
        assert set(q.targets) | set(q.candidates or ()) | set(q.subset) <= keys
    # A rerun on the same input reuses every shard; --strict lists every problem and writes nothing new.
    again = convert.convert(bench, str(tmp_path / "release"), "val", str(out))
    assert again["shards"] == manifest["shards"]
    with pytest.raises(ConversionError, match=f"--strict: {len(skipped)} bad input entries") as err:
        convert.convert(bench, str(tmp_path / "release"), "val", str(tmp_path / "strict"), strict=True)
    for s in skipped:
        assert f"({s['name']!r}), field '{s['field']}'" in str(err.value)
    assert not (tmp_path / "strict").exists()


def test_cli_converts_and_exits_2_under_strict(tmp_path, capsys):
    from data_prep import cir

    fx.write_circo(str(tmp_path / "circo"), broken=True)
    assert cir.main(["--benchmark", "circo", "--root", str(tmp_path / "circo"), "--split", "val",
                     "--out", str(tmp_path / "out")]) == 0
    assert "circo/val: 5 queries, 14 images, 11 skipped" in capsys.readouterr().out
    assert cir.main(["--benchmark", "circo", "--root", str(tmp_path / "circo"), "--split", "val",
                     "--out", str(tmp_path / "strict"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "--strict: 11 bad input entries" in err and "record 11 ('12'), field 'reference'" in err


def test_genecis_crops_are_cut_and_padded_as_the_official_loader(tmp_path):
    from PIL import Image

    info = fx.write_genecis(str(tmp_path / "g"))
    convert.convert("genecis", str(tmp_path / "g"), "val", str(tmp_path / "out"))
    images = {img.key: img for img in records.read_images(str(tmp_path / "out" / "images-*.array_record"))}
    # 2002 @ [50, 40, 30, 20] in a 120x90 photo: left 29, top 26, right min(120, 80), bottom min(90, 60).
    crop = images["2002@29,26,80,60"]
    assert crop.crop == (29.0, 26.0, 80.0, 60.0) and crop.image_size == (51, 51)
    photo = np.asarray(Image.open(tmp_path / "g" / "vg" / "2002.jpg").convert("RGB"))
    stored = np.asarray(Image.open(io.BytesIO(crop.image)))
    # 51 x 34 region centred in a 51 x 51 black square: 8 black rows above ((51 - 34) // 2).
    np.testing.assert_array_equal(stored[8:42], photo[26:60, 29:80])
    assert not stored[:8].any() and not stored[42:].any()
    assert len(info["keys"]) == len(records.read_queries(str(tmp_path / "out" / "queries-*.array_record")))


# --- rankings -----------------------------------------------------------------------------------------------------


def _image(key, group=""):
    return records.ImageRecord(image=b"x", key=key, image_id=key, group=group, crop=None, image_size=(1, 1),
                               benchmark="b", split="val")


def _query(qid, group="", candidates=None, subset=()):
    return records.QueryRecord(query_id=qid, text="t", reference="a", reference_index=0, targets=("b",), group=group,
                               candidates=candidates, subset=subset, extra="{}", source_index=0, benchmark="b",
                               split="val")


def test_rankings_break_ties_by_gallery_order_and_never_by_the_target_slot():
    from idmr_jax.tasks.cir.ranking import rank_queries

    images = [_image(k) for k in "abcdef"] + [_image("x", "other")]
    feats = np.array([[1, 0], [0, 1], [1, 0], [0, 1], [1, 0], [0.5, 0.5], [9, 9]], np.float32)
    query = np.array([[1, 0]], np.float32)
    # Equal scores keep the lower image index first; the other group's image is not in the pool.
    assert rank_queries([_query("q")], images, query, feats) == [["a", "c", "e", "f", "b", "d"]]
    # Members below the cut are appended in their rank order.
    assert rank_queries([_query("q", subset=("d", "b", "a"))], images, query, feats, depth=2) == [
        ["a", "c", "b", "d"]]
    # An own pool of identical candidates (a target repeated in its gallery): slot 0 does not always win the tie.
    pool = ("a", "c", "e")
    firsts = [rank_queries([_query(f"t/{i}", candidates=pool)], images, query, feats)[0][0] for i in range(30)]
    assert set(firsts) == {"0", "1", "2"}
    again = [rank_queries([_query(f"t/{i}", candidates=pool)], images, query, feats)[0][0] for i in range(30)]
    assert again == firsts  # seeded by the query id: the same every run
    # Scores still decide before ties: a better candidate is first whatever its slot.
    assert rank_queries([_query("t/0", candidates=("b", "d", "a"))], images, query, feats)[0][0] == "2"


# --- evaluation end to end ---------------------------------------------------------------------------------------

VAL_BENCHES = ("cirr", "circo", "fashioniq", "genecis")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Converted shards of every benchmark's val fixture, and of CIRR's and CIRCO's test fixtures."""
    base = tmp_path_factory.mktemp("cir")
    out = {}
    for bench in VAL_BENCHES:
        _write(bench, base / bench)
        out[bench] = str(base / "ar" / f"{bench}-val")
        convert.convert(bench, str(base / bench), "val", out[bench])
    for bench in ("cirr", "circo"):
        _write(bench, base / f"{bench}-test", split="test")
        out[f"{bench}-test"] = str(base / "ar" / f"{bench}-test")
        convert.convert(bench, str(base / f"{bench}-test"), "test", out[f"{bench}-test"])
    return out


def _rankings(folder: Path) -> dict[str, list[str]]:
    """``folder/rankings.jsonl`` as {query_id: ranking}."""
    lines = [json.loads(line) for line in (folder / "rankings.jsonl").read_text().splitlines()]
    return {r["query_id"]: r["ranking"] for r in lines}


def _read_outputs(workdir, bench):
    ev = Path(workdir) / "eval" / bench
    return json.loads((ev / "metrics.json").read_text()), _rankings(ev)


def _hit_rates(ranks: dict[str, list[int | None]], ks) -> dict[str, float]:
    """{group: [0-based rank of the target or None]} -> {"<group>/R@K": percent}."""
    return {f"{g}/R@{k}": 100.0 * np.mean([r is not None and r < k for r in rs]) for g, rs in ranks.items()
            for k in ks}


def independent_metrics(bench: str, queries, rankings) -> dict[str, float]:
    """Each benchmark's official metric, written from EVAL_FORMATS.md without the library's code."""
    def rank_of(x, seq):
        return seq.index(x) if x in seq else None

    if bench == "cirr":
        ranks, subset = {"cirr": []}, {"cirr": []}
        for q in queries:
            r = [x for x in rankings[q.query_id] if x != q.reference]
            ranks["cirr"].append(rank_of(q.targets[0], r))
            subset["cirr"].append(rank_of(q.targets[0], [x for x in r if x in q.subset]))
        out = {f"cirr/R@{k}": v for k, v in ((k, _hit_rates(ranks, [k])[f"cirr/R@{k}"]) for k in (1, 5, 10, 50))}
        out.update({f"cirr/Rs@{k}": _hit_rates(subset, [k])[f"cirr/R@{k}"] for k in (1, 2, 3)})
        out["cirr/avg"] = (out["cirr/R@5"] + out["cirr/Rs@1"]) / 2
        return out
    if bench == "circo":
        out = {}
        for k in (5, 10, 25, 50):
            aps = []
            for q in queries:
                rel = [x in q.targets for x in rankings[q.query_id][:k]]
                precision_at = [sum(rel[:i + 1]) / (i + 1) for i in range(len(rel))]
                aps.append(sum(p for p, hit in zip(precision_at, rel) if hit) / min(len(q.targets), k))
            out[f"circo/mAP@{k}"] = 100.0 * np.mean(aps)
        return out
    if bench == "fashioniq":
        ranks = {}
        for q in queries:
            ranks.setdefault(f"fashioniq/{q.group}", []).append(
                rank_of(q.targets[0].split("/", 1)[1], rankings[q.query_id]))
        out = _hit_rates(ranks, (10, 50))
        for k in (10, 50):
            out[f"fashioniq/avg/R@{k}"] = np.mean([v for key, v in out.items() if key.endswith(f"/R@{k}")])
        return out
    # GeneCIS: slot "0" is the target; only queries with the task's most common pool size count (official loader).
    sizes = {}
    for q in queries:
        sizes.setdefault(q.group, []).append(len(q.candidates))
    modal = {g: min(set(s), key=lambda n: (-s.count(n), n)) for g, s in sizes.items()}
    ranks = {}
    for q in queries:
        if len(q.candidates) == modal[q.group]:
            ranks.setdefault(f"genecis/{q.group}", []).append(rank_of("0", rankings[q.query_id]))
    out = _hit_rates(ranks, (1, 2, 3))
    out["genecis/avg/R@1"] = np.mean([v for key, v in out.items() if key.endswith("/R@1")])
    return out


def _check_outputs(workdir, folders):
    for bench in VAL_BENCHES:
        metrics, rankings = _read_outputs(workdir, bench)
        queries = records.read_queries(os.path.join(folders[bench], "queries-*.array_record"))
        images = records.read_images(os.path.join(folders[bench], "images-*.array_record"))
        assert sorted(rankings) == sorted(q.query_id for q in queries)  # every query, once
        for q in queries:
            ranking = rankings[q.query_id]
            assert len(set(ranking)) == len(ranking)
            if bench == "genecis":  # slot numbers of the query's own pool, all of them
                assert sorted(ranking, key=int) == [str(j) for j in range(len(q.candidates))]
                continue
            gallery = [img.image_id for img in images if img.group == q.group]
            assert set(ranking) <= set(gallery) and len(ranking) == min(51 if bench == "cirr" else 50, len(gallery))
        want = independent_metrics(bench, queries, rankings)
        assert metrics.keys() == want.keys() and metrics == pytest.approx(want), bench


@pytest.mark.slow
def test_qformer_family_on_every_benchmark_through_the_cli(converted, tmp_path):
    workdir = tmp_path / "w"
    # Plain BLIP-2 here (no CAAM); AdaFocal runs in test_test_splits_write_the_servers_submission_files.
    cmd = [sys.executable, "-m", "idmr_jax.main", "--config=configs/cir_eval.py:all,tiny,blip2", f"--workdir={workdir}",
           *(f"--config.cir.val_dirs.{b}={converted[b]}" for b in VAL_BENCHES)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    _check_outputs(workdir, converted)
    table = proc.stdout.split("zero-shot results\n")[1].splitlines()
    assert table[0].split()[:3] == ["model", "cirr/R@1", "cirr/R@5"] and table[1].startswith("qformer:random")
    cirr, _ = _read_outputs(workdir, "cirr")
    assert table[1].split()[1] == f"{cirr['cirr/R@1']:.2f}"


def _evaluate(workdir, arg, **fields):
    """`python -m idmr_jax.main --config=configs/cir_eval.py:<arg> --workdir=<workdir>`, in this process."""
    from configs import cir_eval
    from idmr_jax import tasks
    from idmr_jax.train import trainer

    config = cir_eval.get_config(arg)
    for dotted, value in fields.items():
        node = config
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return trainer.evaluate_only(tasks.build(config), str(workdir))


@pytest.mark.slow
def test_mllm_family_on_every_benchmark_with_a_gallery_cache(converted, tmp_path):
    dirs = {f"cir__val_dirs__{b}": converted[b] for b in VAL_BENCHES}
    first = _evaluate(tmp_path / "w", "all,tiny,family=mllm", **dirs)
    _check_outputs(tmp_path / "w", converted)
    caches = sorted((tmp_path / "w" / "eval").glob("*/cache/*.npy"))
    assert len(caches) == 4
    # The same model again: the candidate features come from the cache (same files, same numbers) ...
    assert _evaluate(tmp_path / "w", "all,tiny,family=mllm", **dirs) == first
    assert sorted((tmp_path / "w" / "eval").glob("*/cache/*.npy")) == caches
    # ... another model (seed) gets features of its own.
    _evaluate(tmp_path / "w", "cirr,tiny,family=mllm", seed=1, data__val_dir=converted["cirr"])
    assert len(list((tmp_path / "w" / "eval" / "cirr" / "cache").glob("*.npy"))) == 2


@pytest.mark.slow
def test_test_splits_write_the_servers_submission_files(converted, tmp_path):
    results = _evaluate(tmp_path / "w", "all,tiny", cir__val_dirs__cirr=converted["cirr-test"],
                        cir__val_dirs__circo=converted["circo-test"])
    assert results == {}  # no labels, no metrics
    ev = tmp_path / "w" / "eval"
    assert not (ev / "cirr" / "metrics.json").exists()
    queries = records.read_queries(os.path.join(converted["cirr-test"], "queries-*.array_record"))
    recall = json.loads((ev / "cirr" / "cirr_recall.json").read_text())
    subset = json.loads((ev / "cirr" / "cirr_recall_subset.json").read_text())
    assert (recall.pop("version"), recall.pop("metric")) == ("rc2", "recall")
    assert (subset.pop("version"), subset.pop("metric")) == ("rc2", "recall_subset")
    assert sorted(recall) == sorted(subset) == sorted(q.query_id for q in queries)
    rankings = _rankings(ev / "cirr")
    for q in queries:
        without_ref = [x for x in rankings[q.query_id] if x != q.reference]
        assert recall[q.query_id] == without_ref[:50] and q.reference not in recall[q.query_id]
        assert subset[q.query_id] == [x for x in without_ref if x in q.subset][:3]
    circo = json.loads((ev / "circo" / "circo_test_submission.json").read_text())
    circo_queries = records.read_queries(os.path.join(converted["circo-test"], "queries-*.array_record"))
    assert sorted(circo) == sorted(q.query_id for q in circo_queries)
    gallery = {int(img.image_id) for img in records.read_images(
        os.path.join(converted["circo-test"], "images-*.array_record"))}
    for ids in circo.values():  # ints, no repeats, the top 50 (the whole gallery when smaller)
        assert all(type(i) is int for i in ids) and len(set(ids)) == len(ids) == min(50, len(gallery))
        assert set(ids) <= gallery



# --- where the weights come from -------------------------------------------------------------------------------


def _params(state) -> dict[str, np.ndarray]:
    """The model's parameters in a train state, by path (RNG variables left out)."""
    from flax import nnx

    from idmr_jax.train.state import flat_variables

    variables = {**flat_variables(state.params), **flat_variables(state.frozen)}
    return {k: np.asarray(v.get_value()) for k, v in variables.items() if isinstance(v, nnx.Param)}


@pytest.mark.slow
def test_weights_from_a_training_workdir_and_from_the_official_adafocal_format(tmp_path):
    import jax
    from safetensors.numpy import save_file

    from configs import cir_eval, oacir
    from idmr_jax import tasks
    from idmr_jax.train.checkpoint import Checkpointer, config_to_json
    from idmr_jax.train.setup import setup_state
    from idmr_jax.weights import adafocal as official
    from flax import nnx

    from idmr_jax.weights.mapping import flatten_params, unstack_from_model

    # A "trained" tiny AdaFocal: a Q-Former of 2 layers (the cir tiny default has 4), the official CRM's head count
    # and FFN width (the official format has no other), every trained weight moved away from its init (the seed, and
    # so the compiled init program, is the one the evaluations below start from; the frozen ViT stays as it is:
    # LAVIS has no key bias, so the official format could not hold a moved one).
    trained_config = oacir.get_config("tiny")
    trained_config.model.qformer.num_layers = 2
    trained_config.model.caam.num_heads, trained_config.model.caam.ffn_dim = 8, 2048
    trained = setup_state(tasks.build(trained_config), total_steps=1)
    moved = jax.tree.map(lambda x: x + 0.5, trained.state.params)
    trained = dataclasses.replace(trained, state=trained.state.replace(params=moved))
    want = _params(trained.state)
    saver = Checkpointer(tmp_path / "train", async_save=False)
    saver.save(7, trained.state, None, config_to_json(trained_config))
    saver.close()

    # init.format=workdir: the model is rebuilt from the run's saved config, and every weight is the run's.
    config = cir_eval.get_config("cirr,tiny")
    config.model.init.format, config.model.init.path = "workdir", str(tmp_path / "train")
    task = tasks.build(config)
    assert task.model_config == tasks.build(trained_config).model_config
    fresh = setup_state(task, total_steps=1)
    got = _params(task.load_pretrained(fresh.state, fresh.mesh))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)

    # init.format=lavis_adafocal: the official state dict (its [DEC] row appended, as the release has it).
    model = nnx.merge(trained.graphdef, trained.state.params, trained.state.frozen)
    per_layer = unstack_from_model(flatten_params(model), official.lavis_adafocal_map(task.model_config))
    sd, notes = official.to_official_state_dict(per_layer, task.model_config)
    assert notes["dec_row_appended"]
    save_file(sd, str(tmp_path / "adafocal.safetensors"))
    config = cir_eval.get_config("cirr,tiny")
    config.model.qformer.num_layers, config.model.caam.num_heads, config.model.caam.ffn_dim = 2, 8, 2048
    config.model.init.format, config.model.init.path = "lavis_adafocal", str(tmp_path / "adafocal.safetensors")
    task = tasks.build(config)
    got = _params(task.load_pretrained(setup_state(task, total_steps=1).state, None))
    for k in want:
        if not k.startswith("blip2/itm_head"):  # no official counterpart: stays at its init
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)

    # init.format=hf_blip2: a transformers Blip2ForImageTextRetrieval folder fills the BLIP-2 part.
    import torch
    import transformers

    from idmr_jax.weights.blip2 import convert as blip2_convert
    from idmr_jax.weights.blip2.names import hf_blip2_config

    torch.manual_seed(0)
    hf = transformers.Blip2ForImageTextRetrieval(hf_blip2_config(task.model_config.blip2)).eval()
    hf.save_pretrained(tmp_path / "hf")
    config.model.init.format, config.model.init.path = "hf_blip2", str(tmp_path / "hf")
    task = tasks.build(config)
    got = _params(task.load_pretrained(setup_state(task, total_steps=1).state, None))
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    converted = blip2_convert.hf_blip2_params(sd, task.model_config.blip2, source="hf")
    assert converted  # every converted tensor is in the model, with the checkpoint's values
    for k, v in converted.items():
        np.testing.assert_array_equal(got[f"blip2/{k}"], v, err_msg=k)


def test_tfds_builders_read_the_release_like_the_converter(tmp_path):
    import tensorflow_datasets as tfds

    from data_prep.tfds_cir import BUILDERS, prepare

    assert sorted(BUILDERS) == sorted(benchmarks.names())  # one dataset per benchmark module
    info = fx.write_genecis(str(tmp_path / "release"), broken=True)
    prepare("genecis", str(tmp_path / "release"), str(tmp_path / "tfds"))
    convert.convert("genecis", str(tmp_path / "release"), "val", str(tmp_path / "ar"))
    want_q = records.read_queries(str(tmp_path / "ar" / "queries-*.array_record"))
    want_i = records.read_images(str(tmp_path / "ar" / "images-*.array_record"))
    queries = tfds.data_source("genecis/queries", split="val", data_dir=str(tmp_path / "tfds"))
    gallery = tfds.data_source("genecis/gallery", split="val", data_dir=str(tmp_path / "tfds"),
                               decoders={"image": tfds.decode.SkipDecoding()})
    assert [queries[i]["query_id"].decode() for i in range(len(queries))] == [q.query_id for q in want_q]
    assert sorted(info["keys"]) == sorted(q.query_id for q in want_q)
    for i, q in enumerate(want_q):
        ex = queries[i]
        assert [c.decode() for c in ex["candidates"]] == list(q.candidates)
        assert ex["text"].decode() == q.text and json.loads(ex["extra"]) == q.extra_fields
    assert [gallery[i]["key"].decode() for i in range(len(gallery))] == [img.key for img in want_i]
    for i, img in enumerate(want_i):  # the same bytes: crops cut and padded alike
        assert gallery[i]["image"] == img.image
