"""BLIP-2 assembly parity against transformers' Blip2ForImageTextRetrieval, and its weight name maps
(strict import/export, round trips, generation-checkpoint parts, LAVIS names, configs)."""

import dataclasses

import idmr_jax  # noqa: F401  (flax config)
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

from idmr_jax.models.blip2 import Blip2, blip2_config
from idmr_jax.weights.blip2 import names as bn
from idmr_jax.weights.mapping import WeightMismatchError, flatten_params

TOL = 1e-4
CFG = blip2_config("tiny")  # EVA ViT 64 wide, 2 layers, patch 14, 56 px; Q-Former 64 wide, 4 layers, 8 queries
B, T = 2, 6


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Perturbs every parameter (HF inits query tokens to zero and LayerNorms to 1/0; parity needs more)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _numpy_sd(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    hf_cfg = bn.hf_blip2_config(CFG)
    hf_cfg._attn_implementation = "eager"
    tm = Blip2ForImageTextRetrieval(hf_cfg).eval()
    _randomize(tm, 3)
    sd = _numpy_sd(tm)
    model = Blip2(CFG, rngs=nnx.Rngs(0))
    left = bn.load_partial(model, bn.hf_blip2_retrieval_map(CFG).torch_to_flax(sd, source="HF retrieval"))
    assert left == ["temp"]  # transformers' retrieval model has no temperature
    return tm, sd, model


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.normal(size=(B, CFG.vision.image_size, CFG.vision.image_size, 3)).astype(np.float32)
    ids = rng.integers(1, CFG.qformer.vocab_size, size=(B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, 3:] = 0
    ids[1, 3:] = 0
    return pixels, ids, mask


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@nnx.jit
def _features(model, pixels, ids, mask):
    """(image_embeds after ln_vision, image features, text features, ITM logits) in one compiled call."""
    embeds, _ = model.encode_image(pixels)
    return embeds, model.image_features(embeds), model.text_features(ids, mask), model.itm_logits(embeds, ids, mask)


def test_retrieval_parity(pair):
    tm, _, model = pair
    pixels, ids, mask = _inputs()
    embeds, img, txt, itm = _features(model, jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask))
    tp, tids, tmask = torch.from_numpy(pixels).permute(0, 3, 1, 2), torch.from_numpy(ids), torch.from_numpy(mask)
    with torch.no_grad():
        itc = tm(pixel_values=tp, input_ids=tids, attention_mask=tmask, use_image_text_matching_head=False)
        itm_ref = tm(pixel_values=tp, input_ids=tids, attention_mask=tmask, use_image_text_matching_head=True)
    assert embeds.shape == (B, 17, CFG.vision.width)
    assert _max_diff(embeds, itc.vision_model_output.last_hidden_state.numpy()) <= TOL
    assert img.shape == (B, CFG.num_query_tokens, CFG.embed_dim)
    assert _max_diff(img, itc.image_embeds.numpy()) <= TOL
    assert _max_diff(txt, itc.text_embeds.numpy()) <= TOL
    np.testing.assert_allclose(np.linalg.norm(np.asarray(img), axis=-1), 1.0, atol=1e-5)
    # ITC score as transformers computes it: max over the query tokens of image . text.
    sims = np.einsum("iqe,te->itq", np.asarray(img), np.asarray(txt)).max(-1)
    assert _max_diff(sims, itc.logits_per_image.numpy()) <= TOL
    assert itm.shape == (B, 2)
    assert _max_diff(itm, itm_ref.logits_per_image.numpy()) <= TOL


def test_multimodal_hidden_with_other_query_tokens(pair):
    """AdaFocal's probe pass: other query tokens (here 3) replace the learned ones; text [CLS] at index 3."""
    tm, _, model = pair
    pixels, ids, mask = _inputs(1)
    probes = np.random.default_rng(5).normal(size=(3, CFG.qformer.hidden_size)).astype(np.float32)
    embeds, _ = model.encode_image(jnp.asarray(pixels))
    hidden = nnx.jit(lambda m, e, i, k, p: m.multimodal_hidden(e, i, k, query_tokens=p))(
        model, embeds, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(probes))
    with torch.no_grad():
        image = tm.vision_model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).last_hidden_state
        q = torch.from_numpy(probes)[None].expand(B, -1, -1)
        emb = tm.embeddings(input_ids=torch.from_numpy(ids), query_embeds=q)
        full_mask = torch.cat([torch.ones(B, 3, dtype=torch.long), torch.from_numpy(mask)], 1)
        ref = tm.qformer(query_embeds=emb, query_length=3, attention_mask=full_mask, encoder_hidden_states=image,
                         encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long)).last_hidden_state
    assert hidden.shape == (B, 3 + T, CFG.qformer.hidden_size)
    assert _max_diff(hidden, ref.numpy()) <= TOL
    # The query feature AdaFocal reads: L2norm(text_proj(hidden[:, Q'])).
    f_q = model.text_projection(hidden[:, 3])
    ref_fq = torch.nn.functional.normalize(tm.text_projection(ref[:, 3]), dim=-1)
    assert _max_diff(f_q, ref_fq.detach().numpy()) <= TOL


