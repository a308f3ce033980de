r"""LamRA's reranker (task ``rerank``, idmr_jax/tasks/rerank): the embedder's MLLM with its own LoRA, trained jointly
on pointwise ("Yes" / "No") and listwise (the positive's number among K = 2..5 shuffled candidates) prompts built
from training pairs with negatives (``python -m idmr_jax.mine``, or any converted pairs):

  python -m idmr_jax.main --config=configs/rerank.py --workdir=W --config.data.train_dir=MINED_PAIRS \
      --config.model.init.path=EMBEDDER_WORKDIR --config.data.tokenizer=/ckpt/llava

The model starts from the embedder's workdir (``model.init.format = "workdir"``; its LoRA, if any, is merged into
the base first); the reranker's LoRA (LamRA's r=64, alpha 128; configs/idmr.py:lamra) trains, all else is frozen.

The argument after ':' is a comma-separated list of keywords:

  tiny                  a tiny random LM (tests, smoke runs; init.format=random) reading real text through the
                        bundled BERT WordPiece vocab
  fsdp=N                as in configs/idmr.py
  backbone=NAME         as in configs/idmr.py: qwen2vl (LamRA's Qwen2-VL) or internvl; llava by default
  demo                  the retrieve-mine-rerank loop on the laptop demo (`idmr_jax/tasks/rerank/loop.py`):
                        train an embedder on the demo's CIR pairs (reference image + modification text -> target
                        image), index the pairs' candidates, mine negatives from its own top k, train it further on
                        them (and, as a control, as long on random negatives; ``loop.control = []`` skips it), train
                        the reranker from it, rerank its top 5 on the demo's val split. One command:

      python -m idmr_jax.main --config=configs/rerank.py:demo --workdir=W

                        ``--config.loop.embedder_workdir=W0`` reuses a trained embedder instead of the first step.
                        With ``tiny``: the same loop with the tiny random model on the tiny demo data (tests).

Fields of its own: ``rerank.k`` (the top K reranked at inference, and the largest training list; default 5),
``rerank.min_k`` (the smallest training list, 2), ``rerank.retriever`` (whose top K the evaluation reranks; "" =
the embedder it starts from), ``rerank.fusion_weight`` (weight of the normalised retrieval
score in fused reranking), ``rerank.list_max_len`` (listwise prompt length; pointwise prompts use
``data.max_len``), ``rerank.images`` (False: text-only training data, no image slots), ``rerank.prompt_set`` (a
prompt-set JSON; "" = idmr_jax/tasks/rerank/prompt_sets/default.json), ``loss.pointwise_weight`` /
``loss.listwise_weight``. Every other field is configs/idmr.py's.
"""

import ml_collections

from idmr_jax.config_args import parse_config_args, sibling_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_args(arg, {"tiny", "fsdp", "demo", "backbone"})
    if "demo" in args:
        return demo_loop_config(sibling_config(__file__, "idmr.py"), tiny="tiny" in args)
    tiny = "tiny" in args
    idmr = sibling_config(__file__, "idmr.py")
    c = idmr.get_config(",".join(["lamra"] + [k if k == "tiny" else f"{k}={args[k]}" for k in ("tiny", "fsdp",
                                                                                             "backbone") if k in args]))
    c.task = "rerank"
    c.mode = "train"
    d = c.data
    d.source = "arrayrecord"
    d.format = "pairs"
    d.train_dir, d.val_dir = "", ""
    d.num_hard_negatives = 0  # unused: the reranker draws its own negatives (rerank.k - 1 per pair)
    m = c.model
    m.init.format, m.init.path = "workdir", ""  # the embedder's training workdir
    m.freeze_vision, m.train_projector = True, False

    r = c.rerank = ml_collections.ConfigDict()
    r.k = 5  # LamRA: the top 5 reranked; training lists of 2..5
    r.min_k = 2
    r.fusion_weight = 0.5
    # LLaVA at 336 px: 576 tokens an image; a pointwise prompt shows 2 images, a listwise one up to k + 1 = 6.
    d.max_len = 1536
    r.list_max_len = 4096
    r.images = True
    r.prompt_set = ""
    r.retriever = ""  # the embedder workdir whose top K the evaluation reranks ("" = model.init.path)
    c.loss.pointwise_weight = 1.0
    c.loss.listwise_weight = 1.0
    c.loss.gradcache_chunk = 0  # no contrastive batch: nothing for GradCache to cache
    # Its evaluation reranks a retriever's top K on the demo's CIR val split (eval.benchmark = demo_cir and
    # data.val_dir); configs/rerank.py:demo turns it on. Other data: rerank from Python for now.
    c.eval.at_end = False

    if tiny:
        m.init.format = "random"
        m.lora.rank, m.lora.alpha, m.lora.dropout = 4, 8.0, 0.0  # the reranker's LoRA on the tiny random LM
        idmr.bert_prompts(c, idmr.BERT_VOCAB + 1)  # real text (and "Yes" / "No" / digits) through the BERT vocab
        d.max_len, r.list_max_len = 64, 128
        d.batch_size = 8
        r.images = False
    return c


