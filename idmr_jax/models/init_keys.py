"""RNG streams for building a model whose keys and counters stay concrete, so tracing a constructor stays linear.

Every parameter (and every ``nnx.Dropout``, which forks its stream) draws the next key of an ``nnx.Rngs`` stream,
and NNX advances the stream's counter through ``Variable.set_value``, which compares the new value's ``.sharding``
with the old one's. Under a trace (``nnx.eval_shape``, the jitted sharded init) the counter becomes a tracer, and
JAX answers a tracer's missing ``.sharding`` with an error message that first searches the whole program traced so
far for the value's origin. With one such search per draw, building a model traced in O(draws x program size):
3.0 of the 3.2 s it took to trace the tiny AdaFocal's constructor, and the trainer traces it on every start.

When the seeds are Python ints, the key and counter can stay concrete instead: :class:`EagerRngStream` creates
and advances them eagerly (``jax.ensure_compile_time_eval``), inside a trace or not. These are the same integer
operations on the same values, so every key, and so every initial weight, is bit for bit what ``nnx.Rngs`` draws;
the traced initialisers see each key as a constant. Where a stream is traced already (split over scanned layers,
or inside the train step, where its counter is part of the state) it is advanced the usual way.
"""

from __future__ import annotations

import jax
from flax import nnx


class EagerRngStream(nnx.RngStream):
    """An ``nnx.RngStream`` whose key and counter are created and advanced eagerly while they are concrete."""

    def __init__(self, key: jax.Array | int, *, tag: str):
        with jax.ensure_compile_time_eval():
            super().__init__(key, tag=tag)

    def __call__(self) -> jax.Array:
        with jax.ensure_compile_time_eval():
            return super().__call__()  # streams forked from this one (``fork``) are of this type too


def model_rngs(**seeds: int) -> nnx.Rngs:
    """``nnx.Rngs(**seeds)`` (e.g. ``params=0, dropout=1``) whose streams are :class:`EagerRngStream`: the same
    keys, drawn without growing the trace of the model's constructor."""
    rngs = nnx.Rngs(**seeds)
    for tag, seed in seeds.items():
        setattr(rngs, tag, EagerRngStream(seed, tag=tag))
    return rngs
