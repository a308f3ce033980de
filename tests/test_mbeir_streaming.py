"""M-BEIR evaluation streams its candidates: one pass keeps each candidate's did, image flag and pools, and the
embedding reads each block's records by key, so no more than one block of candidate images is ever alive. The
streamed embeddings equal those of the whole pool read at once, bit for bit."""

import weakref

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from idmr_jax.bench.mbeir_memory import POOL, write_pool
from idmr_jax.data.grain_io import RecordReader
from idmr_jax.tasks.universal import evaluate, records

BLOCK = 8  # eval.batch_size: a multiple of the 8 fake devices, so blocks hold exactly 8 rows
NUM = 25
TEXT_EVERY = 5  # keys 4, 9, 14, 19 and 24 are text-only; the other 20 have an image
# Image rows first, in key order, 8 a block; then the text-only rows.
EXPECTED_BLOCKS = [[0, 1, 2, 3, 5, 6, 7, 8], [10, 11, 12, 13, 15, 16, 17, 18], [20, 21, 22, 23],
                   [4, 9, 14, 19, 24]]


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pool")
    info = write_pool(str(folder), NUM, image_side=64, num_queries=4, text_every=TEXT_EVERY)
    assert info["candidates"] == NUM
    return str(folder)


def _evaluate(folder, workdir) -> dict:
    from configs import mbeir
    from idmr_jax import tasks
    from idmr_jax.train import trainer

    config = mbeir.get_config("tiny")
    config.data.val_dir = folder
    config.eval.batch_size = BLOCK
    return trainer.evaluate_only(tasks.build(config), str(workdir))


def test_no_more_than_one_block_of_candidate_images_is_alive(pool_dir, tmp_path, monkeypatch):
    decode, read_block = records.decode_candidate, evaluate.read_candidate_block
    with_image: list[weakref.ref] = []  # every decoded candidate that holds image bytes
    most_alive, blocks = [0], []

    def counting_decode(data):
        record = decode(data)
        if record.image is not None:
            with_image.append(weakref.ref(record))
            most_alive[0] = max(most_alive[0], sum(r() is not None for r in with_image))
        return record

    def recording_read(reader, keys):
        blocks.append(list(keys))
        return read_block(reader, keys)

    monkeypatch.setattr(records, "decode_candidate", counting_decode)
    monkeypatch.setattr(evaluate, "read_candidate_block", recording_read)
    metrics = _evaluate(pool_dir, tmp_path)
    assert blocks == EXPECTED_BLOCKS
    # The index pass decodes each of the 20 image records once, the embedding pass once more, block by block.
    assert len(with_image) == 2 * 20
    assert most_alive[0] == BLOCK  # the whole pool read at once (`records.read_candidates`) would hold 20
    assert set(metrics) >= {"mbeir/mscoco_task0/R@1", "mbeir/avg/headline"}


def test_streamed_embeddings_equal_the_pool_read_at_once(pool_dir, tmp_path, monkeypatch):
    embed, rank = evaluate.embed_candidates, evaluate.rank_gallery
    seen = {}

    def keep_embeddings(encoder, reader, index):
        seen.update(encoder=encoder, reader=reader, index=index, cand=embed(encoder, reader, index))
        return seen["cand"]

    def keep_gallery(query, gallery, top):
        seen["ranked"] = gallery
        return rank(query, gallery, top)

    monkeypatch.setattr(evaluate, "embed_candidates", keep_embeddings)
    monkeypatch.setattr(evaluate, "rank_gallery", keep_gallery)
    _evaluate(pool_dir, tmp_path)
    index, cand = seen["index"], seen["cand"]
    assert index.dids == [f"9:{k}" for k in range(NUM)]
    assert np.flatnonzero(~index.with_image).tolist() == [4, 9, 14, 19, 24]
    assert list(index.pools) == [POOL] and index.pools[POOL].tolist() == list(range(NUM))
    assert cand.dtype == np.float32 and cand.shape == (NUM, 64)  # the tiny LM's hidden size: 256 B a candidate
    assert seen["ranked"] is cand  # a pool of every candidate is ranked without another host copy

    whole = records.read_candidates(seen["reader"].paths)
    reference = seen["encoder"].embed("candidate", whole, evaluate.candidate_texts(whole))
    np.testing.assert_array_equal(cand, reference)


def test_a_broken_candidate_record_is_named_by_its_key(tmp_path):
    write_pool(str(tmp_path), 2, image_side=32, num_queries=1)
    path = tmp_path / "candidates-00001-of-00002.array_record"  # global key 2: after the first shard's two
    writer = ArrayRecordWriter(str(path), "group_size:1")
    writer.write(b"not a record")
    writer.close()
    reader = RecordReader(sorted(str(p) for p in tmp_path.glob("candidates-*.array_record")))
    with pytest.raises(ValueError, match=r"candidates-\*\.array_record in .*, record 2 \(global key\)"):
        evaluate.index_candidates(reader)
