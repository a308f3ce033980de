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

Fields of its own: ``rerank.k`` (the top K reranked at inference, and the largest training list; default 5),
``rerank.min_k`` (the smallest training list, 2), ``rerank.fusion_weight`` (weight of the normalised retrieval
score in fused reranking), ``rerank.list_max_len`` (listwise prompt length; pointwise prompts use
``data.max_len``), ``rerank.images`` (False: text-only training data, no image slots), ``rerank.prompt_set`` (a
prompt-set JSON; "" = idmr_jax/tasks/rerank/prompt_sets/default.json), ``loss.pointwise_weight`` /
``loss.listwise_weight``. Every other field is configs/idmr.py's.
"""

import ml_collections

from idmr_jax.config_args import parse_config_args, sibling_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_args(arg, {"tiny", "fsdp"})
    tiny = "tiny" in args
    idmr = sibling_config(__file__, "idmr.py")
    c = idmr.get_config(",".join(["lamra"] + [k if k != "fsdp" else f"fsdp={args[k]}" for k in ("tiny", "fsdp")
                                              if k in args]))
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
    c.loss.pointwise_weight = 1.0
    c.loss.listwise_weight = 1.0
    c.loss.gradcache_chunk = 0  # no contrastive batch: nothing for GradCache to cache
    c.eval.at_end = False  # measured on the retriever's top K by the pipeline's rerank stage

    if tiny:
        m.init.format = "random"
        m.lora.rank, m.lora.alpha, m.lora.dropout = 4, 8.0, 0.0  # the reranker's LoRA on the tiny random LM
        idmr.bert_prompts(c, idmr.BERT_VOCAB + 1)  # real text (and "Yes" / "No" / digits) through the BERT vocab
        d.max_len, r.list_max_len = 64, 128
        d.batch_size = 8
        r.images = False
    return c
