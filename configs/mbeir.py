r"""M-BEIR (UniIR's 16 test sets) with the MLLM embedder of the universal task.

Convert the release first (``python -m data_prep.mbeir --root /data/M-BEIR --split test --out /data/ar/mbeir-test``,
``--pool global`` for the union pool), then:

  python -m idmr_jax.main --config=configs/mbeir.py --workdir=/tmp/mbeir --config.data.val_dir=/data/ar/mbeir-test \
      --config.model.init.format=hf_llava --config.model.init.path=/ckpt/llava --config.data.tokenizer=/ckpt/llava \
      [--config.eval.pool=local|global]

Writes ``WORKDIR/eval/mbeir/metrics.json`` (``mbeir/<key>/R@K``, ``mbeir/avg/headline``) and ``rankings.jsonl``.

Training on M-BEIR's train split (``keyword train``): convert it (``data_prep.mbeir --split train --pool global``), turn
the queries into training pairs (``python -m data_prep.mbeir_pairs --shards DIR --out PAIRS``), then

  python -m idmr_jax.main --config=configs/mbeir.py:train,lamra --workdir=W --config.data.train_dir=PAIRS \
      --config.data.val_dir=/data/ar/mbeir-val --config.model.init.path=/ckpt/llava --config.data.tokenizer=/ckpt/llava

Batches mix every modality; the images of each side are packed into per-device slots (``data.image_slots``), so
text-only rows never run the vision tower; ``data.num_hard_negatives`` > 0 carries each query's listed negatives.

The argument after ':' is a comma-separated list of keywords:

  train                 train on pairs (``data.format = "pairs"``), then evaluate on ``data.val_dir``
  lamra                 LamRA's loss settings (temperature 0.05, LoRA r=64 alpha 128; configs/idmr.py)
  tiny                  a tiny random embedder (tests, smoke runs; init.format=random) reading real text through the
                        bundled BERT WordPiece vocab

Every other field is configs/idmr.py's; ``data.prompt_set`` names a prompt-set JSON (idmr_jax/tasks/universal/
prompt_sets/default.json when empty).
"""

import ml_collections

from idmr_jax.config_args import parse_config_args, sibling_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_args(arg, {"tiny", "train", "lamra"})
    tiny = "tiny" in args
    idmr = sibling_config(__file__, "idmr.py")
    c = idmr.get_config(",".join(k for k in ("tiny", "lamra") if k in args))
    c.task = "universal"
    c.mode = "train" if "train" in args else "eval"
    c.data.source = "arrayrecord"
    c.data.format = "pairs"
    c.data.train_dir = ""
    c.data.val_dir = ""
    c.data.prompt_set = ""
    c.eval.benchmark = "mbeir"
    c.eval.pool = "local"  # local | global (convert with --pool global for the union pool)
    if tiny:
        c.model.init.format = "random"
        idmr.bert_prompts(c, idmr.BERT_VOCAB + 1)  # real text through the bundled BERT vocab
        c.data.max_len = 96
    return c
