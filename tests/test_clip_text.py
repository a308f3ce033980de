"""CLIP text tower and the CLIPModel pair: parity with transformers (tiny random, float32), both EOS rules,
scan, strict loading from a saved folder, and the CLIP score."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from idmr_jax.models import clip as clip_mod
from idmr_jax.models.clip_text import CLIPTextTransformer
from idmr_jax.weights import clip as clip_weights
from idmr_jax.weights import mapping
from idmr_jax.weights.mapping import NameMap, WeightMismatchError

TOL = 1e-4
VOCAB, EOT, PAD = 100, 99, 1


def _randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if "embedding" in name and "patch" not in name else 0.05
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _hf_config(eos_token_id: int) -> transformers.CLIPConfig:
    text = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, eos_token_id=eos_token_id, pad_token_id=PAD, bos_token_id=0)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=56,
                  patch_size=14)
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)


def _text(seed: int = 0):
    """Right-padded ids: random tokens, EOT at the end of each row's text, then PAD; row 3 holds an early 5."""
    rng = np.random.default_rng(seed)
    lengths = [10, 6, 3, 8]
    ids = np.full((4, 10), PAD, np.int64)
    mask = np.zeros((4, 10), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(3, VOCAB - 1, n)
        ids[i, n - 1] = EOT
        mask[i, :n] = 1
    ids[:, 0] = 0  # BOS
    ids[3, 2] = ids[3, 5] = 5  # a repeated "eos" for the non-legacy rule with eos_token_id=5
    return ids, mask


_PAIRS: dict = {}


def _pair(eos: int, tmp_path_factory):
    """A tiny random transformers CLIPModel saved to disk and the port loaded from that folder (cached)."""
    if eos not in _PAIRS:
        torch.manual_seed(0)
        hf = transformers.CLIPModel(_hf_config(eos)).eval()
        _randomise(hf, 3)
        folder = tmp_path_factory.mktemp(f"clip{eos}")
        hf.save_pretrained(folder)
        model, cfg = clip_weights.load_hf_clip(folder)
        _PAIRS[eos] = hf, model, cfg, folder
    return _PAIRS[eos]


@pytest.fixture(scope="module", params=[EOT, 2, 5], ids=["eos=eot", "legacy-eos=2", "eos=5"])
def pair(request, tmp_path_factory):
    return _pair(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def pair_eot(tmp_path_factory):
    return _pair(EOT, tmp_path_factory)


@nnx.jit
def _run(model, pixels, ids, mask):
    text = model.text(ids, mask)
    return dict(text_tokens=text.tokens, text_pooled=text.pooled, image=model.image_features(pixels),
                text_feat=model.text_features(ids, mask), logits=model.logits_per_image(pixels, ids, mask),
                score=clip_mod.clip_score(model, pixels, ids, mask))


def test_clip_model_matches_transformers(pair):
    hf, model, cfg, _ = pair
    ids, mask = _text()
    px = np.random.default_rng(1).standard_normal((4, 56, 56, 3)).astype(np.float32)
    got = _run(model, jnp.asarray(px), jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    pt_px = torch.from_numpy(px.transpose(0, 3, 1, 2).copy())
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    with torch.no_grad():
        text = hf.text_model(input_ids=ids_t, attention_mask=mask_t)
        out = hf(input_ids=ids_t, pixel_values=pt_px, attention_mask=mask_t)
        img = hf.get_image_features(pixel_values=pt_px).pooler_output
        txt = hf.get_text_features(input_ids=ids_t, attention_mask=mask_t).pooler_output
    valid = mask.astype(bool)
    d = np.abs(np.asarray(got["text_tokens"]) - text.last_hidden_state.numpy())
    assert d[valid].max() <= TOL
    np.testing.assert_allclose(np.asarray(got["text_pooled"]), text.pooler_output.numpy(), atol=TOL)
    np.testing.assert_allclose(np.asarray(got["image"]), img.numpy(), atol=TOL)
    np.testing.assert_allclose(np.asarray(got["text_feat"]), txt.numpy(), atol=TOL)
    np.testing.assert_allclose(np.asarray(got["logits"]), out.logits_per_image.numpy(), atol=TOL * 10, rtol=1e-5)
    cos = (out.image_embeds * out.text_embeds).sum(-1).numpy()
    np.testing.assert_allclose(np.asarray(got["score"]), cos, atol=TOL)


def test_eos_rules_pick_different_positions():
    """The legacy rule (eos id 2) pools at the largest id; the new rule at the first eos id."""
    from idmr_jax.models.clip_text import eos_positions

    ids, _ = _text()
    np.testing.assert_array_equal(np.asarray(eos_positions(ids, 2)), ids.argmax(-1))
    assert np.asarray(eos_positions(ids, EOT)).tolist() == [9, 5, 2, 7]
    assert int(np.asarray(eos_positions(ids, 5))[3]) == 2


def test_text_tower_scan_and_round_trip(pair_eot):
    hf, model, cfg, _ = pair_eot
    sd = {k: v.detach().numpy().copy() for k, v in hf.text_model.state_dict().items()}
    name_map = NameMap(clip_weights.hf_clip_text_rules(cfg.text))
    flat = name_map.torch_to_flax(sd, ignore=clip_weights.HF_CLIP_IGNORED)
    scanned = nnx.eval_shape(lambda: CLIPTextTransformer(dataclasses.replace(cfg.text, scan=True), rngs=nnx.Rngs(0)))
    mapping.load_into(scanned, flat)
    ids, mask = _text()
    a = nnx.jit(lambda m, i, k: m(i, k).tokens)(model.text, jnp.asarray(ids), jnp.asarray(mask))
    b = nnx.jit(lambda m, i, k: m(i, k).tokens)(scanned, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    back = name_map.flax_to_torch(mapping.unstack_from_model(mapping.flatten_params(scanned), name_map))
    assert set(back) == {k for k in sd if not k.endswith("position_ids")}
    for k, v in back.items():
        assert v.dtype == sd[k].dtype and np.array_equal(v, sd[k]), k


def test_full_map_round_trip_and_strict(pair_eot):
    hf, model, cfg, folder = pair_eot
    from idmr_jax.weights import torch_io

    sd = torch_io.load_torch_state_dict(folder)
    name_map = clip_weights.hf_clip_map(cfg)
    back = name_map.flax_to_torch(mapping.flatten_params(model))
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
    sd.pop("text_model.final_layer_norm.bias")
    with pytest.raises(WeightMismatchError, match="final_layer_norm.bias"):
        name_map.torch_to_flax(sd)
