"""LamRA-style reranking (idmr_jax.tasks.rerank): the answer tokens, the prompts, the scores of a tiny random
LlavaEmbedder (configs/mbeir.py:tiny) against a NumPy hand computation from its own logits, listwise targets and
shuffling, and the top-K reranking rule (a property test per mode, plus hand-computed fusion)."""

import dataclasses
import io

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from idmr_jax.tasks.idmr.pipeline import PromptSpec
from idmr_jax.tasks.rerank import prompts as P
from idmr_jax.tasks.rerank.rerank import MODES, normalise_retrieval, rerank_queries, rerank_top_k, score_top_k
from idmr_jax.tasks.rerank.scoring import RerankScorer, image_rows
from idmr_jax.tasks.universal.records import Side

# bert-base-uncased WordPiece ids: "yes", "no", "1".."5"
BERT_YES, BERT_NO, BERT_DIGITS = 2748, 2053, (1015, 1016, 1017, 1018, 1019)


def side(sid, text=None, image=None):
    return Side(sid, text, image, "image,text" if text and image else "image" if image else "text")


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bare_tokenizer():
    return P.RerankTokenizer("", PromptSpec(image_token_id=30522, image_tokens=4, max_length=48))


# ------------------------------------------------------------------ answer tokens and prompts


def test_answer_tokens_are_single_bundled_tokens(bare_tokenizer):
    ids = P.answer_ids(bare_tokenizer, P.load_rerank_prompts())
    assert (ids.yes, ids.no, ids.index) == (BERT_YES, BERT_NO, BERT_DIGITS)
    two_words = dataclasses.replace(P.load_rerank_prompts(), yes="Yes indeed")
    with pytest.raises(ValueError, match="'Yes indeed' is 2 tokens"):
        P.answer_ids(bare_tokenizer, two_words)


def test_prompt_ends_with_the_question_and_only_side_text_is_cut(bare_tokenizer):
    prompts = P.load_rerank_prompts()
    query = side("q", "a red bus", jpeg(0))
    cand = side("c", " ".join(["street"] * 100))
    prompt = P.pointwise_prompt(prompts, query, cand)
    assert prompt.render().startswith("Query: <image>\n a red bus\n Candidate: street street")
    assert prompt.images == (query.image,)
    ids, mask = bare_tokenizer.encode(prompt)
    kept = list(ids[mask == 1])
    question = bare_tokenizer.tokens("Does the candidate match the query? Answer Yes or No:")
    # No EOS: the prompt's last token is the question's last (":"), so the next token is the answer.
    assert len(kept) == 48 and kept[-len(question):] == question and kept[0] == 101
    assert kept.count(30522) == 4 and bare_tokenizer.tokens("a red bus") == kept[7:10]


# ------------------------------------------------------------------ listwise examples


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_listwise_target_follows_the_positive(k, bare_tokenizer):
    answers = P.answer_ids(bare_tokenizer, P.load_rerank_prompts())
    names = ["alpha", "bravo", "charlie", "delta", "echo"][:k]
    cands = [side(n, f"photo of {n}") for n in names]
    orders = set()
    rng = np.random.default_rng(k)
    for positive in range(k):
        for _ in range(6):
            ex = P.listwise_example(side("q", "find it"), cands, positive, rng)
            assert sorted(ex.order) == list(range(k)) and ex.order[ex.target] == positive
            text = ex.prompt.render()
            assert f"({ex.target + 1}) photo of {names[positive]}\n" in text
            for j, i in enumerate(ex.order):
                assert f"({j + 1}) photo of {names[i]}\n" in text
            assert bare_tokenizer.tokens(ex.label) == [answers.index[ex.target]] == [BERT_DIGITS[ex.target]]
            orders.add(ex.order)
    assert len(orders) > 1  # shuffled per example
    seeds = {P.listwise_example(side("q", "x"), cands, 0, np.random.default_rng(s)).order for s in range(12)}
    assert len(seeds) > 1  # different seeds, different orders


def test_sample_list_size_covers_two_to_five():
    rng = np.random.default_rng(0)
    assert {P.sample_list_size(rng) for _ in range(200)} == {2, 3, 4, 5}


# ------------------------------------------------------------------ top-K reranking


def expected_key(retrieval, rerank, mode, weight):
    if mode != "fused" or not len(rerank):
        return list(rerank)
    r = np.asarray(retrieval, float)
    norm = np.ones_like(r) if r.max() == r.min() else (r - r.min()) / (r.max() - r.min())
    return list(weight * norm + (1 - weight) * np.asarray(rerank, float))


@pytest.mark.parametrize("mode", MODES)
def test_rerank_keeps_the_top_k_closed_and_the_tail_fixed(mode):
    rng = np.random.default_rng(list(MODES).index(mode))
    for trial in range(200):
        k, weight = int(rng.integers(1, 7)), float(rng.uniform())
        lengths = rng.integers(0, 12, size=4)
        ids = [list(rng.permutation(100)[:n]) for n in lengths]
        retrieval = [sorted(np.round(rng.uniform(size=n), 1), reverse=True) for n in lengths]
        rerank = [np.round(rng.uniform(size=min(k, n)), 1) for n in lengths]  # rounded: ties happen
        out = rerank_top_k(ids, retrieval, rerank, k=k, mode=mode, weight=weight)
        for q in range(len(ids)):
            n = min(k, len(ids[q]))
            assert out[q][n:] == ids[q][n:]
            assert sorted(out[q][:n]) == sorted(ids[q][:n])
            key = expected_key(retrieval[q][:n], rerank[q], mode, weight)
            pos = [ids[q].index(d) for d in out[q][:n]]
            for a, b in zip(pos, pos[1:]):  # best first; equal keys in retrieval order
                assert key[a] > key[b] or (key[a] == key[b] and a < b), (trial, q, key, pos)


