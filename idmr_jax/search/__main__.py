r"""``python -m idmr_jax.search SUBCOMMAND``: index a candidate pool with a trained embedder, and search it.

    python -m idmr_jax.search index --model W --data SHARDS --out INDEX [--block-rows 1024] [--batch-size N]
    python -m idmr_jax.search index --config configs/mbeir.py --config.model.init.format=hf_llava \
        --config.model.init.path=/ckpt/llava --config.data.tokenizer=/ckpt/llava --data SHARDS --out INDEX
    python -m idmr_jax.search query --index INDEX [--model W] (--queries SHARDS | --text "..." [--image FILE]
        [--instruction "..."]) [--k 10] [--out FILE.jsonl]

``--model`` is a training workdir of the universal / idmr task (its latest checkpoint, or a step directory
``W/checkpoints/<step>``); ``--config FILE[:ARGS]`` with ``--config.FIELD=VALUE`` overrides (as for
``python -m idmr_jax.main``) builds an imported model from ``config.model.init`` instead. ``query`` without
either loads the workdir checkpoint recorded in the index. Rerunning an interrupted ``index`` resumes it. Both keep
compiled programs in the persistent compilation cache of ``idmr_jax.main`` (``--compilation-cache-dir``), so the
next ``query`` reads its encoder's programs (those that took over a second to compile) instead of compiling them.
``query`` prints (and with ``--out`` writes) one JSON line per query: ``{"query_id", "results": [{"did",
"score", "modality"}, ...]}``, best first.

Subcommands are registered in `SUBCOMMANDS` (name -> (add_args, run)): a new source of candidates or queries is a
new entry, or a new kind in `idmr_jax.search.build.CANDIDATE_SOURCES` (``index --source KIND``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

CONFIG_PREFIX = "--config."


def _model_args(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("model (one of)")
    g.add_argument("--model", default="", help="a training workdir of the universal task, or one of its "
                   "checkpoint step directories" + ("" if required else " (default: the index's checkpoint)"))
    g.add_argument("--config", default="", help="FILE[:ARGS] of an imported model, with --config.FIELD=VALUE "
                   "overrides, e.g. --config.model.init.format=hf_llava --config.model.init.path=DIR")
    p.add_argument("--batch-size", type=int, default=0, help="rows per encoder call (default: eval.batch_size)")


def _parse_config(spec: str, overrides: list[str]):
    """``FILE[:ARGS]`` with ``--config.FIELD=VALUE`` overrides, parsed as ``python -m idmr_jax.main`` does."""
    from absl import flags
    from ml_collections import config_flags

    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=values)
    values(["search", f"--config={spec}", *overrides])
    return values.config


def load_model(args: argparse.Namespace, overrides: list[str], index_meta: dict | None = None):
    """The embedder named by ``--model`` or ``--config`` (or, for a query, the index's own checkpoint)."""
    from idmr_jax.search import build

    if args.model and args.config:
        raise SystemExit("give --model (a training workdir) or --config (an imported model), not both")
    if overrides and not args.config:
        raise SystemExit(f"{overrides[0]}: --config.FIELD overrides need --config FILE")
    if args.config:
        return build.load_imported(_parse_config(args.config, overrides), batch_size=args.batch_size or None)
    model = args.model
    if not model and index_meta is not None:
        recorded = index_meta.get("model", {})
        if recorded.get("kind") != "workdir":
            raise SystemExit(f"the index was embedded by {recorded}: give --config with that model")
        model = recorded["checkpoint"]
    if not model:
        raise SystemExit("give --model W (a training workdir) or --config FILE (an imported model)")
    return build.load_embedder(model, batch_size=args.batch_size or None)


def add_index_args(p: argparse.ArgumentParser) -> None:
    _model_args(p, required=True)
    p.add_argument("--data", required=True, help="the candidates: a folder of candidates-*.array_record shards")
    p.add_argument("--source", default="shards", help="what --data is (idmr_jax.search.build.CANDIDATE_SOURCES)")
    p.add_argument("--out", required=True, help="the index folder (created; an interrupted one is resumed)")
    p.add_argument("--block-rows", type=int, default=1024, help="candidates per written block (default 1024)")


def run_index(args: argparse.Namespace, overrides: list[str]) -> int:
    from idmr_jax.search import build, store

    source = build.open_source(args.source, args.data)  # read first: a bad pool fails before the model loads
    embedder = load_model(args, overrides)
    meta = build.build_index(embedder, source, args.out, block_rows=args.block_rows)
    print(f"index {args.out}: {meta['num_candidates']} candidates x {meta['dim']} ({meta['dtype']}), "
          f"{len(meta['blocks_done'])}/{store.num_blocks(meta)} blocks")
    return 0


def add_query_args(p: argparse.ArgumentParser) -> None:
    _model_args(p, required=False)
    p.add_argument("--index", required=True, help="an index folder written by `index`")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--queries", help="a folder of queries-*.array_record shards")
    what.add_argument("--text", help="one query's text")
    what.add_argument("--image-only", action="store_true", help="one query of --image alone")
    p.add_argument("--image", default="", help="with --text / --image-only: the query's image file")
    p.add_argument("--instruction", default="", help="with --text / --image-only: the task instruction")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--out", default="", help="also write the results here (JSON lines)")


def _single_query(args: argparse.Namespace):
    from idmr_jax.data.image_files import ImageFileRefused, read_image_file
    from idmr_jax.search import build

    image = None
    if args.image:
        path = os.path.abspath(args.image)
        try:
            image, _ = read_image_file(path, os.path.dirname(os.path.realpath(path)))
        except (OSError, ImageFileRefused) as e:
            raise SystemExit(f"--image {args.image}: {e}") from e
    if args.image_only and image is None:
        raise SystemExit("--image-only needs --image FILE")
    return build.text_query(args.text, image, args.instruction or None)


def run_query(args: argparse.Namespace, overrides: list[str]) -> int:
    import jax

    from idmr_jax.search import build, store

    index = store.open_index(args.index)
    queries = build.read_query_shards(args.queries) if args.queries else [_single_query(args)]
    embedder = load_model(args, overrides, index.meta)
    results = build.query_index(embedder, index, queries, k=args.k)
    if jax.process_index() != 0:
        return 0
    lines = [json.dumps(r) for r in results]
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
    print("\n".join(lines))
    return 0


# name -> (add its arguments, run it with (args, --config.FIELD overrides) -> exit code)
SUBCOMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None],
                             Callable[[argparse.Namespace, list[str]], int]]] = {
    "index": (add_index_args, run_index),
    "query": (add_query_args, run_query),
}


def main(argv: list[str] | None = None) -> int:
    """Parses `argv` (default: sys.argv[1:]) and runs the subcommand."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # --config.FIELD=VALUE overrides go to the config parser, the rest to argparse.
    overrides = [a for a in argv if a.startswith(CONFIG_PREFIX)]
    parser = argparse.ArgumentParser(prog="python -m idmr_jax.search", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, _) in SUBCOMMANDS.items():
        p = sub.add_parser(name)
        add_args(p)
        p.add_argument("--compilation-cache-dir", default=None,
                       help="persistent XLA compilation cache, so that the next call does not compile the encoder "
                       "again (default ~/.cache/idmr_jax/xla; '' turns it off), as for python -m idmr_jax.main")
    args = parser.parse_args([a for a in argv if not a.startswith(CONFIG_PREFIX)])
    from idmr_jax import runtime

    runtime.enable_compilation_cache(args.compilation_cache_dir)
    runtime.initialize()  # multi-host: joins the other processes when the environment says so
    try:
        return SUBCOMMANDS[args.command][1](args, overrides)
    except (ValueError, FileNotFoundError) as e:  # bad input: the message names the file or field, no traceback
        print(f"python -m idmr_jax.search {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
