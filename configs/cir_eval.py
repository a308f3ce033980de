r"""Zero-shot evaluation on the CIR benchmarks (CIRR, CIRCO, FashionIQ, GeneCIS) with their official protocols.

Convert a release first (``python -m data_prep.cir --benchmark cirr --root /data/CIRR --split val --out
/data/ar/cirr-val``), then, e.g. with the released AdaFocal checkpoint:

  python -m idmr_jax.main --config=configs/cir_eval.py:cirr --workdir=/tmp/cir \
      --config.data.val_dir=/data/ar/cirr-val \
      --config.model.init.format=lavis_adafocal --config.model.init.path=/ckpt/adafocal.pth

or a training workdir of ``python -m idmr_jax.main`` (``--config.model.init.format=workdir
--config.model.init.path=WORKDIR``). Outputs: ``WORKDIR/eval/<bench>/{metrics.json, rankings.jsonl}`` (and the
server's submission files for a test split).

The argument after ':' is the benchmark (cirr | circo | fashioniq | genecis | all) and comma-separated keywords:

  all                   every benchmark whose --config.cir.val_dirs.<bench> is set; one table, a row per model
  family=qformer|mllm   BLIP-2 / AdaFocal (configs/oacir.py's model) or the LLaVA embedder (configs/idmr.py's)
  blip2                 the Q-Former family without CAAM (beta = 0): plain BLIP-2, e.g. with hf_blip2 weights
  prompts=default|generic   the MLLM's query instructions (idmr_jax/tasks/cir/prompts.py)
  tiny                  a tiny random model of the family (tests, smoke runs; init.format=random)

Every other field is the family config's (``configs/oacir.py`` / ``configs/idmr.py``), e.g. ``eval.batch_size``,
``model.vision`` or ``data.tokenizer``; ``cir.model_name`` names the table's row.
"""

import ml_collections

from idmr_jax.config_args import parse_config_args, sibling_config

BENCHMARKS = ("cirr", "circo", "fashioniq", "genecis")
FAMILY_CONFIGS = {"qformer": "oacir.py", "mllm": "idmr.py"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    bench, _, rest = (arg or "").partition(",")
    if bench not in BENCHMARKS + ("all",):
        raise ValueError(f"configs/cir_eval.py:BENCH[,KEYWORDS]: BENCH must be one of {BENCHMARKS + ('all',)}, "
                         f"got {bench!r}")
    args = parse_config_args(rest, {"family", "blip2", "prompts", "tiny"})
    family = args.get("family", "qformer")
    if family not in FAMILY_CONFIGS:
        raise ValueError(f"family={family}: choose from {sorted(FAMILY_CONFIGS)}")
    tiny = "tiny" in args
    family_file = sibling_config(__file__, FAMILY_CONFIGS[family])
    c = family_file.get_config("tiny" if tiny else "")
    c.task = "cir"
    c.mode = "eval"
    c.data.source = "arrayrecord"
    c.data.val_dir = ""
    if "blip2" in args:
        if family != "qformer":
            raise ValueError("the blip2 keyword is for family=qformer")
        c.model.beta_mode = "none"
    if tiny:
        c.model.init.format = "random"
        if family == "mllm":
            # Real text through the bundled BERT WordPiece vocab (the tiny training config uses synthetic ids),
            # the image token appended after it, and room for the instructions (tiny image: 16 tokens).
            family_file.bert_prompts(c, family_file.BERT_VOCAB + 1)
            c.data.max_len = 96
    c.cir = ml_collections.ConfigDict(dict(
        family=family,
        benchmarks=list(BENCHMARKS) if bench == "all" else [bench],
        val_dirs=ml_collections.ConfigDict({b: "" for b in BENCHMARKS}),  # for `all`: converted shards per benchmark
        prompts=args.get("prompts", "default"),
        feature_cache="",  # candidate-feature cache folder; "" = WORKDIR/eval/<bench>/cache, "none" = off
        model_name="",  # the table's row name; "" = the weights' source
    ))
    return c
