r"""M-BEIR (UniIR's 16 test sets) with the MLLM embedder of the universal task.

Convert the release first (``python -m data_prep.mbeir --root /data/M-BEIR --split test --out /data/ar/mbeir-test``,
``--pool global`` for the union pool), then:

  python -m idmr_jax.main --config=configs/mbeir.py --workdir=/tmp/mbeir --config.data.val_dir=/data/ar/mbeir-test \
      --config.model.init.format=hf_llava --config.model.init.path=/ckpt/llava --config.data.tokenizer=/ckpt/llava \
      [--config.eval.pool=local|global]

Writes ``WORKDIR/eval/mbeir/metrics.json`` (``mbeir/<key>/R@K``, ``mbeir/avg/headline``) and ``rankings.jsonl``.

The argument after ':' is a comma-separated list of keywords:

  tiny                  a tiny random embedder (tests, smoke runs; init.format=random) reading real text through the
                        bundled BERT WordPiece vocab

Every other field is configs/idmr.py's; ``data.prompt_set`` names a prompt-set JSON (idmr_jax/tasks/universal/
prompt_sets/default.json when empty).
"""

import importlib.util
import os

import ml_collections

from idmr_jax.config_args import parse_config_args

BERT_VOCAB = 30522  # the bundled all-MiniLM-L6-v2 WordPiece vocab (configs/idmr.py)


def _idmr_config(arg: str) -> ml_collections.ConfigDict:
    # Loaded by path: ml_collections loads this file by path too, so configs/ need not be importable.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "idmr.py")
    spec = importlib.util.spec_from_file_location("_mbeir_idmr", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_args(arg, {"tiny"})
    tiny = "tiny" in args
    c = _idmr_config("tiny" if tiny else "")
    c.task = "universal"
    c.mode = "eval"
    c.data.source = "arrayrecord"
    c.data.val_dir = ""
    c.data.prompt_set = ""
    c.eval.benchmark = "mbeir"
    c.eval.pool = "local"  # local | global (convert with --pool global for the union pool)
    if tiny:
        c.model.init.format = "random"
        c.data.tokenizer, c.data.bos_id, c.data.eos_id, c.data.pad_id = "", 101, 102, 0
        c.model.text.vocab_size = BERT_VOCAB + 1
        c.model.image_token_id = BERT_VOCAB
        c.data.max_len = 96
    return c
