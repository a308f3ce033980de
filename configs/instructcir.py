r"""InstructCIR's two-stage recipe on the universal task (REFERENCE.md section 4): an MLLM embedder for zero-shot
composed image retrieval, trained on captions, then on instructions.

  Stage 1: symmetric InfoNCE on image-caption pairs (image -> caption and caption -> image), the captions encoded
           by the same LM; everything the recipe trains is trainable (LM, projector, vision tower).
  Stage 2: from stage 1's checkpoint, triplets (image + instruction -> modified caption) with the original caption
           as each query's hard negative, prompt templates drawn at random per example
           (idmr_jax/tasks/universal/prompt_sets/instructcir.json), LoRA r=64, alpha=16 on the LM (the paper's
           appendix table; keyword ``full`` tunes the LM in full instead), vision tower and projector frozen.

Data: ``python -m data_prep.instructcir --format {captions,coco,triplets} --src FILE --images DIR --out DIR``.
Both stages in one command (WORKDIR/stage1, WORKDIR/stage2, merged WORKDIR/metrics.json):

  python -m idmr_jax.main --config=configs/instructcir.py --workdir=W \
      --config.data.caption_dir=/data/ar/coco-captions --config.data.triplet_dir=/data/ar/instructcir-triplets \
      --config.model.init.path=/ckpt/llava --config.data.tokenizer=/ckpt/llava

Evaluate the result on CIRR / CIRCO / FashionIQ / GeneCIS with configs/cir_eval.py (family=mllm,
init.format=workdir, init.path=W/stage2).

The argument after ':' is a comma-separated list of keywords:

  stage=1|2             one stage alone (stage 2 then needs --config.model.init.path=STAGE1_WORKDIR)
  full                  stage 2 tunes the LM in full (no LoRA)
  demo                  the laptop demo: both stages on the packaged photos (captions and instructions from
                        templates), zero-shot CIR on the demo benchmark after each stage; vision tower frozen;
                        stage 2 tunes in full (its LM is a small random model that LoRA at alpha / r = 1/4 barely
                        moves in 60 steps: R@5 14.9 against 33.6 in full, README)
  lora                  with demo: stage 2 with the recipe's LoRA after all
  tiny                  a tiny random embedder (tests)
  fsdp=N                as in configs/idmr.py
  backbone=NAME         as in configs/idmr.py: internvl or qwen2vl; llava by default

e.g. ``configs/instructcir.py:demo``.
"""

import ml_collections

from idmr_jax.config_args import parse_config_args, sibling_config
from idmr_jax.train.stages import PREVIOUS_STAGE, apply_overrides


def stage_overrides(stage: int, *, full: bool, demo: bool, vision_trains: bool,
                    init_format: str = "hf_llava") -> list[tuple[str, object]]:
    """The fields that make a config stage 1 or stage 2 of the recipe, as (dotted field, value); stage 1 starts
    from a transformers checkpoint of `init_format` (the backbone's), or, in the demo, from scratch."""
    if stage == 1:
        return [("loss.direction", "symmetric"), ("data.num_hard_negatives", 0), ("model.lora.rank", 0),
                ("model.freeze_vision", not vision_trains), ("model.train_projector", True),
                ("model.init.format", "" if demo else init_format),
                ("data.demo_stage", "captions"), ("data.train_dir", "config:data.caption_dir")]
    return [("loss.direction", "q2t"), ("data.num_hard_negatives", 1),
            ("model.lora.rank", 0 if full else 64), ("model.lora.alpha", 16.0),
            ("model.freeze_vision", True), ("model.train_projector", False),
            ("model.init.format", "workdir"), ("model.init.path", PREVIOUS_STAGE),
            ("data.demo_stage", "instructions"), ("data.train_dir", "config:data.triplet_dir")]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_args(arg, {"stage", "full", "lora", "demo", "tiny", "fsdp", "backbone"})
    idmr = sibling_config(__file__, "idmr.py")
    base = ["instructcir"] + [k if k in ("tiny", "demo") else f"{k}={args[k]}"
                              for k in ("tiny", "demo", "fsdp", "backbone") if k in args]
    c = idmr.get_config(",".join(base))
    demo, tiny = "demo" in args, "tiny" in args
    c.task = "universal"
    d = c.data
    d.format = "pairs"
    d.prompt_set = "instructcir"
    d.train_glob = "train-*.array_record"
    d.caption_dir, d.triplet_dir = "", ""  # converted caption pairs (stage 1), instruction triplets (stage 2)
    d.demo_stage = "captions"  # the demo's data for this run: captions | instructions
    # Captions and the original-caption hard negatives are text: their sides hold no image slots.
    d.image_slots = ml_collections.ConfigDict(dict(query=-1, cand=0, hn=0))
    c.eval.benchmark = "demo_cir"
    c.eval.at_end = demo or tiny  # the real recipe is evaluated with configs/cir_eval.py
    if tiny:
        c.model.init.format = "random"
        idmr.bert_prompts(c, idmr.BERT_VOCAB + 1)  # real text through the bundled BERT vocab
        d.source, d.max_len, d.candidate_max_len = "arrayrecord", 64, 32
    if demo:
        d.source = "demo"
        d.max_len, d.candidate_max_len = 96, 72  # an image candidate: 49 image tokens and its prompt
        c.train.num_steps = 60
    full = "full" in args or (demo and "lora" not in args)
    options = dict(full=full, demo=demo or tiny, vision_trains=not (demo or tiny),
                   init_format=f"hf_{c.model.backbone}")
    if "stage" in args:
        stage = int(args["stage"])
        if stage not in (1, 2):
            raise ValueError(f"stage={args['stage']}: use 1 or 2")
        apply_overrides(c, stage_overrides(stage, **options))
        if c.model.init.path == PREVIOUS_STAGE:  # one stage alone: --config.model.init.path names stage 1's workdir
            c.model.init.path = ""
    else:
        c.stages = [(f"stage{s}", stage_overrides(s, **options)) for s in (1, 2)]
    return c
