"""models/init_keys.py: RNG streams that stay concrete while a model is built under a trace, drawing the same keys;
and the seed as a traced value (the same keys again, one compiled init for every seed)."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

import pytest

from idmr_jax.models import init_keys
from idmr_jax.models.init_keys import EagerRngStream, model_rngs, seed_as_data, seeded_model_rngs


class _Small(nnx.Module):
    """Flax layers that draw from ``rngs.params`` directly and a Dropout that forks ``rngs.dropout``."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(11, 4, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.linear = nnx.Linear(4, 3, rngs=rngs)
        self.norm = nnx.LayerNorm(3, rngs=rngs)
        self.last = nnx.Linear(3, 2, rngs=rngs)


def _build(make_rngs):
    counts = []

    def init():
        rngs = make_rngs(params=3, dropout=4)
        model = _Small(rngs)
        counts.append(rngs.params.count[...])
        return nnx.state(model)

    return jax.jit(init)(), counts[0]


def _as_numpy(x):
    return np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)


def _leaves(state):
    return jax.tree.leaves(jax.tree.map(_as_numpy, state))


def test_same_weights_and_keys_as_nnx_rngs_with_concrete_counters_under_jit():
    eager, eager_count = _build(model_rngs)
    plain, plain_count = _build(nnx.Rngs)

    a, b = _leaves(eager), _leaves(plain)
    assert len(a) == len(b) > 8
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)  # bit for bit: the same keys drawn in the same order
    # The point of it: under the trace the counter stayed a concrete array (NNX's own is a tracer).
    # 7 draws: one per param (Embed 1, Linear 2, LayerNorm 2, Linear 2), zeros and ones initialisers included.
    assert not isinstance(eager_count, jax.core.Tracer) and int(eager_count) == 7
    assert isinstance(plain_count, jax.core.Tracer)
    assert isinstance(model_rngs(params=0).params, EagerRngStream)


@pytest.mark.parametrize("seed", [0, 5, 2**31 - 1, 2**32 - 1, -1])
def test_a_traced_seed_draws_the_keys_of_the_int_seed(monkeypatch, seed):
    # Blocks of 3 keys, so that the 7 draws of _Small span three blocks (256 in use).
    monkeypatch.setattr(init_keys, "DRAWS_PER_BLOCK", 3)
    traced_counts = []

    def init(seed_value):
        rngs = seeded_model_rngs(seed_value)
        model = _Small(rngs)
        traced_counts.append(rngs.params.count[...])
        return nnx.state(model)

    lowered = jax.jit(init).lower(seed_as_data(seed))
    traced = lowered.compile()(seed_as_data(seed))
    concrete = jax.jit(lambda: nnx.state(_Small(seeded_model_rngs(seed))))()
    a, b = _leaves(traced), _leaves(concrete)
    assert len(a) == len(b) > 8
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)  # params from `seed`, dropout from `seed + 1`, wrapping at 2**32 alike
    assert not isinstance(traced_counts[0], jax.core.Tracer) and int(traced_counts[0]) == 7
    # The seed is an argument of the program, not a constant in it: another seed lowers to the same program.
    assert jax.jit(init).lower(seed_as_data(seed + 1)).as_text() == lowered.as_text()