def test_attention_bias_through_blip2(pair):
    """A zero bias leaves the multimodal pass bit-identical; a box bias changes only the query pass."""
    _, _, model = pair
    pixels, ids, mask = _inputs(2)
    embeds, _ = model.encode_image(jnp.asarray(pixels))
    run = nnx.jit(lambda m, e, i, k, b: m.multimodal_hidden(e, i, k, attention_bias=b))
    n = embeds.shape[1]
    plain = nnx.jit(lambda m, e, i, k: m.multimodal_hidden(e, i, k))(model, embeds, ids, mask)
    zero = run(model, embeds, ids, mask, jnp.zeros((B, 1, 1, n)))
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(zero))
    box = jnp.zeros((B, 1, 1, n)).at[:, :, :, 5:9].set(30.0)
    assert _max_diff(run(model, embeds, ids, mask, box), plain) > 1e-2


# ----------------------------------------------------------------------------------------------
# Name maps: strictness and round trips.


def test_import_is_strict(pair):
    _, sd, _ = pair
    name_map = bn.hf_blip2_retrieval_map(CFG)
    removed = dict(sd)
    del removed["qformer.encoder.layer.2.crossattention.attention.value.bias"]
    with pytest.raises(WeightMismatchError, match=r"qformer\.encoder\.layer\.2\.crossattention\.attention\.value"):
        name_map.torch_to_flax(removed)
    extra = {**sd, "qformer.encoder.layer.1.crossattention.attention.query.weight": np.zeros((64, 64), np.float32)}
    with pytest.raises(WeightMismatchError, match=r"qformer\.encoder\.layer\.1\.crossattention"):
        name_map.torch_to_flax(extra)
    # A wrong shape is caught too (here: a Q-Former built with another vocabulary).
    other = dataclasses.replace(CFG, qformer=dataclasses.replace(CFG.qformer, vocab_size=101))
    with pytest.raises(WeightMismatchError, match="word_embeddings"):
        bn.load_partial(Blip2(other, rngs=nnx.Rngs(0)), name_map.torch_to_flax(sd))


def test_torch_flax_torch_round_trip_is_bit_exact(pair):
    tm, sd, model = pair
    name_map = bn.hf_blip2_retrieval_map(CFG)
    out = bn.export_state_dict(model, name_map, skip=bn.HF_RETRIEVAL_UNMAPPED)
    assert set(out) == set(sd)
    for k in sd:
        assert out[k].shape == sd[k].shape and out[k].dtype == sd[k].dtype, k
        np.testing.assert_array_equal(out[k], sd[k], err_msg=k)
    # transformers accepts the export as it is (strict load).
    fresh = Blip2ForImageTextRetrieval(tm.config)
    fresh.load_state_dict({k: torch.tensor(v) for k, v in out.items()}, strict=True)
    # Without `skip`, temp has no torch name: an error, not a silent drop.
    with pytest.raises(WeightMismatchError, match="temp"):
        bn.export_state_dict(model, name_map)

    # The same map serves a scanned ViT (stacked layer params).
    scanned_cfg = dataclasses.replace(CFG, vision=dataclasses.replace(CFG.vision, scan=True))
    scanned = nnx.eval_shape(lambda: Blip2(scanned_cfg, rngs=nnx.Rngs(0)))
    assert any(k.startswith("vision/encoder/layers/") and not k.split("/")[3].isdigit()
               for k in flatten_params(scanned))
    scanned = Blip2(scanned_cfg, rngs=nnx.Rngs(1))
    bn.load_partial(scanned, name_map.torch_to_flax(sd))
    out2 = bn.export_state_dict(scanned, name_map, skip=bn.HF_RETRIEVAL_UNMAPPED)
    for k in sd:
        np.testing.assert_array_equal(out2[k], sd[k], err_msg=k)


