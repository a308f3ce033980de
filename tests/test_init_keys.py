"""models/init_keys.py: RNG streams that stay concrete while a model is built under a trace, drawing the same keys."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from idmr_jax.models.init_keys import EagerRngStream, model_rngs


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


def test_same_weights_and_keys_as_nnx_rngs_with_concrete_counters_under_jit():
    eager, eager_count = _build(model_rngs)
    plain, plain_count = _build(nnx.Rngs)

    def as_numpy(x):
        return np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)

    a, b = jax.tree.leaves(jax.tree.map(as_numpy, eager)), jax.tree.leaves(jax.tree.map(as_numpy, plain))
    assert len(a) == len(b) > 8
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)  # bit for bit: the same keys drawn in the same order
    # The point of it: under the trace the counter stayed a concrete array (NNX's own is a tracer).
    # 7 draws: one per param (Embed 1, Linear 2, LayerNorm 2, Linear 2), zeros and ones initialisers included.
    assert not isinstance(eager_count, jax.core.Tracer) and int(eager_count) == 7
    assert isinstance(plain_count, jax.core.Tracer)
    assert isinstance(model_rngs(params=0).params, EagerRngStream)
