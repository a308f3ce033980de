"""Chunked / sharded top-k retrieval against the NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idmr_jax.evaluation.retrieval import scores_numpy, topk_numpy, topk_retrieval
from idmr_jax.sharding import make_mesh

NQ, NG, T, E = 6, 37, 3, 8


def _int_data(seed=0):
    """Small-integer features: every dot product is exact, and many scores tie (exercises the tie rule)."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-1, 2, (NQ, E)).astype(np.float32)
    g = rng.integers(-1, 2, (NG, T, E)).astype(np.float32)
    return q, g


def _normal_data(seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(NQ, E)).astype(np.float32), rng.normal(size=(NG, T, E)).astype(np.float32)


def test_topk_numpy_definition():
    q, g = _int_data()
    s = scores_numpy(q, g)
    np.testing.assert_array_equal(s, np.max(np.einsum("qe,gte->qgt", q, g), -1))
    sc, ix = topk_numpy(q, g, 5)
    for row in range(NQ):  # sorted by (score desc, index asc)
        keys = [(-s[row, i], i) for i in range(NG)]
        assert [i for _, i in sorted(keys)[:5]] == ix[row].tolist()


@pytest.mark.parametrize("chunk", [1, 5, 8, 37, 64])  # dividing, not dividing, whole, larger than the gallery
def test_chunked_equals_reference_with_ties(chunk):
    q, g = _int_data()
    want_s, want_i = topk_numpy(q, g, 10)
    got_s, got_i = topk_retrieval(q, g, 10, chunk_size=chunk)
    np.testing.assert_array_equal(np.asarray(got_i), want_i)
    np.testing.assert_array_equal(np.asarray(got_s), want_s)


def test_chunked_random_features_and_full_k():
    q, g = _normal_data(1)
    want_s, want_i = topk_numpy(q, g, NG)
    got_s, got_i = topk_retrieval(q, g, NG, chunk_size=8)  # k = Ng: every real item, no padded index
    np.testing.assert_array_equal(np.asarray(got_i), want_i)
    np.testing.assert_allclose(np.asarray(got_s), want_s, rtol=1e-5, atol=1e-5)
    assert sorted(np.asarray(got_i)[0].tolist()) == list(range(NG))


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
@pytest.mark.parametrize("sub", [4, 6])  # sub-blocks dividing the chunk, and with a remainder (12 = 2 x 6 ... 20)
def test_sub_chunks_equal_reference_with_ties(dtype, sub):
    q, g = _int_data(3)  # small integers: exact in bf16, so both dtypes must reproduce the ties exactly
    want_s, want_i = topk_numpy(q, g, 10)
    got_s, got_i = topk_retrieval(q, jnp.asarray(g, dtype), 10, chunk_size=20, sub_chunk=sub)
    np.testing.assert_array_equal(np.asarray(got_i), want_i)
    np.testing.assert_array_equal(np.asarray(got_s), want_s)


def test_bfloat16_gallery_query_terms():
    """The bf16 path splits the float32 query into bf16 parts: two keep float32 accuracy, one does not."""
    rng = np.random.default_rng(4)
    q = rng.normal(size=(NQ, 64)).astype(np.float32)
    g = rng.normal(size=(NG, T, 64))
    q, g = q / np.linalg.norm(q, axis=-1, keepdims=True), g / np.linalg.norm(g, axis=-1, keepdims=True)  # as used
    g16 = jnp.asarray(g, jnp.bfloat16)
    exact = scores_numpy(q, np.asarray(g16, np.float32))
    errors = {}
    for terms in (1, 2):
        got_s, got_i = topk_retrieval(q, g16, NG, chunk_size=16, sub_chunk=8, query_terms=terms)
        errors[terms] = np.abs(np.asarray(got_s) - np.take_along_axis(exact, np.asarray(got_i), 1)).max()
    assert errors[2] < 2e-6 < 1e-4 < errors[1] < 1e-2, errors


def test_bfloat16_gallery():
    q, g = _normal_data(2)
    g16 = jnp.asarray(g, jnp.bfloat16)
    got_s, got_i = topk_retrieval(q, g16, 5, chunk_size=8)
    # Exact against the reference on the same (bf16-rounded) values, scored in float32 ...
    want_s, want_i = topk_numpy(q, np.asarray(g16, np.float32), 5)
    np.testing.assert_array_equal(np.asarray(got_i), want_i)
    np.testing.assert_allclose(np.asarray(got_s), want_s, rtol=1e-5, atol=1e-5)
    # ... and within bf16 rounding of the float32 gallery.
    f32_s = np.take_along_axis(scores_numpy(q, g), np.asarray(got_i), axis=1)
    np.testing.assert_allclose(np.asarray(got_s), f32_s, atol=3e-2)


def test_query_chunks():
    q, g = _int_data(3)
    want = topk_retrieval(q, g, 7, chunk_size=5)
    got = topk_retrieval(q, g, 7, chunk_size=5, query_chunk=4)  # 6 queries -> blocks of 4 and 2 (padded)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))


@pytest.mark.parametrize("shape, axes", [((2, 2, 2), None), ((8, 1, 1), ("data",)), ((2, 2, 2), ("fsdp", "model"))])
def test_sharded_equals_unsharded(shape, axes):
    assert jax.device_count() == 8
    mesh = make_mesh(shape)
    q, g = _int_data(4)  # Ng = 37: padded to 40 over 8 shards (or 40 over 4), local size 5 or 10
    want_s, want_i = topk_numpy(q, g, 12)
    got_s, got_i = topk_retrieval(q, g, 12, chunk_size=3, mesh=mesh, axes=axes)
    np.testing.assert_array_equal(np.asarray(got_i), want_i)
    np.testing.assert_array_equal(np.asarray(got_s), want_s)
    unsharded = topk_retrieval(q, g, 12, chunk_size=3)
    np.testing.assert_array_equal(np.asarray(got_i), np.asarray(unsharded[1]))


def test_sharded_small_shards_never_return_padding():
    mesh = make_mesh((8, 1, 1))
    q, g = _normal_data(5)
    g = g[:9]  # 9 items over 8 shards: 7 padded rows, most shards hold fewer than k real items
    got_s, got_i = topk_retrieval(q, g, 9, chunk_size=4, mesh=mesh)
    want_s, want_i = topk_numpy(q, g, 9)
    np.testing.assert_array_equal(np.asarray(got_i), want_i)
    np.testing.assert_allclose(np.asarray(got_s), want_s, rtol=1e-5, atol=1e-5)


def test_bad_k():
    q, g = _int_data()
    with pytest.raises(ValueError):
        topk_retrieval(q, g, NG + 1)
    with pytest.raises(ValueError):
        topk_numpy(q, g, 0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_search_memory_is_bounded_by_the_chunk_not_the_gallery(dtype):
    """Compiled temp memory (nothing runs) stays a small fraction of the gallery: no upcast copy of it, in
    particular none from XLA's CPU bf16 normalisation (see `retrieval._compiler_options`)."""
    from idmr_jax.evaluation import retrieval

    n, t, e = 20_000, 32, 64
    query = jax.ShapeDtypeStruct((100, e), jnp.float32)
    gallery = jax.ShapeDtypeStruct((n, t, e), dtype)
    fn = retrieval._single_fn(jax.default_backend())
    compiled = fn.lower(query, gallery, k=10, chunk_size=256, precision=jax.lax.Precision.HIGHEST, terms=2,
                        sub=64).compile()
    gallery_bytes = n * t * e * jnp.dtype(dtype).itemsize
    assert compiled.memory_analysis().temp_size_in_bytes < 0.05 * gallery_bytes