def test_fusion_by_hand():
    ids, retrieval = [["a", "b", "c", "d", "e"]], [[0.9, 0.7, 0.5, 0.3, 0.1]]
    rerank = [[0.2, 0.9, 0.6]]
    # normalised retrieval over the top 3: [1, 0.5, 0]; fused at 0.5: [0.6, 0.7, 0.3]
    assert rerank_top_k(ids, retrieval, rerank, k=3, mode="fused") == [["b", "a", "c", "d", "e"]]
    assert rerank_top_k(ids, retrieval, rerank, k=3, mode="pointwise") == [["b", "c", "a", "d", "e"]]
    # weight 0.8: [0.84, 0.58, 0.12]: the retrieval order survives
    assert rerank_top_k(ids, retrieval, rerank, k=3, mode="fused", weight=0.8) == [["a", "b", "c", "d", "e"]]
    assert rerank_top_k(ids, retrieval, [[0.5, 0.5, 0.5]], k=3, mode="listwise") == ids
    np.testing.assert_allclose(normalise_retrieval([2.0, 2.0]), [1.0, 1.0])
    with pytest.raises(ValueError, match="query 0: 2 rerank"):
        rerank_top_k(ids, retrieval, [[0.1, 0.2]], k=3)


# ------------------------------------------------------------------ scores of a tiny LM


@pytest.fixture(scope="module")
def tiny():
    from configs import mbeir
    from idmr_jax import tasks

    config = mbeir.get_config("tiny")
    config.eval.batch_size = 8
    task = tasks.build(config)
    # Random values into the abstract model: much faster than running its initialisers op by op on 2 cores.
    graphdef, state = nnx.split(nnx.eval_shape(task.build_model))
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.split(jax.random.key(0), leaf.shape) if leaf.shape else jax.random.key(0)
        if not np.issubdtype(leaf.dtype, np.floating):
            return np.zeros(leaf.shape, leaf.dtype)
        is_scale = "scale" in jax.tree_util.keystr(path)  # norm scales near 1, other weights near 0
        return (float(is_scale) + 0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    return task, nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def hand_scores(model, scorer, prompt):
    """P("Yes") and the listwise softmax by hand: model.logits on the prompt alone, its last attended position."""
    ids, mask = scorer.tokenizer.encode(prompt)
    pixels = image_rows([prompt], scorer.size, scorer.pad_ratio)[0] if prompt.images else None
    logits = np.asarray(model.logits(ids[None], mask[None], pixels), np.float64)[0]
    last = logits[np.flatnonzero(mask)[-1]]
    yes, no = np.exp(last[scorer.answers.yes]), np.exp(last[scorer.answers.no])
    index = np.exp(last[list(scorer.answers.index)])
    return yes / (yes + no), index


@pytest.mark.parametrize("padding", ["right", "left"])
def test_scores_match_a_hand_computation(tiny, padding):
    task, model = tiny
    task.config.data.padding_side = padding
    try:
        scorer = RerankScorer(model, task, max_length=96)
    finally:
        task.config.data.padding_side = "right"
    prompts = P.load_rerank_prompts()
    query = side("q", "a red bus", jpeg(1))
    cands = [side("c1", "a bus"), side("c2", None, jpeg(2)), side("c3", "a tram", jpeg(3))]
    point = [P.pointwise_prompt(prompts, query, c) for c in cands]
    point.append(P.pointwise_prompt(prompts, side("t", "text only"), cands[0]))
    got = scorer.pointwise(point)
    assert got.dtype == np.float32 and got.shape == (4,)
    want = [hand_scores(model, scorer, p)[0] for p in point]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    listed = P.listwise_prompt(prompts, side("t", "text only"), [cands[0], side("c4", "a car")])
    (got_list,) = scorer.listwise([listed], [2])
    index = hand_scores(model, scorer, listed)[1][:2]
    np.testing.assert_allclose(got_list, index / index.sum(), rtol=1e-4, atol=1e-6)


def test_rerank_queries_reorders_by_the_scores(tiny):
    task, model = tiny
    scorer = RerankScorer(model, task, max_length=96)
    words = ["bus", "tram", "car", "bike", "train", "boat", "plane"]
    cands = {f"d{i}": side(f"d{i}", f"a {w}") for i, w in enumerate(words)}
    queries = [side("q0", "a red bus"), side("q1", "something that floats")]
    rankings = [{"results": [{"did": f"d{i}", "score": 1.0 - 0.1 * i} for i in order]}
                for order in ([0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1, 0])]
    out = rerank_queries(model, task, queries, cands, rankings, k=5, scorer=scorer)
    scores = score_top_k(scorer, queries, cands, rankings, k=5)
    for q, ranking in enumerate(rankings):
        ids = [r["did"] for r in ranking["results"]]
        for mode in MODES:
            assert out[mode][q][5:] == ids[5:] and sorted(out[mode][q][:5]) == sorted(ids[:5])
        by_point = [ids[i] for i in np.argsort(-scores["pointwise"][q], kind="stable")]
        by_list = [ids[i] for i in np.argsort(-scores["listwise"][q], kind="stable")]
        assert out["pointwise"][q][:5] == by_point and out["listwise"][q][:5] == by_list
        np.testing.assert_allclose(scores["listwise"][q].sum(), 1.0, rtol=1e-5)
    expected_p0 = scorer.pointwise([P.pointwise_prompt(scorer.prompts, queries[0], cands["d0"])])[0]
    np.testing.assert_allclose(scores["pointwise"][0][0], expected_p0, rtol=1e-5)