def test_parts_map_from_generation_checkpoint():
    """Vision + query tokens + Q-Former from a Blip2ForConditionalGeneration checkpoint (tiny OPT LM ignored)."""
    hf_cfg = bn.hf_blip2_config(CFG)
    hf_cfg.qformer_config.use_qformer_text_input = False  # as in the blip2-opt / blip2-flan-t5 checkpoints
    hf_cfg.text_config = type(hf_cfg.text_config)(
        hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2, vocab_size=64,
        max_position_embeddings=32, word_embed_proj_dim=16)
    hf_cfg._attn_implementation = "eager"
    gen = Blip2ForConditionalGeneration(hf_cfg).eval()
    _randomize(gen, 4)
    sd = _numpy_sd(gen)
    assert any(k.startswith("language_model.") for k in sd)
    with pytest.raises(WeightMismatchError, match="language"):
        bn.hf_blip2_parts_map(CFG).torch_to_flax(sd)
    converted = bn.hf_blip2_parts_map(CFG).torch_to_flax(sd, ignore=bn.HF_BLIP2_IGNORED)
    model = Blip2(CFG, rngs=nnx.Rngs(0))
    left = bn.load_partial(model, converted)
    # What a generation checkpoint does not have stays at init: text embeddings, text FFN, heads, temp.
    assert {p.split("/")[0] for p in left} == {"qformer", "vision_proj", "text_proj", "itm_head", "temp"}
    assert all(("/ffn/" in p or "_embeddings/" in p) for p in left if p.startswith("qformer/"))

    pixels, _, _ = _inputs(3)
    embeds, _ = model.encode_image(jnp.asarray(pixels))
    hidden = nnx.jit(lambda m, e: m.image_hidden(e))(model, embeds)
    with torch.no_grad():
        image = gen.vision_model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).last_hidden_state
        ref = gen.qformer(query_embeds=gen.query_tokens.expand(B, -1, -1), encoder_hidden_states=image,
                          encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long)).last_hidden_state
    assert _max_diff(hidden, ref.numpy()) <= TOL


def test_lavis_names_round_trip(pair):
    """LAVIS names: spot-check the layout, ignore the LM head and position_ids, round-trip bit-exactly."""
    _, _, model = pair
    cfg = CFG
    name_map = bn.lavis_blip2_map(cfg)
    flat = flatten_params(model)
    lavis = bn.to_lavis_state_dict(name_map.flax_to_torch({k: np.asarray(v) for k, v in flat.items()}),
                                   drop_k_bias=True)
    d, dv = cfg.qformer.hidden_size, cfg.vision.width
    expected_shapes = {
        "query_tokens": (1, cfg.num_query_tokens, d),
        "temp": (),
        "ln_vision.weight": (dv,),
        "Qformer.bert.embeddings.LayerNorm.weight": (d,),
        "Qformer.bert.embeddings.word_embeddings.weight": (cfg.qformer.vocab_size, d),
        "Qformer.bert.encoder.layer.0.attention.self.query.weight": (d, d),
        "Qformer.bert.encoder.layer.0.crossattention.self.key.weight": (d, dv),
        "Qformer.bert.encoder.layer.2.crossattention.output.LayerNorm.bias": (d,),
        "Qformer.bert.encoder.layer.3.intermediate_query.dense.weight": (cfg.qformer.intermediate_size, d),
        "Qformer.bert.encoder.layer.3.output.dense.weight": (d, cfg.qformer.intermediate_size),
        "visual_encoder.blocks.1.attn.q_bias": (dv,),
        "vision_proj.weight": (cfg.embed_dim, d),
        "itm_head.bias": (2,),
    }
    for k, shape in expected_shapes.items():
        assert lavis[k].shape == shape, k
    assert not any("layer.1.crossattention" in k or "layer.3.crossattention" in k for k in lavis)
    # LAVIS checkpoints also hold the BertLMHeadModel head and the position_ids buffer: ignored on import.
    lavis["Qformer.cls.predictions.bias"] = np.zeros(cfg.qformer.vocab_size, np.float32)
    lavis["Qformer.cls.predictions.transform.dense.weight"] = np.zeros((d, d), np.float32)
    lavis["Qformer.bert.embeddings.position_ids"] = np.arange(cfg.qformer.max_position_embeddings)[None]
    back = name_map.torch_to_flax(bn.from_lavis_state_dict(lavis), ignore=bn.LAVIS_BLIP2_IGNORED)
    assert set(back) == set(flat)
    for k, v in back.items():
        if "/attn/qkv/bias" in k:  # the EVA k bias is zero in LAVIS; the random test model's is not
            continue
        np.testing.assert_array_equal(v, np.asarray(flat[k]), err_msg=k)
    with pytest.raises(WeightMismatchError, match="Qformer.cls"):
        name_map.torch_to_flax(bn.from_lavis_state_dict(lavis))


