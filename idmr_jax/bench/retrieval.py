"""``retrieval``: query -> gallery top-k with AdaFocal's max-over-tokens similarity, against NumPy.

    python -m idmr_jax.bench retrieval [--sizes=1e3,1e4,1e5,1e6] [--queries=1000] [--k=50] [--tokens=32]
        [--dim=256] [--dtype=bfloat16] [--query-terms=2] [--chunk=1024] [--sub-chunk=0] [--query-chunk=0]
        [--numpy-max=1e5] [--numpy-ref-max=1e3] [--shard] [--reps=3] [--out=F.json]

Synthetic L2-normalised features: queries ``[Nq, dim]`` float32, gallery ``[N, tokens, dim]`` in ``--dtype``
(built on the device chunk by chunk into a donated buffer, so it never exists twice; 10^6 x 32 x 256 in bfloat16
is 16 GiB). The JAX side is `idmr_jax.evaluation.retrieval.topk_retrieval` (chunked running top-k; ``--shard``
splits the gallery over every device; a bf16 gallery is multiplied in bf16 against a query split into
``--query-terms`` bf16 parts, with float32 accumulation). Per size: time (median and spread of ``--reps`` runs after a warm-up of
one run; sizes above ``--large`` run ``--large-reps`` times without one) and the process's peak resident memory
(CPU; the allocator's peak on accelerators).

NumPy baselines on the same features (upcast to float32 on the host, which needs 4 bytes per value):
``numpy_blas`` (blocked BLAS products, dense ``[Nq, N]`` scores, argpartition: the straightforward fast NumPy
code) up to ``--numpy-max`` items, and ``numpy_reference`` (`topk_numpy`: the definition as one einsum, NumPy's
own single-threaded loops, full argsort) up to ``--numpy-ref-max``. ``agree`` is the fraction of top-k indices
equal to the NumPy result.
"""

from __future__ import annotations

import argparse
import functools
import gc
import time

import numpy as np

from idmr_jax.bench import common


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="1e3,1e4,1e5,1e6", help="gallery sizes")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16", help="gallery storage dtype (scores are float32)")
    p.add_argument("--query-terms", type=int, default=2,
                   help="bf16 parts of the query for a bf16 gallery (2: float32-query accuracy; 1: faster)")
    p.add_argument("--chunk", type=int, default=1024, help="gallery items per top-k merge (per device)")
    p.add_argument("--sub-chunk", type=int, default=0, help="gallery items per matrix product (0: 4096 // tokens)")
    p.add_argument("--query-chunk", type=int, default=0,
                   help="queries per block (0: all at once; blocks re-read the gallery, ~35%% slower on CPU)")
    p.add_argument("--numpy-max", type=float, default=1e5, help="largest size for the BLAS NumPy baseline")
    p.add_argument("--numpy-ref-max", type=float, default=1e3, help="largest size for the einsum reference")
    p.add_argument("--shard", action="store_true", help="shard the gallery over all devices")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--large", type=float, default=1e5,
                   help="sizes above this run --large-reps times without a warm-up run (compilation takes ~1 s, "
                   "under 1%% of such a run, and is included)")
    p.add_argument("--large-reps", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)


def make_gallery(n: int, tokens: int, dim: int, dtype, *, seed: int = 0, sharding=None, block: int = 4096):
    """``[n, tokens, dim]`` random unit-norm token features built on the device block by block (donated buffer)."""
    import jax
    import jax.numpy as jnp

    gallery = jax.jit(lambda: jnp.zeros((n, tokens, dim), dtype), out_shardings=sharding)()

    @functools.partial(jax.jit, donate_argnums=0, static_argnums=3, out_shardings=sharding)
    def fill(g, start, key, size):
        x = jax.random.uniform(key, (size, tokens, dim), jnp.float32, -1.0, 1.0)
        x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
        return jax.lax.dynamic_update_slice_in_dim(g, x.astype(dtype), start, axis=0)

    key = jax.random.key(seed)
    for start in range(0, n, block):
        size = min(block, n - start)
        gallery = fill(gallery, jnp.int32(start), jax.random.fold_in(key, start), size)
    return jax.block_until_ready(gallery)


