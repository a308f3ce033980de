"""Jitted model programs over fixed-size, batch-sharded blocks: the encoder under every task's evaluation.

One compiled program per encoder function whatever the data size: inputs are cut into blocks of `batch_size`
rows, the last block is padded (with copies of its last row), and padding rows are cut from the outputs, so they
never reach the results. With a mesh, each block is sharded over its ``batch`` axes (the batch size is rounded up
to a multiple of the mesh size) and outputs come back replicated, so every process can read all of them.

Multi-process: every process runs the same loop over the same (global) data; each process hands over the rows of
its own devices, and every process ends with the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from idmr_jax import sharding as shd

Block = dict[str, np.ndarray]


class BlockEncoder:
    """A model's state plus jitted programs over padded, batch-sharded blocks of `batch_size` rows.

    `program` turns ``fn(model, **arrays)`` into a compiled program; `run` applies one to a block of at most
    `batch_size` rows, `run_rows` to any number of rows, built block by block.
    """

    def __init__(self, model: nnx.Module, batch_size: int, mesh=None, rules=shd.DEFAULT_RULES):
        self.graphdef, self.state = nnx.split(model)
        n = mesh.size if mesh is not None else 1
        self.batch_size = max(n, -(-batch_size // n) * n)
        spec = shd.logical_to_pspec(("batch",), rules)
        self._sharding = (lambda nd: NamedSharding(mesh, PartitionSpec(*spec, *([None] * (nd - 1))))) \
            if mesh is not None else (lambda nd: None)
        # Replicated outputs: every process can read them (a batch-sharded result would be split across hosts).
        self._out = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None

    @classmethod
    def from_config(cls, model: nnx.Module, config) -> BlockEncoder:
        """An encoder with ``config.eval.batch_size`` rows per block on the mesh of ``config.sharding``."""
        return cls(model, int(config.eval.batch_size), shd.mesh_from_config(config), shd.rules_from_config(config))

    def program(self, fn: Callable) -> Callable:
        """``jit(fn(model, **arrays))`` over the encoder's state, replicated outputs; call it through `run`."""

        def run(state, **arrays):
            return fn(nnx.merge(self.graphdef, state), **arrays)

        return jax.jit(run, out_shardings=self._out)

    def pad(self, arrays: Block) -> tuple[int, dict]:
        """(valid rows, the block padded to batch_size rows and placed on the mesh) for <= batch_size rows."""
        valid = len(next(iter(arrays.values())))
        out = {}
        for k, v in arrays.items():
            v = np.asarray(v)
            if valid < self.batch_size:
                v = np.concatenate([v, np.repeat(v[-1:], self.batch_size - valid, axis=0)])
            sh = self._sharding(v.ndim)
            # Every process holds the whole block: each hands over the rows of its own devices.
            out[k] = jax.make_array_from_callback(v.shape, sh, lambda idx, v=v: v[idx]) if sh is not None else v
        return valid, out

    def run(self, program: Callable, arrays: Block):
        """`program`'s outputs (numpy, same tree) for one block of <= batch_size rows; padding rows cut off."""
        valid, placed = self.pad(arrays)
        return jax.tree.map(lambda x: np.asarray(x)[:valid], program(self.state, **placed))

    def row_blocks(self, n: int) -> Iterator[range]:
        """The row ranges of `n` rows in blocks of batch_size."""
        for start in range(0, n, self.batch_size):
            yield range(start, min(n, start + self.batch_size))

    def run_rows(self, program: Callable, n: int, make_block: Callable[[range], Block]):
        """`program` over `n` rows, each block built by ``make_block(rows)`` (so inputs are prepared, e.g. images
        decoded, one block at a time); outputs concatenated over the blocks."""
        outs = [self.run(program, make_block(rows)) for rows in self.row_blocks(n)]
        return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)

    def run_arrays(self, program: Callable, arrays: Block):
        """`program` over arrays of any number of rows (`run_rows` over their slices)."""
        n = len(next(iter(arrays.values())))
        return self.run_rows(program, n, lambda rows: {k: v[rows.start:rows.stop] for k, v in arrays.items()})