def test_configs_round_trip():
    hf_cfg = bn.hf_blip2_config(CFG)
    assert hf_cfg.qformer_config.use_qformer_text_input and hf_cfg.use_qformer_text_input
    assert hf_cfg.qformer_config.encoder_hidden_size == CFG.vision.width
    assert bn.blip2_config_from_hf(hf_cfg) == CFG
    bf = bn.blip2_config_from_hf(hf_cfg, dtype="bfloat16", embed_dim=16, qformer=dict(remat=True))
    assert bf.vision.dtype == bf.qformer.dtype == "bfloat16" and bf.embed_dim == 16 and bf.qformer.remat
    with pytest.raises(ValueError):
        bn.blip2_config_from_hf(hf_cfg, not_a_field=1)
    full = blip2_config("pretrain")
    assert (full.vision.width, full.vision.depth, full.qformer.encoder_hidden_size) == (1408, 39, 1408)
    assert full.qformer.cross_attention_layers == (0, 2, 4, 6, 8, 10)
    # Every param carries logical axis names (checked on the tiny model; tracing the full-size init is slow here).
    abstract = nnx.eval_shape(lambda: Blip2(CFG, rngs=nnx.Rngs(0)))
    state = nnx.state(abstract, nnx.Param)
    names = {}
    for path, var in nnx.to_flat_state(state):
        names["/".join(map(str, path))] = var.get_metadata().get("out_sharding")
    assert all(v is not None for v in names.values()), [k for k, v in names.items() if v is None][:5]
    assert names["qformer/layers/0/crossattention/key/kernel"] == ("vision_embed", "heads", "kv")
    assert names["temp"] == ()


# bf16 compute: features are unit vectors; bf16 (8-bit mantissa) through the ViT and 4 Q-Former layers keeps
# every component within 0.05 of float32 and cosine similarity above 0.99.
BF16_FEATURE_TOL = 0.05


def test_bfloat16_features(pair):
    _, _, model = pair
    pixels, ids, mask = _inputs(4)
    bf_cfg = dataclasses.replace(CFG, vision=dataclasses.replace(CFG.vision, dtype="bfloat16"),
                                 qformer=dataclasses.replace(CFG.qformer, dtype="bfloat16"))
    bf_model = Blip2(bf_cfg, rngs=nnx.Rngs(0))
    nnx.update(bf_model, nnx.state(model, nnx.Param))
    args = (jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask))
    _, img, txt, _ = _features(model, *args)
    _, img_bf, txt_bf, _ = _features(bf_model, *args)
    # Normalised in float32, returned in the compute dtype: the global InfoNCE gathers bf16 (idmr_jax/precision.py).
    assert img_bf.dtype == txt_bf.dtype == jnp.bfloat16
    assert _max_diff(img_bf, img) <= BF16_FEATURE_TOL and _max_diff(txt_bf, txt) <= BF16_FEATURE_TOL
    assert float(np.min(np.sum(np.asarray(img_bf) * np.asarray(img), -1))) > 0.99
