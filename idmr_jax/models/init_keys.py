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

The seed itself may be traced (:func:`seeded_model_rngs` with a jit argument), so that the compiled init no longer
depends on the seed: a new seed then reuses the init program of another (the persistent compilation cache). The
counters stay concrete, so tracing stays linear all the same. The i-th key of such a stream is still
``fold_in(key, i)``, computed for 256 draws at a time (one vectorised ``fold_in``), since XLA:CPU lowers each threefry
as a loop of its own. The price is in compiling: every initialiser now takes its key as a value, not a constant. The
demo model's init (one CPU device) compiled in 10.3 s with the seed as a constant, 12.7 s with a ``fold_in`` per
draw and 12.1 s in blocks; a second seed then compiles nothing (BENCHMARKS.md section 7).
"""

from __future__ import annotations

import weakref

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DRAWS_PER_BLOCK = 256  # keys of a traced stream computed together


class _KeyBlocks:
    """The keys ``fold_in(key, i)`` of one traced stream, computed a block of :data:`DRAWS_PER_BLOCK` at a time."""

    def __init__(self, key: jax.Array):
        self.key = key
        self.blocks: list[jax.Array] = []

    def __getitem__(self, i: int) -> jax.Array:
        block, offset = divmod(i, DRAWS_PER_BLOCK)
        while len(self.blocks) <= block:
            start = len(self.blocks) * DRAWS_PER_BLOCK
            counts = jnp.arange(start, start + DRAWS_PER_BLOCK, dtype=jnp.uint32)
            self.blocks.append(jax.vmap(jax.random.fold_in, in_axes=(None, 0))(self.key, counts))
        return self.blocks[block][offset]


# Streams built on a traced seed, by id (the stream is a pytree node, so its blocks live here, not on it); an entry
# goes when its stream does.
_TRACED_STREAMS: dict[int, _KeyBlocks] = {}


class EagerRngStream(nnx.RngStream):
    """An ``nnx.RngStream`` whose key and counter are created and advanced eagerly while they are concrete."""

    def __init__(self, key: jax.Array | int, *, tag: str):
        with jax.ensure_compile_time_eval():
            super().__init__(key, tag=tag)

    def __call__(self) -> jax.Array:
        with jax.ensure_compile_time_eval():
            blocks = _TRACED_STREAMS.get(id(self))
            if blocks is None:
                return super().__call__()  # streams forked from this one (``fork``) are of this type too
            i = int(self.count[...])
            self.count[...] += 1  # NNX refuses this from another trace level, as it refuses any draw there
            return blocks[i]

    def draw_in_blocks(self) -> None:
        """Computes this stream's keys a block at a time (for a traced key; the same keys)."""
        _TRACED_STREAMS[id(self)] = _KeyBlocks(self.key[...])
        weakref.finalize(self, _TRACED_STREAMS.pop, id(self), None)


def model_rngs(**seeds) -> nnx.Rngs:
    """``nnx.Rngs(**seeds)`` (e.g. ``params=0, dropout=1``) whose streams are :class:`EagerRngStream`: the same
    keys, drawn without growing the trace of the model's constructor. A seed is an int or an integer scalar, traced
    or not."""
    with jax.ensure_compile_time_eval():  # an int seed gives a concrete key even inside a trace
        keys = {tag: jax.random.key(seed) for tag, seed in seeds.items()}
    rngs = nnx.Rngs(**keys)
    for tag, key in keys.items():
        stream = EagerRngStream(key, tag=tag)
        if isinstance(key, jax.core.Tracer):
            stream.draw_in_blocks()
        setattr(rngs, tag, stream)
    return rngs


def seed_as_data(seed: int) -> np.uint32:
    """`seed` as the 32-bit value that ``jax.random.key(seed)`` keeps, to pass to a jitted init as an argument.

    ``jax.random.key`` of a Python int (32-bit JAX) keeps the seed modulo 2**32 (negative seeds wrap), and so does
    ``seed + 1`` in uint32, so the keys drawn from the value returned here equal those drawn from the int.
    """
    return np.uint32(int(seed) % 2**32)


def seeded_model_rngs(seed) -> nnx.Rngs:
    """The streams every model of the project is built with: ``params`` from `seed` and ``dropout`` from
    ``seed + 1``. `seed`: a Python int, or a traced scalar from :func:`seed_as_data` (the same keys)."""
    return model_rngs(params=seed, dropout=seed + 1)