def demo_loop_config(idmr, *, tiny: bool = False) -> ml_collections.ConfigDict:
    """``demo``: configs/idmr.py's laptop-demo model (small random Qwen2-style LM, packaged EfficientNet-Lite0,
    49 image tokens) and the loop's three trainings as overrides (`idmr_jax.tasks.rerank.loop`). ``tiny``: its
    tiny random model (a 56 px CLIP-style ViT: 16 image tokens) on the tiny demo data."""
    c = idmr.get_config("tiny" if tiny else "demo")
    c.task = "universal"
    d = c.data
    d.source = "demo"
    d.format, d.prompt_set = "pairs", ""
    d.demo_stage = "cir_pairs"
    d.max_len, d.candidate_max_len = 96, 72  # an image candidate: 49 image tokens and its prompt
    c.eval.benchmark = "demo_cir"
    c.train.num_steps = 60
    r = c.rerank = ml_collections.ConfigDict()
    r.k, r.min_k, r.fusion_weight = 5, 2, 0.5
    r.list_max_len = 448  # the query and 5 candidates: 6 x 49 image tokens and the listwise text
    point_len = 192
    if tiny:
        idmr.bert_prompts(c, idmr.BERT_VOCAB + 1)  # real text through the bundled BERT vocab
        c.model.init.format = "random"
        d.demo_size, d.max_len, d.candidate_max_len = "tiny", 64, 40
        r.list_max_len, point_len = 176, 96
    r.images, r.prompt_set, r.retriever = True, "", ""
    c.loss.pointwise_weight = c.loss.listwise_weight = 1.0
    loop = c.loop = ml_collections.ConfigDict()
    loop.embedder_workdir = ""
    loop.mining = ml_collections.ConfigDict(dict(k=50, num_above=2, num_near=2, window=10, negatives="replace"))
    # In-batch negatives only; then the same model trained further with two mined negatives per query.
    loop.retrieval = [("data.num_hard_negatives", 0)]
    loop.mined = [("data.source", "arrayrecord"), ("data.num_hard_negatives", 2),
                  ("model.init.format", "workdir")]
    # The control: the same 60 further steps with two random negatives per query instead of mined ones.
    loop.control = list(loop.mined)
    # LamRA's reranker: its own LoRA on the LM (a random LM moves under LoRA only with a large alpha / r and a
    # large learning rate), the rest frozen; pointwise prompts show 2 images, listwise ones up to 6.
    loop.reranker = [("task", "rerank"), ("data.source", "arrayrecord"), ("data.num_hard_negatives", 0),
                     ("model.init.format", "workdir"), ("model.lora.rank", 16), ("model.lora.alpha", 64.0),
                     ("model.lora.dropout", 0.0), ("model.train_projector", False), ("loss.gradcache_chunk", 0),
                     ("data.max_len", point_len), ("data.batch_size", 8), ("optim.groups", [("all", r".*", 1e-3)])]
    return c
