"""``python -m idmr_jax.mine``: MM-Embed's modality-aware hard-negative mining of training pairs with a trained
embedder and a search index of a candidate pool (the rule, the output and the skips:
`idmr_jax.tasks.universal.mining`).

    python -m idmr_jax.mine --workdir W --train SHARDS --index INDEX --out DIR [--k 50] [--num-above 2]
        [--num-near 2] [--window 10] [--negatives replace|append] [--candidates DIR] [--batch-size N]
        [--strict] [--overwrite] [--compilation-cache-dir DIR]

``--workdir`` is the training workdir (or one step directory) whose model built ``--index`` (``python -m
idmr_jax.search index --model W``); the tool refuses an index another model embedded, whose scores would not be
comparable. Every pair's query of ``SHARDS/train-*.array_record`` is embedded with the query prompts (its
instruction fixed per query, as the evaluation fixes it), block by block, sharded over the config's mesh; then its
top k is searched and its negatives are chosen. ``--candidates`` names the candidate shards when they moved since
indexing. Exit status 2 on bad input (any skipped pair under ``--strict``, a foreign index, shards that changed).
Multi-host: every process embeds (the mesh spans them), process 0 alone mines and writes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import jax
import numpy as np

from idmr_jax import runtime
from idmr_jax.data.grain_io import RecordReader, list_shards
from idmr_jax.data.shards import ConversionError
from idmr_jax.search import build, store
from idmr_jax.tasks.universal import mbeir, mining, records


def pair_query_texts(pairs: Sequence[records.TrainingPair]) -> list[str]:
    """The text each pair's query prompt holds: one instruction of its set, fixed per query id, joined to its text
    as the M-BEIR evaluation joins them (`idmr_jax.tasks.universal.evaluate.query_texts`)."""
    return [mbeir.instructed_text(mbeir.choose_instruction(p.query.id, p.instruction_set), p.query.text)
            for p in pairs]


def embed_pair_queries(embedder: build.Embedder, train_dir: str) -> np.ndarray:
    """[N, D] float32 embeddings of the queries of ``train_dir/train-*`` (row = the pair's global key), the pairs
    read again block by block, so at most one block of images is held."""
    reader = RecordReader(list_shards(train_dir, mining.TRAIN_GLOB))

    def pairs_at(keys: list[int]) -> list[records.TrainingPair]:
        out = []
        for key in keys:
            try:
                out.append(records.decode_pair(reader.raw(key)))
            except records.RecordError as e:
                raise ConversionError(f"{train_dir}/{mining.TRAIN_GLOB}: record {key} (global key): {e}") from e
        return out

    with_image = [p.query.image is not None for k in range(len(reader)) for p in pairs_at([k])]

    def fetch(keys: list[int]) -> tuple[list[records.Side], list[str]]:
        block = pairs_at(keys)
        return [p.query for p in block], pair_query_texts(block)

    with embedder.on_mesh():
        return embedder.encoder.embed_fetched("query", with_image, fetch)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 on bad input)."""
    d = mining.MiningRule()
    p = argparse.ArgumentParser(prog="python -m idmr_jax.mine", description="Mine hard negatives for training pairs "
                                "from a trained embedder's own top k (MM-Embed's modality-aware rule) and write the "
                                "pairs again with them.")
    p.add_argument("--workdir", required=True, help="training workdir (or step directory) of the model that built "
                   "--index")
    p.add_argument("--train", required=True, help="folder of training pairs (train-*.array_record)")
    p.add_argument("--index", required=True, help="search index of the candidate pool (python -m idmr_jax.search "
                   "index)")
    p.add_argument("--out", required=True, help="output folder (train-*.array_record, mined.jsonl, manifest.json)")
    p.add_argument("--k", type=int, default=d.k, help="candidates searched per query (default %(default)s)")
    p.add_argument("--num-above", type=int, default=d.num_above, help="negatives ranked above the positive, at "
                   "most (default %(default)s)")
    p.add_argument("--num-near", type=int, default=d.num_near, help="near misses below the positive, at most "
                   "(default %(default)s)")
    p.add_argument("--window", type=int, default=d.window, help="ranks below the positive that count as near "
                   "(default %(default)s)")
    p.add_argument("--negatives", choices=mining.MODES, default=d.negatives, help="replace the pairs' own "
                   "negatives, or append them after the mined ones (default %(default)s)")
    p.add_argument("--candidates", default=None, help="folder of the index's candidate shards, when not the one "
                   "recorded in the index")
    p.add_argument("--batch-size", type=int, default=0, help="rows per encoder call (default: eval.batch_size)")
    p.add_argument("--strict", action="store_true", help="fail (exit 2) on any skipped pair")
    p.add_argument("--overwrite", action="store_true", help="replace a manifest.json in --out that this tool did "
                   "not write (default: refuse)")
    p.add_argument("--compilation-cache-dir", default=None, help="persistent XLA compilation cache (default "
                   "~/.cache/idmr_jax/xla, shared with python -m idmr_jax.search, whose index call compiled the "
                   "same query encoder; '' turns it off)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    runtime.enable_compilation_cache(a.compilation_cache_dir)
    try:
        rule = mining.MiningRule(k=a.k, num_above=a.num_above, num_near=a.num_near, window=a.window,
                                 negatives=a.negatives)
        index = store.open_index(a.index)
        embedder = build.load_embedder(a.workdir, batch_size=a.batch_size or None)
        build.check_same_model(embedder, index)
        queries = embed_pair_queries(embedder, a.train)
        if jax.process_index() != 0:
            return 0
        manifest = mining.mine_shards(a.train, index, queries, a.out, rule=rule, candidates=a.candidates,
                                      strict=a.strict, overwrite=a.overwrite, query_model=embedder.source)
    except (ConversionError, ValueError, FileNotFoundError) as e:  # bad input, named by the message
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = manifest["counts"]
    print(f"mined {c['mined_negatives']} negatives ({c['above']} above the positive, {c['near']} near) for "
          f"{c['pairs_with_mined']} of {c['pairs']} pairs; positive in the top {rule.k}: {c['positive_in_top_k']}; "
          f"{c['skipped']} skipped (manifest: {a.out}/{mining.MANIFEST})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
