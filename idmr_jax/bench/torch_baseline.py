"""The PyTorch side of ``train_step --compare=torch``: the standard CIR baseline (no CAAM) on transformers' BLIP-2.

Built from transformers' ``Blip2VisionModel``, ``Blip2QFormerModel`` and ``Blip2TextEmbeddings`` (the parts of
``Blip2ForImageTextRetrieval``), at the same sizes as the JAX model and loaded with the JAX model's weights, so
both sides compute the same function (:func:`parity` checks the loss on one batch). The step is what the JAX
baseline step does:

* the frozen ViT runs under ``torch.no_grad`` with ``requires_grad=False`` (no backward, no optimiser state);
  ``post_layernorm`` (BLIP-2's ``ln_vision``) trains; with cached ViT features the batch holds the ViT's tokens
  (the same ones the JAX side uses) and only ``post_layernorm`` onwards runs;
* query: the multimodal Q-Former pass over ``[query tokens; text]`` and the reference image, text [CLS] ->
  ``text_projection`` -> L2 norm; target: the image-only pass -> ``vision_projection`` -> L2 norm, [B, Q, E];
* loss: cross-entropy of ``max_k <q_i, t_j[k]> / temp`` against the diagonal (query -> target);
* AdamW (the release recipe's betas, eps and weight decay; the fused CPU kernel when available) on every
  trainable parameter. Dropout as configured, in train mode on both sides.

Precision follows the JAX side's policy (:mod:`idmr_jax.precision`). ``"bf16"``: the forward runs under
``torch.autocast("cpu", dtype=torch.bfloat16)`` (bf16 matmuls, SDPA and convolutions, LayerNorm and softmax in
float32) with float32 trainable parameters and optimiser state; the frozen ViT stores its weights in bfloat16, as
the JAX side does (so neither side re-casts them every step); the L2 normalisation, the temperature-scaled
similarity and the cross-entropy run in float32 (autocast off there, as the policy says).
"""

from __future__ import annotations

import numpy as np


def _torch():
    import torch

    return torch


