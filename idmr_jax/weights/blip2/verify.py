"""``convert verify --format hf_blip2``: transformers ``Blip2ForImageTextRetrieval`` and the Flax port on the
same checkpoint and the same random inputs, output by output."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from idmr_jax.weights import io, torch_io
from idmr_jax.weights.blip2 import names
from idmr_jax.weights.blip2.convert import hf_blip2_params, parse_hf_blip2_config
from idmr_jax.weights.conversion import DEFAULT_TOL, ConvertError, apply_overrides, hf_config_of
from idmr_jax.weights.mapping import WeightMismatchError, load_partial


def numpy_to_torch(a: np.ndarray):
    import ml_dtypes
    import torch

    a = np.asarray(a, order="C")  # not ascontiguousarray, which makes 0-d tensors 1-d
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def torch_blip2(cfg_dict: dict, sd: Mapping[str, np.ndarray], src: Path):
    """The transformers reference built from config + the very same tensors (strict load, float32)."""
    import torch
    import transformers

    hf_cfg = parse_hf_blip2_config(cfg_dict)
    model = transformers.Blip2ForImageTextRetrieval(hf_cfg)
    tensors = {k: numpy_to_torch(v) for k, v in sd.items()}
    result = model.load_state_dict(tensors, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise WeightMismatchError(f"{src}: transformers Blip2ForImageTextRetrieval: missing {missing[:8]}, "
                                  f"unexpected {list(result.unexpected_keys)[:8]}")
    return model.float().eval(), hf_cfg


def random_inputs(hf_cfg, batch: int, text_len: int, seed: int):
    rng = np.random.default_rng(seed)
    size = hf_cfg.vision_config.image_size
    pixels = rng.standard_normal((batch, size, size, 3)).astype(np.float32)  # NHWC
    vocab = hf_cfg.qformer_config.vocab_size
    pad = hf_cfg.qformer_config.pad_token_id or 0
    ids = rng.integers(1, vocab, size=(batch, text_len)).astype(np.int64)
    ids[ids == pad] = (pad + 1) % vocab
    mask = np.ones((batch, text_len), np.int64)
    # Right padding of a growing length on every row but the first (the [CLS] at 0 always stays real).
    for b in range(1, batch):
        n_pad = max(1, (b * (text_len - 1)) // batch)
        mask[b, text_len - n_pad:] = 0
    ids[mask == 0] = pad
    return pixels, ids, mask


def reference_outputs(model, pixels, ids, mask) -> dict[str, np.ndarray]:
    import torch
    import torch.nn.functional as F

    px = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    with torch.no_grad():
        image = model.vision_model(pixel_values=px).last_hidden_state  # post_layernorm == LAVIS ln_vision
        image_mask = torch.ones(image.shape[:-1], dtype=torch.long)
        queries = model.query_tokens.expand(image.shape[0], -1, -1)
        nq = queries.shape[1]
        q_img = model.qformer(query_embeds=queries, encoder_hidden_states=image,
                              encoder_attention_mask=image_mask).last_hidden_state
        emb = model.embeddings(input_ids=ids_t, query_embeds=queries)
        full_mask = torch.cat([torch.ones(queries.shape[:-1], dtype=torch.long), mask_t], dim=1)
        q_it = model.qformer(query_embeds=emb, query_length=nq, attention_mask=full_mask,
                             encoder_hidden_states=image, encoder_attention_mask=image_mask).last_hidden_state
        q_txt = model.qformer(query_embeds=model.embeddings(input_ids=ids_t), query_length=0,
                              attention_mask=mask_t).last_hidden_state
        img_feat = F.normalize(model.vision_projection(q_img), dim=-1)
        txt_feat = F.normalize(model.text_projection(q_txt[:, 0]), dim=-1)
        itm = model.itm_head(q_it[:, :nq]).mean(dim=1)
    return {k: v.numpy() for k, v in dict(vision_tokens=image, qformer_image=q_img, qformer_image_text=q_it,
                                            qformer_text=q_txt, image_features=img_feat, text_features=txt_feat,
                                            itm_logits=itm).items()}


def port_outputs(module, pixels, ids, mask) -> dict[str, np.ndarray]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    @nnx.jit
    def run(m, pixels, ids, mask):
        image, _ = m.encode_image(pixels)
        batch = image.shape[0]
        queries = jnp.broadcast_to(m.query_tokens[...], (batch, *m.query_tokens.shape[-2:]))
        q_img = m.qformer(query_embeds=queries, image_embeds=image).last_hidden_state
        q_it = m.multimodal_hidden(image, ids, mask)
        q_it = getattr(q_it, "last_hidden_state", q_it)
        q_txt = m.qformer(input_ids=ids, attention_mask=mask).last_hidden_state
        nq = queries.shape[1]
        return dict(vision_tokens=image, qformer_image=q_img, qformer_image_text=q_it, qformer_text=q_txt,
                    image_features=m.image_features(image), text_features=m.text_features(ids, mask),
                    itm_logits=m.itm_head(q_it[:, :nq]).mean(axis=1))

    out = run(module, jnp.asarray(pixels), jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    return {k: np.asarray(jax.device_get(v), np.float32) for k, v in out.items()}


def verify(src: str | Path, *, port: str | Path | None = None, dtype: str = "float32", tol: float | None = None,
           config: str | None = None, batch: int = 2, text_len: int = 8, seed: int = 0,
           out=None) -> tuple[float, dict[str, float]]:
    """Runs transformers and the Flax port on the same random inputs; returns (max abs diff, per output).

    The reference is ``Blip2ForImageTextRetrieval`` loaded strictly from `src`. The port is converted from the same
    tensors, or restored from `port` (an ``import`` output) to check a conversion. The text has right padding
    (attention mask zeros) on all rows but the first. All positions are compared, padded ones included (both
    implementations mask padded *keys* only, so padded positions are well defined); the lines of the text
    outputs also show the difference over real positions alone.
    """
    out = out or sys.stdout  # looked up per call: tests (and callers) may have redirected it
    src = Path(src)
    cfg_dict = hf_config_of(src, config)
    sd = torch_io.load_torch_state_dict(src)
    model, hf_cfg = torch_blip2(cfg_dict, sd, src)
    overrides = {"dtype": dtype}
    if port is not None:
        kind, _ = io.load_model_config(port)
        if kind != "blip2":
            raise ConvertError(f"{port}: holds a {kind!r} model, not blip2")
        module, _ = rebuild_with(port, overrides)
    else:
        cfg = apply_overrides(names.blip2_config_from_hf(hf_cfg), overrides)
        module = io.build_model(cfg, kind="blip2", seed=seed)
        load_partial(module, hf_blip2_params(sd, cfg, source=str(src)), source=str(src))

    pixels, ids, mask = random_inputs(hf_cfg, batch, text_len, seed)
    ref = reference_outputs(model, pixels, ids, mask)
    got = port_outputs(module, pixels, ids, mask)
    nq = hf_cfg.num_query_tokens
    valid_it = np.concatenate([np.ones((batch, nq), bool), mask.astype(bool)], axis=1)
    tol = DEFAULT_TOL[dtype] if tol is None else tol
    diffs = {}
    for name, r in ref.items():
        g = got[name]
        if g.shape != r.shape:
            raise WeightMismatchError(f"verify: output {name} has shape {g.shape} in the port, {r.shape} in torch")
        d = np.abs(g.astype(np.float64) - r.astype(np.float64))
        diffs[name] = float(d.max())
        line = f"{name:20s} shape={tuple(r.shape)} max_abs_diff={diffs[name]:.3e}"
        if name in ("qformer_image_text", "qformer_text"):
            valid = valid_it if name == "qformer_image_text" else mask.astype(bool)
            line += f" (unpadded positions: {float(d[valid].max()):.3e})"
        print(line, file=out)
    out.flush()
    return max(diffs.values()), diffs


def rebuild_with(port, overrides):
    """Restores `port` with config overrides applied to every sub-config that has the field (e.g. dtype)."""
    kind, cfg = io.load_model_config(port)
    new = apply_overrides(cfg, overrides)
    top = {f.name: getattr(new, f.name) for f in dataclasses.fields(new)
           if getattr(new, f.name) != getattr(cfg, f.name)}
    return io.restore_model(port, overrides=top)
