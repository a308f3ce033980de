"""Pooling of LM hidden states: last / eos / before_token / mean, left and right padding, NaN on unpoolable rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from idmr_jax.models import pooling

EOS, EMB, PAD = 7, 9, 0


def _hidden(b=4, t=6, d=5, seed=0):
    return np.random.default_rng(seed).standard_normal((b, t, d)).astype(np.float32)


def _vlm2vec_last(hidden, mask):
    """VLM2Vec's `_pooling` ('last' == 'eos'), as written there in torch: left padding iff every row's last column
    is attended, else ``sum(mask) - 1``; then F.normalize."""
    h, m = torch.from_numpy(hidden), torch.from_numpy(mask)
    if int(m[:, -1].sum()) == m.shape[0]:
        reps = h[:, -1]
    else:
        reps = h[torch.arange(h.shape[0]), m.sum(dim=1) - 1]
    return F.normalize(reps, p=2, dim=-1).numpy()


RIGHT = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]], np.int32)
LEFT = RIGHT[:, ::-1].copy()


@pytest.mark.parametrize("mask", [RIGHT, LEFT], ids=["right", "left"])
def test_last_matches_vlm2vec(mask):
    hidden = _hidden()
    got = np.asarray(jax.jit(lambda h, m: pooling.pool(h, m, method="last"))(hidden, mask))
    np.testing.assert_allclose(got, _vlm2vec_last(hidden, mask), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-6)


def test_last_mixed_padding_per_row():
    """VLM2Vec decides left vs right for the whole batch; per-row last-attended works for any mix."""
    hidden = _hidden()
    mask = np.stack([RIGHT[1], LEFT[2], RIGHT[0], LEFT[3]])
    got = np.asarray(pooling.pool(hidden, mask, method="last", normalize=False))
    expected = hidden[np.arange(4), [3, 5, 5, 5]]
    np.testing.assert_array_equal(got, expected)


def test_eos_last_attended_occurrence():
    hidden = _hidden()
    ids = np.array([
        [3, EOS, 4, 5, EOS, PAD],     # two EOS: the last attended one (4) is the end of the input
        [EOS, EOS, 3, 4, 5, EOS],     # left padded with pad == eos: padding is not attended
        [3, 4, EOS, 5, 6, EOS],       # EOS is also the pad id on the right: first pad EOS is not attended
        [3, 4, 5, 6, EOS, 8],         # something after the EOS
    ], np.int32)
    mask = np.array([[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], np.int32)
    got = np.asarray(pooling.pool(hidden, mask, ids, method="eos", token_id=EOS, normalize=False))
    np.testing.assert_array_equal(got, hidden[np.arange(4), [4, 5, 2, 4]])
    # For inputs that end with EOS (VLM2Vec's processors), "eos" is VLM2Vec's 'eos' (== its 'last').
    ends = np.array([[3, 4, EOS, PAD, PAD, PAD], [3, 4, 5, 6, 7, EOS]], np.int32)
    m = (np.arange(6)[None] <= np.array([[2], [5]])).astype(np.int32)
    h = _hidden(b=2)
    np.testing.assert_allclose(np.asarray(pooling.pool(h, m, ends, method="eos", token_id=EOS)),
                               _vlm2vec_last(h, m), atol=1e-6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_before_token_lamra(side):
    hidden = _hidden()
    ids = np.array([[1, 2, 3, EMB, 4, PAD], [1, 2, EMB, 4, PAD, PAD], [1, EMB, 5, EMB, PAD, PAD],
                    [1, 2, 3, 4, EMB, 4]], np.int32)
    mask = (ids != PAD).astype(np.int32)
    expected_pos = np.array([2, 1, 0, 3])  # first <emb> minus one
    if side == "left":
        shift = (ids == PAD).sum(axis=1)
        ids = np.stack([np.roll(r, s) for r, s in zip(ids, shift)])
        mask = np.stack([np.roll(r, s) for r, s in zip(mask, shift)])
        hidden = np.stack([np.roll(h, s, axis=0) for h, s in zip(hidden, shift)])
        expected_pos = expected_pos + shift
    got = np.asarray(pooling.pool(hidden, mask, ids, method="before_token", token_id=EMB))
    ref = hidden[np.arange(4), expected_pos]
    np.testing.assert_allclose(got, ref / np.linalg.norm(ref, axis=-1, keepdims=True), atol=1e-6)


def test_mean():
    hidden = _hidden()
    got = np.asarray(pooling.pool(hidden, RIGHT, method="mean", normalize=False))
    ref = np.stack([hidden[i, RIGHT[i].astype(bool)].mean(0) for i in range(4)])
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_unpoolable_rows_are_nan_and_checked():
    hidden = _hidden(b=3)
    mask = np.array([[1, 1, 0, 0, 0, 0], [0] * 6, [1] * 6], np.int32)
    ids = np.array([[1, EMB, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6], [EMB, 2, 3, 4, 5, 6]], np.int32)
    last = np.asarray(pooling.pool(hidden, mask, method="last"))
    assert np.isnan(last[1]).all() and np.isfinite(last[[0, 2]]).all()
    before = np.asarray(pooling.pool(hidden, mask, ids, method="before_token", token_id=EMB))
    # row 1: no attended <emb>; row 2: <emb> at position 0 has nothing before it.
    assert np.isfinite(before[0]).all() and np.isnan(before[1:]).all()
    with pytest.raises(ValueError, match=r"rows \[1, 2\]"):
        pooling.check_poolable(mask, ids, method="before_token", token_id=EMB, what="queries")
    with pytest.raises(ValueError, match="needs token_id"):
        pooling.pool(hidden, mask, ids, method="eos")
    with pytest.raises(ValueError, match="unknown pooling"):
        pooling.pool(hidden, mask, method="cls")


def test_gradient_flows_to_pooled_position_only():
    hidden = jnp.asarray(_hidden(b=2))
    mask = jnp.asarray(RIGHT[:2])
    g = jax.grad(lambda h: jnp.sum(pooling.pool(h, mask, method="last") * jnp.arange(5.0)))(hidden)
    nz = np.argwhere(np.abs(np.asarray(g)).sum(-1) > 0)
    assert nz.tolist() == [[0, 5], [1, 3]]