def _queries(nq: int, dim: int, seed: int) -> np.ndarray:
    q = np.random.default_rng(seed + 1).standard_normal((nq, dim)).astype(np.float32)
    return q / np.linalg.norm(q, axis=-1, keepdims=True)


def _host_float32(gallery, block: int = 16384) -> np.ndarray:
    out = np.empty(gallery.shape, np.float32)
    for s in range(0, gallery.shape[0], block):
        out[s : s + block] = np.asarray(gallery[s : s + block]).astype(np.float32)
    return out


def _peak(fn):
    """(result, peak resident bytes while `fn` ran) on CPU; on accelerators the allocator's peak so far."""
    gc.collect()
    common.reset_host_peak()
    result = fn()
    mem = common.host_memory()
    dev = common.device_peak_bytes()
    return result, (dev if dev is not None else mem.get("peak_rss_bytes"))


def run(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from idmr_jax.evaluation.retrieval import topk_retrieval
    from idmr_jax.sharding import make_mesh

    mesh = make_mesh({"data": -1, "fsdp": 1, "model": 1}) if args.shard else None
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp", "model"))) if mesh is not None else None
    dtype = jnp.dtype(args.dtype)
    nq, k = args.queries, args.k
    qc = args.query_chunk if 0 < args.query_chunk < nq else nq
    query = _queries(nq, args.dim, args.seed)
    result = {"suite": "retrieval", "machine": common.machine_info(),
              "setup": {"queries": nq, "k": k, "tokens": args.tokens, "dim": args.dim, "dtype": args.dtype,
                        "query_terms": args.query_terms, "chunk": args.chunk, "sub_chunk": args.sub_chunk or None,
                        "query_chunk": qc, "sharded_over": mesh.size if mesh else 1},
              "process_rss_bytes_at_start": common.host_memory().get("rss_bytes"), "sizes": []}

    for n in common.parse_ints(args.sizes):
        if mesh is not None and n % mesh.size:
            n += mesh.size - n % mesh.size  # whole shards: the gallery is built directly in its sharded layout
        row = {"n": n, "gallery_bytes": n * args.tokens * args.dim * dtype.itemsize,
               "flops": 2 * nq * n * args.tokens * args.dim}
        t0 = time.perf_counter()
        gallery = make_gallery(n, args.tokens, args.dim, dtype, seed=args.seed, sharding=sharding)
        row["build_s"] = time.perf_counter() - t0
        search = functools.partial(topk_retrieval, k=min(k, n), chunk_size=args.chunk, query_chunk=qc, mesh=mesh,
                                   query_terms=args.query_terms, sub_chunk=args.sub_chunk or None)

        large = n > args.large
        row["reps_note"] = "no warm-up run (compilation included)" if large else "after one warm-up run"

        def timed():
            out = []
            times = common.time_calls(lambda: out.append(search(query, gallery)) or out[-1],
                                      warmup=0 if large else 1, reps=args.large_reps if large else args.reps,
                                      sync=jax.block_until_ready)
            return times, out[-1]

        (times, (jax_scores, jax_idx)), peak = _peak(timed)
        jax_idx = np.asarray(jax_idx)
        s = common.summarize(times)
        row["jax"] = {**s, "peak_memory_bytes": peak, "queries_per_s": nq / s["median_s"],
                      "flops_per_s": row["flops"] / s["median_s"]}

        baselines = [(name, blas) for name, limit, blas in
                     (("numpy_blas", args.numpy_max, True), ("numpy_reference", args.numpy_ref_max, False))
                     if n <= limit]
        host = _host_float32(gallery) if baselines else None
        del gallery, jax_scores  # NumPy's memory alone: the device copy is not needed any more
        gc.collect()
        for name, blas in baselines:
            (t_np, (_, np_idx)), peak = _peak(lambda: _time_numpy(query, host, min(k, n), blas))
            row[name] = {"seconds": t_np, "peak_memory_bytes": peak, "agree": float((np_idx == jax_idx).mean()),
                         "jax_speedup": t_np / s["median_s"]}
        del host
        gc.collect()
        result["sizes"].append(row)
    return result


def _time_numpy(query, gallery, k, blas):
    from idmr_jax.evaluation.retrieval import topk_numpy

    t0 = time.perf_counter()
    out = topk_numpy(query, gallery, k, blas=blas)
    return time.perf_counter() - t0, out
