"""``python -m idmr_jax.search``: the index holds the embedder's candidate embeddings (bf16) in candidate order,
an index killed mid-way is refused until resumed and then equals an uninterrupted one, and a query returns the exact
top-k of a brute-force float32 dot product over the stored embeddings.

One tiny random embedder (configs/mbeir.py:tiny) saved as a training checkpoint (its params perturbed, so that
loading the init instead of the checkpoint would show), and a pool of 20 candidates, every third one text-only."""

import io
import json
import os
import re
import signal
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

from idmr_jax.bench.mbeir_memory import write_pool
from idmr_jax.search import build, store
from idmr_jax.search.__main__ import main
from idmr_jax.tasks.universal import evaluate, records

REPO = Path(__file__).resolve().parents[1]
NUM, BLOCK_ROWS, BATCH = 20, 8, 8  # 3 index blocks: 8, 8 and a short one of 4


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A training workdir of the universal task with one checkpoint (step 1)."""
    from configs import mbeir
    from idmr_jax import tasks
    from idmr_jax.train import checkpoint
    from idmr_jax.train.setup import setup_state

    config = mbeir.get_config("tiny")
    config.eval.batch_size = BATCH
    # Random values straight into the abstract state's shardings: far faster than compiling the model's init,
    # and unlike the seeded init, so that loading the init instead of the checkpoint would show.
    abstract = setup_state(tasks.build(config), total_steps=1, abstract=True).state
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        if leaf.dtype != np.float32:  # step, RNG key data and counters
            value = np.zeros(leaf.shape, leaf.dtype)
        else:
            is_scale = "scale" in jax.tree_util.keystr(path)  # norm scales near 1, other weights near 0
            value = (float(is_scale) + 0.05 * rng.standard_normal(leaf.shape)).astype(np.float32)
        return jax.device_put(value, leaf.sharding)

    state = jax.tree_util.tree_map_with_path(fill, abstract)
    folder = tmp_path_factory.mktemp("workdir")
    saver = checkpoint.Checkpointer(folder, async_save=False)
    saver.save(1, state, None, checkpoint.config_to_json(config))
    saver.close()
    return str(folder)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pool")
    write_pool(str(folder), NUM, image_side=48, num_queries=6, text_every=3)
    return str(folder)


@pytest.fixture(scope="module")
def embedder(workdir):
    return build.load_embedder(workdir)


@pytest.fixture(scope="module")
def full_index(embedder, pool, tmp_path_factory):
    """An index written in one uninterrupted run."""
    out = str(tmp_path_factory.mktemp("full") / "index")
    build.build_index(embedder, build.open_source("shards", pool), out, block_rows=BLOCK_ROWS)
    return store.open_index(out)


def _bf16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def test_index_holds_the_checkpoint_embeddings_in_candidate_order(workdir, pool, full_index):
    from idmr_jax import tasks
    from idmr_jax.tasks.universal.encode import AnyModalityEncoder
    from idmr_jax.tasks.universal.prompts import load_prompt_set
    from idmr_jax.weights.workdir import load_module, restore

    # The reference model comes another way: the checkpoint's flat params into a fresh module.
    checkpoint = restore(workdir)
    model = load_module(checkpoint.kind, checkpoint.model_config, checkpoint.flat)
    task = tasks.build(checkpoint.config)
    candidates = records.read_candidates(os.path.join(pool, evaluate.CANDIDATE_SHARDS))
    expected = AnyModalityEncoder(model, task, load_prompt_set("")).embed(
        "candidate", candidates, evaluate.candidate_texts(candidates))

    assert full_index.dids == [f"9:{i}" for i in range(NUM)]
    assert full_index.modalities == ["text" if i % 3 == 2 else "image" for i in range(NUM)]
    assert full_index.meta["blocks_done"] == [0, 1, 2] and full_index.meta["dtype"] == "bfloat16"
    assert full_index.meta["model"]["step"] == 1
    assert full_index.embeddings.shape == expected.shape == (NUM, checkpoint.model_config.text.hidden_size)
    # Stored in bf16: equal to the float32 embeddings rounded to bf16, up to one bf16 step of float noise.
    np.testing.assert_allclose(full_index.embeddings, _bf16(expected), rtol=2 ** -7, atol=1e-6)
    assert np.all(np.abs(full_index.embeddings - expected) <= 2 ** -8 * np.abs(expected) + 1e-6)
    # L2-normalised rows, not all alike: the pool's candidates differ.
    np.testing.assert_allclose(np.linalg.norm(full_index.embeddings, axis=1), 1.0, atol=1e-2)
    assert np.abs(full_index.embeddings[0] - full_index.embeddings[2]).max() > 1e-2


def test_index_resumed_after_a_kill_equals_an_uninterrupted_run(workdir, pool, embedder, full_index, tmp_path):
    out = str(tmp_path / "index")
    env = {**os.environ, build.KILL_AFTER_BLOCKS_ENV: "1", "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-m", "idmr_jax.search", "index", "--model", workdir, "--data", pool,
                             "--out", out, "--block-rows", str(BLOCK_ROWS)], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert "block 1/3" in killed.stdout and "block 2/3" not in killed.stdout
    assert store.read_meta(out)["blocks_done"] == [0]
    with pytest.raises(ValueError, match=re.escape("incomplete index, blocks [1, 2] of 3 not written yet")):
        store.open_index(out)

    log = []
    build.build_index(embedder, build.open_source("shards", pool), out, block_rows=BLOCK_ROWS, log=log.append)
    assert "1 done before, 2 to embed" in log[0]
    assert [line.split(":")[0] for line in log[1:]] == ["block 2/3", "block 3/3"]  # block 1 is not redone
    resumed = store.open_index(out)
    assert resumed.dids == full_index.dids and resumed.modalities == full_index.modalities
    np.testing.assert_array_equal(resumed.embeddings, full_index.embeddings)

    # Another block size is another job: refused, not mixed into the index.
    with pytest.raises(ValueError, match="give a new --out"):
        build.build_index(embedder, build.open_source("shards", pool), out, block_rows=4)


def _brute_force(index: store.SearchIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries.astype(np.float32) @ index.embeddings.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # ties: the lower row first
    return np.take_along_axis(scores, order, axis=1), order


def _run_cli(argv: list[str]) -> list[dict]:
    printed = io.StringIO()
    with redirect_stdout(printed):
        assert main(argv) == 0
    return [json.loads(line) for line in printed.getvalue().splitlines() if line.startswith("{")]


def test_query_returns_the_brute_force_top_k(workdir, pool, embedder, full_index, tmp_path):
    k = 5
    out = tmp_path / "hits.jsonl"
    printed = _run_cli(["query", "--index", full_index.path, "--model", workdir, "--queries", pool, "--k", str(k),
                        "--out", str(out)])
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert printed == written

    queries = build.read_query_shards(pool)
    scores, rows = _brute_force(full_index, build.embed_queries(embedder, queries), k)
    assert [r["query_id"] for r in written] == [q.qid for q in queries]
    for hit, row, score in zip(written, rows, scores):
        assert [r["did"] for r in hit["results"]] == [full_index.dids[i] for i in row]
        assert [r["modality"] for r in hit["results"]] == [full_index.modalities[i] for i in row]
        np.testing.assert_allclose([r["score"] for r in hit["results"]], score, rtol=1e-5, atol=1e-6)

    # One text query, with the model the index records (no --model): the same brute force.
    (single,) = _run_cli(["query", "--index", full_index.path, "--text", "candidate 5", "--k", "3"])
    scores, rows = _brute_force(full_index, build.embed_queries(embedder, [build.text_query("candidate 5")]), 3)
    assert [r["did"] for r in single["results"]] == [full_index.dids[i] for i in rows[0]]
    np.testing.assert_allclose([r["score"] for r in single["results"]], scores[0], rtol=1e-5, atol=1e-6)


def test_query_refuses_another_model(full_index, embedder):
    other = build.Embedder(embedder.task, embedder.model, {**embedder.source, "step": 2})
    with pytest.raises(ValueError, match="query with the model that built the index"):
        build.query_index(other, full_index, [build.text_query("a query")])
