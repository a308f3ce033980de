"""The Grain OACIR input pipeline on a small converted dataset: values, order, sharding, state, resume, eval.

The dataset (12 instances x 3 JPEGs, 40 quadruples, 4 query shards) is written in the released layout and
converted with `data_prep.oacirr` once per module (`tests/oacirr_fixtures.py`). Expected values are computed
from the *source* files (image files, caption JSON), so the converter and the pipeline are checked together.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from PIL import Image

import oacirr_fixtures as fx
from idmr_jax.data import boxes, grain_io, image_ops, text
from idmr_jax.tasks.oacir import pipeline as oacir_pipeline
from idmr_jax.tasks.oacir import records

SIZE, GRID = 56, (4, 4)  # the tiny EVA of configs/oacir.py:tiny (56 px, patch 14); see the geometry test
SPEC = oacir_pipeline.ImageSpec(size=SIZE, grid=GRID, patch=14)
NUM_QUERIES, BATCH = 40, 4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    root = tmp_path_factory.mktemp("oacirr_train")
    info = fx.build_converted(str(root / "raw"), str(root / "train"), num_queries=NUM_QUERIES, num_shards=4)
    info["queries"] = records.read_shards(os.path.join(info["out"], oacir_pipeline.QUERY_GLOB))
    return info


def _iterator(train, **kw):
    return oacir_pipeline.train_iterator(fx.pipeline_config(train["out"], **kw), spec=SPEC)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _fingerprint(batch) -> list:
    """Identity and content of a batch: example ids plus a digest of every array."""
    digest = hashlib.sha1()
    for k in sorted(batch):
        digest.update(k.encode() + np.ascontiguousarray(batch[k]).tobytes())
    return [np.asarray(batch["example_id"]).tolist(), digest.hexdigest()]


def test_batches_have_the_model_inputs_and_the_right_values(train):
    with _iterator(train) as it:
        batches = _take(it, 3)
        assert it.steps_per_epoch == NUM_QUERIES // BATCH
    b = batches[0]
    spec = {"ref_pixels": ((BATCH, SIZE, SIZE, 3), np.float32), "tgt_pixels": ((BATCH, SIZE, SIZE, 3), np.float32),
            "input_ids": ((BATCH, 32), np.int32), "attention_mask": ((BATCH, 32), np.int32),
            "box_mask": ((BATCH, 1 + GRID[0] * GRID[1]), np.float32), "example_id": ((BATCH,), np.int32)}
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {k: (s, np.dtype(d)) for k, (s, d) in spec.items()}

    # Expected values straight from the source layout (image files and caption JSON), not from the records.
    from transformers import BertTokenizer

    bert = BertTokenizer.from_pretrained(text.bundled_tokenizer_dir(), local_files_only=True)
    seen_box = seen_no_box = False
    for batch in batches:
        for row, key in enumerate(batch["example_id"]):
            rec = train["queries"][key]
            cap = train["captions"][rec.source_index]
            ref_img = Image.open(train["paths"][cap["reference"]]).convert("RGB")
            pixels, final_box = image_ops.preprocess(ref_img, cap["reference_bounding_box"], SIZE)
            np.testing.assert_array_equal(batch["ref_pixels"][row], pixels)
            mask = boxes.box_to_patch_mask(final_box, GRID, (SIZE, SIZE), patch=SPEC.patch)
            np.testing.assert_array_equal(batch["box_mask"][row], mask)
            seen_box |= mask.sum() > 0
            seen_no_box |= cap["reference_bounding_box"] is None
            if cap["reference_bounding_box"] is None:
                assert not batch["box_mask"][row].any()
            assert batch["box_mask"][row][0] == 0  # CLS never set
            tgt, _ = image_ops.preprocess(Image.open(train["paths"][cap["target"]]).convert("RGB"), None, SIZE)
            np.testing.assert_array_equal(batch["tgt_pixels"][row], tgt)
            want = bert([text.blip_caption(cap["modification_text_mllm"])], padding="max_length", truncation=True,
                        max_length=32, return_tensors="np")
            np.testing.assert_array_equal(batch["input_ids"][row], want["input_ids"][0])
            np.testing.assert_array_equal(batch["attention_mask"][row], want["attention_mask"][0])
            # blip_caption: lower case, ";()!" dropped; WordPiece splits "it's" and pads with [PAD] (id 0).
            n = int(batch["attention_mask"][row].sum())
            assert bert.convert_ids_to_tokens(batch["input_ids"][row][:n].tolist()) == [
                "[CLS]", *"put the item on a beach it ' s sunny number".split(), str(rec.source_index), "[SEP]"]
            assert not batch["input_ids"][row][n:].any() and batch["attention_mask"][row][:n].all()
    assert seen_box and seen_no_box


def test_seeded_shuffle_reshuffles_every_epoch(train):
    with _iterator(train, shuffle_seed=3) as it:
        ids = np.concatenate([b["example_id"] for b in _take(it, 2 * NUM_QUERIES // BATCH)])
    with _iterator(train, shuffle_seed=3) as it:
        again = np.concatenate([b["example_id"] for b in _take(it, 2 * NUM_QUERIES // BATCH)])
    with _iterator(train, shuffle_seed=4) as it:
        other = np.concatenate([b["example_id"] for b in _take(it, NUM_QUERIES // BATCH)])
    np.testing.assert_array_equal(ids, again)
    e0, e1 = ids[:NUM_QUERIES], ids[NUM_QUERIES:]
    assert sorted(e0) == sorted(e1) == list(range(NUM_QUERIES))  # each epoch: a permutation of everything
    assert not np.array_equal(e0, e1)  # reseeded per epoch
    assert not np.array_equal(e0, np.arange(NUM_QUERIES)) and not np.array_equal(e0, other)


def test_processes_see_disjoint_halves(train, monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    seen = []
    for index in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        with _iterator(train, batch_size=2 * BATCH) as it:  # global batch 8 -> 4 rows per process
            assert it.steps_per_epoch == NUM_QUERIES // (2 * BATCH)
            batches = _take(it, it.steps_per_epoch)
        assert all(b["ref_pixels"].shape[0] == BATCH for b in batches)
        ids = np.concatenate([b["example_id"] for b in batches])
        assert len(set(ids.tolist())) == NUM_QUERIES // 2  # one epoch = this process's share, once each
        seen.append(set(ids.tolist()))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(NUM_QUERIES))
    with pytest.raises(ValueError, match="global batch 5 does not divide over 2 processes"):
        _iterator(train, batch_size=5)


def test_process_share_drops_the_remainder():
    shares = [range(41)[grain_io.process_share(41, i, 4)] for i in range(4)]
    assert [len(s) for s in shares] == [10] * 4
    assert sorted(sum((list(s) for s in shares), [])) == list(range(40))


def test_too_many_workers_fail_fast(train, monkeypatch):
    with pytest.raises(ValueError, match=r"5 data workers but only 4 query shards for 1 host\(s\) \(4 per host\)"):
        _iterator(train, num_workers=5)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with pytest.raises(ValueError, match=r"3 data workers .* \(2 per host\): lower config.data.num_workers"):
        _iterator(train, num_workers=3)
    with pytest.raises(ValueError, match="train_dir is empty"):
        oacir_pipeline.train_iterator(fx.pipeline_config(""), spec=SPEC)


def _check_state_round_trip(train, num_workers: int):
    with _iterator(train, num_workers=num_workers) as it:
        _take(it, 3)
        state = json.loads(json.dumps(it.get_state()))  # as checkpoints store it (JSON)
        want = [_fingerprint(b) for b in _take(it, 3)]
    with _iterator(train, num_workers=num_workers) as it:
        it.set_state(state)
        got = [_fingerprint(b) for b in _take(it, 3)]
    assert got == want
    return want


def test_iterator_state_round_trip(train):
    _check_state_round_trip(train, 0)


@pytest.mark.slow
def test_iterator_state_round_trip_with_worker_processes(train):
    want = _check_state_round_trip(train, 2)
    # Workers batch their own strides of the shuffled order: still one permutation per epoch.
    with _iterator(train, num_workers=2) as it:
        ids = np.concatenate([b["example_id"] for b in _take(it, NUM_QUERIES // BATCH)])
    assert sorted(ids.tolist()) == list(range(NUM_QUERIES))
    assert [w[0] for w in want] == [ids[i * BATCH:(i + 1) * BATCH].tolist() for i in range(3, 6)]


RESUME_SCRIPT = textwrap.dedent('''
    """Iterates the train pipeline, saving (ids so far, iterator state) atomically after every batch."""
    import json, os, sys, time

    def main():
        import oacirr_fixtures as fx
        from idmr_jax.tasks.oacir import pipeline as oacir_pipeline

        train_dir, progress, total, delay = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
        spec = oacir_pipeline.ImageSpec(size=56, grid=(4, 4))
        it = oacir_pipeline.train_iterator(fx.pipeline_config(train_dir), spec=spec)
        done = []
        if os.path.exists(progress):
            with open(progress) as f:
                saved = json.load(f)
            done = saved["batches"]
            it.set_state(saved["state"])
        with it:
            while len(done) < total:
                done.append(fingerprint(next(it)))
                tmp = progress + ".tmp"
                with open(tmp, "w") as f:
                    json.dump({"batches": done, "state": it.get_state()}, f)
                os.replace(tmp, progress)  # a kill leaves either the old or the new progress, never half
                time.sleep(delay)

    def fingerprint(batch):
        import hashlib
        import numpy as np
        digest = hashlib.sha1()
        for k in sorted(batch):
            digest.update(k.encode() + np.ascontiguousarray(batch[k]).tobytes())
        return [np.asarray(batch["example_id"]).tolist(), digest.hexdigest()]

    if __name__ == "__main__":
        main()
''')


def test_kill_and_resume_sees_the_uninterrupted_sequence(train, tmp_path):
    total = 14  # crosses the epoch boundary (10 batches per epoch)
    with _iterator(train) as it:
        want = [_fingerprint(b) for b in _take(it, total)]
    script, progress = tmp_path / "resume_run.py", tmp_path / "progress.json"
    script.write_text(RESUME_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.dirname(__file__),
                                                        os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(script), train["out"], str(progress), str(total)]

    proc = subprocess.Popen([*cmd, "0.3"], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while True:
            assert proc.poll() is None, f"run ended before it was killed: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no progress within 120 s"
            if progress.exists() and len(json.loads(progress.read_text())["batches"]) >= 4:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = len(json.loads(progress.read_text())["batches"])
    assert 4 <= killed_at < total

    done = subprocess.run([*cmd, "0"], env=env, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    got = json.loads(progress.read_text())["batches"]
    assert got == want


def test_adafocal_task_geometry_matches_the_pipeline():
    from configs import oacir
    from idmr_jax.tasks.oacir.task import model_config

    spec = oacir_pipeline.image_spec(model_config(oacir.get_config("tiny")))
    assert (spec.size, spec.grid) == (SIZE, GRID)
    spec = oacir_pipeline.image_spec(model_config(oacir.get_config("")))
    assert (spec.size, spec.grid) == (224, (16, 16))


@pytest.mark.slow
def test_eval_on_val_shards_writes_outputs(tmp_path):
    from configs import oacir
    from idmr_jax.tasks.oacir.evaluate import evaluate_arrayrecord
    from idmr_jax.tasks.oacir.task import OacirTask

    val = fx.build_converted(str(tmp_path / "raw"), str(tmp_path / "val"), split="val", num_queries=24,
                             num_instances=8, num_shards=2, gallery_shards=2)
    config = oacir.get_config("tiny")
    config.data.source, config.data.val_dir, config.data.num_workers = "arrayrecord", val["out"], 0
    task = OacirTask(config)
    workdir = tmp_path / "work"
    metrics = evaluate_arrayrecord(task.build_model(), config, task.model_config, str(workdir))

    out = workdir / "eval"
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(metrics)
    rankings = [json.loads(line) for line in (out / "rankings.jsonl").read_text().splitlines()]
    queries = {f"fashion/{q.source_index}": q for q in records.read_shards(os.path.join(val["out"], "queries-*"))}
    assert sorted(r["query_id"] for r in rankings) == sorted(queries)
    gallery = set(val["sizes"])
    hits1 = 0
    for r in rankings:
        q = queries[r["query_id"]]
        assert q.reference_name not in r["ranking"]  # the reference is removed from its own ranking
        assert set(r["ranking"]) == gallery - {q.reference_name}
        hits1 += r["ranking"][0] == q.target_name
    assert metrics["fashion/R@1"] == pytest.approx(100 * hits1 / len(rankings))
    assert metrics["fashion/R@50"] == 100.0  # 23 candidates
    with Image.open(io.BytesIO((out / "fashion_results.png").read_bytes())) as png:
        assert png.format == "PNG" and png.size[0] > SIZE