class BaselineStep:
    """One PyTorch train step of the standard CIR baseline; see the module docstring."""

    def __init__(self, blip2_cfg, flat_weights: dict[str, np.ndarray], temp: float, optim_cfg, *,
                 threads: int | None = None, attn_implementation: str | None = None,
                 compute_dtype: str = "float32", frozen_vision_dtype: str | None = None):
        torch = _torch()
        import transformers

        from idmr_jax.weights.blip2 import names as bn

        if threads:
            torch.set_num_threads(int(threads))
        hf_cfg = bn.hf_blip2_config(blip2_cfg)
        if attn_implementation:
            hf_cfg._attn_implementation = attn_implementation
        full = transformers.Blip2ForImageTextRetrieval(hf_cfg)
        if blip2_cfg.ln_vision_eps is not None:  # transformers takes the ViT's eps; the recipe's is LAVIS' 1e-5
            full.vision_model.post_layernorm.eps = float(blip2_cfg.ln_vision_eps)
        missing, unexpected = full.load_state_dict({k: _tensor(v) for k, v in flat_weights.items()}, strict=False)
        if missing or unexpected:
            raise ValueError(f"torch baseline: weights do not match the transformers model: missing {missing[:8]}, "
                             f"unexpected {unexpected[:8]}")
        self.attn_implementation = full.config._attn_implementation
        self.vision, self.qformer, self.embeddings = full.vision_model, full.qformer, full.embeddings
        self.query_tokens, self.vision_proj, self.text_proj = full.query_tokens, full.vision_projection, \
            full.text_projection
        self.itm_head = full.itm_head
        self.temp = torch.nn.Parameter(torch.tensor(float(temp)))
        for module in (self.vision.embeddings, self.vision.encoder):
            module.requires_grad_(False)
            if frozen_vision_dtype:
                module.to(getattr(torch, frozen_vision_dtype))
        if compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"torch baseline computes in float32 or bfloat16, not {compute_dtype!r}")
        self.compute_dtype = compute_dtype
        self.autocast = compute_dtype == "bfloat16"
        self.modules = [self.vision, self.qformer, self.embeddings, self.vision_proj, self.text_proj, self.itm_head]
        self.params = [p for m in self.modules for p in m.parameters() if p.requires_grad]
        self.params += [self.query_tokens, self.temp]
        kwargs = dict(lr=1e-5, betas=(float(optim_cfg.b1), float(optim_cfg.b2)), eps=float(optim_cfg.eps),
                      weight_decay=float(optim_cfg.weight_decay))
        try:
            self.optimizer = torch.optim.AdamW(self.params, fused=True, **kwargs)
            self.optimizer_impl = "fused"
        except (RuntimeError, TypeError):
            self.optimizer = torch.optim.AdamW(self.params, foreach=True, **kwargs)
            self.optimizer_impl = "foreach"
        self.train(True)

    def train(self, mode: bool) -> None:
        for m in self.modules:
            m.train(mode)
        self.vision.eval()  # frozen and dropout-free: no train-mode behaviour to keep

    def num_trainable(self) -> int:
        return int(sum(p.numel() for p in self.params))

    @staticmethod
    def batch(local: dict[str, np.ndarray]) -> dict:
        """Torch tensors from the JAX side's numpy batch (pixels NHWC -> NCHW; cached ViT tokens as they are, in
        their dtype: bfloat16 tokens stay bfloat16)."""
        out = {"input_ids": _tensor(local["input_ids"].astype(np.int64)),
               "attention_mask": _tensor(local["attention_mask"].astype(np.int64))}
        for side in ("ref", "tgt"):
            if f"{side}_tokens" in local:
                out[f"{side}_tokens"] = _tensor(local[f"{side}_tokens"])
            else:
                out[f"{side}_pixels"] = _tensor(local[f"{side}_pixels"].transpose(0, 3, 1, 2))
        return out

    def _image_embeds(self, batch: dict, side: str):
        """``post_layernorm`` (ln_vision, trainable) of the frozen ViT's tokens, run here or cached."""
        torch = _torch()
        tokens = batch.get(f"{side}_tokens")
        if tokens is None:
            with torch.no_grad():
                # In the frozen ViT's storage dtype (a bf16 ViT under a float32 policy has no autocast to cast).
                pixels = batch[f"{side}_pixels"].to(self.vision.embeddings.patch_embedding.weight.dtype)
                tokens = self.vision.encoder(inputs_embeds=self.vision.embeddings(pixels)).last_hidden_state
        norm = self.vision.post_layernorm
        return norm(tokens.to(norm.weight.dtype))

    def loss(self, batch: dict):
        """The contrastive loss of `batch`, in the step's precision (autocast to bfloat16 under "bf16")."""
        torch = _torch()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            query, targets = self._features(batch)
        # The policy's float32 tail: L2 normalisation, temperature-scaled similarity and cross-entropy.
        f = torch.nn.functional
        query, targets = f.normalize(query.float(), dim=-1), f.normalize(targets.float(), dim=-1)
        sim = torch.einsum("qe,tke->qtk", query, targets).amax(dim=-1) / self.temp
        return f.cross_entropy(sim, torch.arange(query.shape[0]))

    def _features(self, batch: dict):
        """Unnormalised query features [B, E] and target token features [B, Q, E]."""
        torch = _torch()
        ref = self._image_embeds(batch, "ref")
        tgt = self._image_embeds(batch, "tgt")
        b = ref.shape[0]
        queries = self.query_tokens.expand(b, -1, -1)
        nq = queries.shape[1]
        mask = torch.cat([torch.ones(b, nq, dtype=batch["attention_mask"].dtype), batch["attention_mask"]], dim=1)
        hidden = self.qformer(query_embeds=self.embeddings(input_ids=batch["input_ids"], query_embeds=queries),
                              query_length=nq, attention_mask=mask, encoder_hidden_states=ref).last_hidden_state
        query = self.text_proj(hidden[:, nq])
        target_hidden = self.qformer(query_embeds=queries, encoder_hidden_states=tgt).last_hidden_state
        return query, self.vision_proj(target_hidden)

    def step(self, batch: dict):
        """One update; returns the loss (a float: reading it is the step's only host sync, as in training)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def eval_loss(self, batch: dict) -> float:
        """The loss with dropout off and no update (for :func:`parity`)."""
        torch = _torch()
        self.train(False)
        try:
            with torch.no_grad():
                return float(self.loss(batch))
        finally:
            self.train(True)


def _tensor(x):
    """A writable torch copy of a numpy array; bfloat16 (ml_dtypes) arrays become torch bfloat16 tensors."""
    torch = _torch()
    x = np.asarray(x)
    if x.dtype.name == "bfloat16":  # torch cannot read ml_dtypes' bfloat16: through float32, exactly
        return torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(x))


def from_jax(jstep, *, threads: int | None = None, attn_implementation: str | None = None) -> BaselineStep:
    """A :class:`BaselineStep` with the JAX step's current weights and precision (`jstep`: a
    ``bench.jax_step.JaxStep``): its compute dtype is the Q-Former's, and the frozen ViT stores its weights in the
    dtype the JAX side stores them in."""
    from idmr_jax import precision
    from idmr_jax.weights.blip2 import names as bn

    model = jstep.model()
    cfg = model.cfg.blip2
    flat = bn.export_state_dict(model.blip2, bn.hf_blip2_retrieval_map(cfg), skip=bn.HF_RETRIEVAL_UNMAPPED)
    config = jstep.config
    frozen = bool(config.model.freeze_vision)
    vision_store = precision.param_dtype(config, "vision", frozen=frozen) if frozen else None
    return BaselineStep(cfg, flat, float(model.temp), config.optim, threads=threads,
                        attn_implementation=attn_implementation,
                        compute_dtype=precision.dtype_name(precision.compute_dtype(config, "qformer")),
                        frozen_vision_dtype=precision.dtype_name(vision_store) if vision_store is not None else None)


def jax_eval_loss(jstep) -> float:
    """The JAX step's loss on its batch with dropout off and no update (the same weights and batch as torch)."""
    import jax
    from flax import nnx

    from idmr_jax import sharding as shd
    from idmr_jax.bench import configs
    from idmr_jax.train.state import split_model

    twin = jstep.config.copy_and_resolve_references()
    twin.model.qformer.dropout = 0.0
    twin.model.caam.dropout = 0.0
    task = configs.make_task(twin)
    graphdef, _, _ = split_model(nnx.eval_shape(task.build_model), task.frozen_patterns)
    from idmr_jax.bench.jax_step import step_loss

    loss_fn = step_loss(task, jstep.mesh, jstep.vit_cache)

    def loss(params, frozen, batch):
        model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, frozen))
        return loss_fn(model, batch, jax.random.key(0))[0]

    with shd.axis_rules(jstep.mesh, jstep.rules):
        return float(jax.jit(loss)(jstep.state.params, jstep.state.frozen, jstep.batch))


def parity(jstep, tstep: BaselineStep, torch_batch: dict | None = None) -> dict:
    """Both sides' losses on the same weights and batch with dropout off; a large difference means the two
    steps do not compute the same function and their timings are not comparable. `torch_batch` (default: the
    JAX side's host batch) lets torch run the ViT on pixels while JAX reads cached ViT tokens."""
    lj = jax_eval_loss(jstep)
    lt = tstep.eval_loss(tstep.batch(jstep.local_batch if torch_batch is None else torch_batch))
    return {"loss_jax": lj, "loss_torch": lt, "abs_diff": abs(lj - lt)}
