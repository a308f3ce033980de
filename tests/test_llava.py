"""LLaVA embedder: parity with transformers' LlavaForConditionalGeneration (tiny random, float32; Qwen2 and
tied-embedding Llama text towers), the convert CLI (verify / import / export round trip), mixed and padded
batches, ViT intermediate layers (scan included), greedy generation, a PEFT LoRA adapter, the EfficientNet demo
vision tower."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

import mllm_fixtures as fx
from idmr_jax.models import llava as llava_mod
from idmr_jax.models import pooling
from idmr_jax.models.lora import LoRAConfig
from idmr_jax.models.vit import VisionTransformer
from idmr_jax.weights import llava, llava_verify, mapping
from idmr_jax.weights import vit as vit_weights

TOL = 1e-4
VOCAB, IMAGE_TOKEN = 64, 63


def _hf_config(text: str, **kw) -> transformers.LlavaConfig:
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=28, patch_size=14)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if text == "qwen2":
        text_cfg = transformers.Qwen2Config(**common)
    else:
        text_cfg = transformers.LlamaConfig(**common, tie_word_embeddings=True)
    return transformers.LlavaConfig(vision_config=vision, text_config=text_cfg, image_token_index=IMAGE_TOKEN,
                                    image_seq_length=4, tie_word_embeddings=text != "qwen2", **kw)


_MODELS: dict = {}


def _is_embedding(name: str) -> bool:
    return "embed" in name and "patch" not in name


def _saved(text: str, tmp_path_factory, **kw):
    key = (text, repr(sorted(kw.items())))
    if key not in _MODELS:
        _MODELS[key] = fx.save_random(transformers.LlavaForConditionalGeneration, _hf_config(text, **kw),
                                      tmp_path_factory.mktemp(f"llava_{text}"), is_embedding=_is_embedding)
    return _MODELS[key]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return _saved("qwen2", tmp_path_factory)


# ----------------------------------------------------------------------------------------------
# Parity through the CLI verify (right / left padding, image+text and text-only).


@pytest.mark.parametrize("text", ["qwen2", "llama"])
def test_cli_verify(text, tmp_path_factory):
    _, folder = _saved(text, tmp_path_factory)
    rc, out = fx.run_convert(["verify", "--format", "hf_llava", "--src", str(folder), "--batch", "3"])
    lines = fx.check_verify_output(rc, out, TOL)
    assert any("left" in line for line in lines) and any("text/right" in line for line in lines)


def test_cli_verify_fails_above_tolerance(qwen):
    _, folder = qwen
    rc, out = fx.run_convert(["verify", "--format", "hf_llava", "--src", str(folder), "--batch", "3", "--tol", "1e-12"])
    assert rc == 1 and out.strip().splitlines()[-1].startswith("max_abs_diff=")


# ----------------------------------------------------------------------------------------------
# Import / export.


@pytest.mark.parametrize("text", ["qwen2", "llama"])
def test_import_export_round_trip_bit_exact(text, tmp_path_factory, tmp_path):
    _, folder = _saved(text, tmp_path_factory)
    port, back = tmp_path / "port", tmp_path / "back"
    assert fx.run_convert(["import", "--format", "hf_llava", "--src", str(folder), "--out", str(port)])[0] == 0
    meta = json.loads((port / "model_config.json").read_text())
    assert meta["kind"] == "llava"
    assert fx.run_convert(["export", "--format", "hf_llava", "--src", str(port), "--out", str(back)])[0] == 0
    model = fx.check_round_trip(folder, back, transformers.LlavaForConditionalGeneration)
    assert model.config.text_config.model_type == text
    if text == "qwen2":  # the converted directory itself passes verify against the original folder
        rc, out = fx.run_convert(["verify", "--format", "hf_llava", "--src", str(folder), "--port", str(port)])
        assert rc == 0 and fx.worst_diff(out) <= TOL


def test_strict_import_names_the_tensor(qwen, tmp_path):
    _, folder = qwen
    sd = load_file(str(folder / "model.safetensors"))
    sd.pop("multi_modal_projector.linear_2.bias")
    sd["language_model.model.extra.weight"] = np.zeros(3, np.float32)
    bad = tmp_path / "bad"
    from idmr_jax.weights import torch_io

    torch_io.save_torch_state_dict(sd, bad, json.loads((folder / "config.json").read_text()))
    with pytest.raises(mapping.WeightMismatchError, match="linear_2.bias"):
        llava.load_hf_llava(bad)
    rc, _ = fx.run_convert(["import", "--format", "hf_llava", "--src", str(bad), "--out", str(tmp_path / "o")])
    assert rc == 2


# ----------------------------------------------------------------------------------------------
# Batches, pooling and the vision feature layer.


def _torch_hidden(hf, pixels, ids, mask):
    px = None if pixels is None else torch.from_numpy(pixels).permute(0, 3, 1, 2)
    with torch.no_grad():
        return hf.model(input_ids=torch.from_numpy(ids), pixel_values=px,
                        attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()


def test_mixed_batch_with_placeholder_images_and_pooling_methods(qwen):
    """Rows 0 and 2 have images, row 1 is text only: transformers gets the two real images; the port gets a
    fixed-shape [3, ...] pixel batch with a placeholder row masked out by image_valid."""
    hf, folder = qwen
    model, cfg = llava.load_hf_llava(folder, pooling="before_token", pooling_token_id=5)
    rng = np.random.default_rng(3)
    pixels = rng.standard_normal((3, 28, 28, 3)).astype(np.float32)
    ids = rng.integers(6, IMAGE_TOKEN, size=(3, 10))
    ids[0, 1:5] = IMAGE_TOKEN
    ids[2, 3:7] = IMAGE_TOKEN
    ids[:, 8] = 5  # LamRA's <emb> stand-in, followed by one more token
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # left padding on the text-only row
    ref = _torch_hidden(hf, pixels[[0, 2]], ids, mask)

    @nnx.jit
    def run(m, px, ids, mask, valid):
        return m.hidden_states(ids, mask, px, image_valid=valid), m.embed(ids, mask, px, image_valid=valid)

    hidden, emb = run(model, jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask),
                      jnp.asarray([True, False, True]))
    d = np.abs(np.asarray(hidden) - ref)[mask.astype(bool)]
    assert d.max() <= TOL
    before = ref[np.arange(3), 7]
    np.testing.assert_allclose(np.asarray(emb), before / np.linalg.norm(before, axis=-1, keepdims=True), atol=TOL)


def test_image_token_count_mismatch(qwen):
    _, folder = qwen
    model, cfg = llava.load_hf_llava(folder)
    ids = np.full((1, 8), 7)
    ids[0, :3] = IMAGE_TOKEN  # 3 tokens, 4 features
    px = np.zeros((1, 28, 28, 3), np.float32)
    emb = nnx.jit(lambda m, i, k, p: m.embed(i, k, p))(model, jnp.asarray(ids), jnp.ones((1, 8), jnp.int32),
                                                      jnp.asarray(px))
    assert np.isnan(np.asarray(emb)).all()
    with pytest.raises(ValueError, match="3 image tokens"):
        llava_mod.check_image_tokens(ids, IMAGE_TOKEN, 1, cfg.image_tokens(cfg.vision.grid))


@pytest.mark.parametrize("scan", [False, True])
def test_vit_hidden_states_match_hf(qwen, scan):
    """transformers' CLIP hidden_states[k] for every k (negative too), unscanned and scanned; the gradient reaches
    only the blocks that ran."""
    hf, _ = qwen
    tower = hf.model.vision_tower
    cfg = vit_weights.vit_config_from_hf(tower.config, scan=scan)
    sd = {k: v.detach().numpy() for k, v in tower.state_dict().items()}
    flat = mapping.NameMap(vit_weights.hf_clip_vision_rules(dataclasses.replace(cfg, scan=False))).torch_to_flax(
        sd, ignore=(r".*position_ids",))
    vit = nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0)))
    mapping.load_into(vit, flat)
    px = np.random.default_rng(0).standard_normal((2, 28, 28, 3)).astype(np.float32)
    with torch.no_grad():
        ref = tower(torch.from_numpy(px).permute(0, 3, 1, 2), output_hidden_states=True).hidden_states
    layers = (0, 2, -2, -1, 1, -4)
    got = nnx.jit(lambda m, x: m.hidden_states(x, layers))(vit, jnp.asarray(px))
    for k, g in zip(layers, got):
        np.testing.assert_allclose(np.asarray(g), ref[k].numpy(), atol=TOL, err_msg=str(k))
    if scan:  # the scanned path runs a slice of the stacked params: gradients reach exactly that slice
        grads = nnx.grad(lambda m: jnp.sum(m.hidden_states(jnp.asarray(px), -2)[0] ** 2))(vit)
        fc1 = np.asarray(mapping.flatten_params(grads)["encoder/layers/mlp/fc1/kernel"])
        assert [bool(np.any(x != 0)) for x in fc1] == [True, True, False]


def test_full_strategy_and_feature_layer_list(tmp_path_factory):
    hf, folder = _saved("qwen2", tmp_path_factory, vision_feature_select_strategy="full",
                        vision_feature_layer=[-3, -1])
    model, cfg = llava.load_hf_llava(folder)
    assert cfg.vision_feature_layer == (-3, -1) and cfg.image_tokens(cfg.vision.grid) == 5
    rng = np.random.default_rng(4)
    pixels = rng.standard_normal((1, 28, 28, 3)).astype(np.float32)
    ids = rng.integers(1, IMAGE_TOKEN, size=(1, 9))
    ids[0, 2:7] = IMAGE_TOKEN
    mask = np.ones_like(ids)
    got = nnx.jit(lambda m, p, i, k: m.hidden_states(i, k, p))(model, jnp.asarray(pixels), jnp.asarray(ids),
                                                              jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), _torch_hidden(hf, pixels, ids, mask), atol=TOL)


# ----------------------------------------------------------------------------------------------
# Generation and LoRA.


def test_generate_greedy_matches_transformers(qwen):
    hf, folder = qwen
    model, _ = llava.load_hf_llava(folder)
    rng = np.random.default_rng(5)
    pixels = rng.standard_normal((2, 28, 28, 3)).astype(np.float32)
    ids = rng.integers(1, IMAGE_TOKEN, size=(2, 8))
    ids[:, 3:7] = IMAGE_TOKEN
    mask = np.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # left padding
    got = model.generate_greedy(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels), max_new_tokens=4)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                          pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2), max_new_tokens=4,
                          do_sample=False, pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(got), ref[:, ids.shape[1]:].numpy())


def test_lora_adapter_loads_in_peft(qwen, tmp_path):
    """A trained-looking LoRA (random B) on the LLaVA LM plus a changed projector, exported as a PEFT adapter:
    PeftModel on LlavaForConditionalGeneration gives the port's embeddings."""
    _, folder = qwen
    lora = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    model, cfg = llava.load_hf_llava(folder, lora=lora)
    changed = fx.perturb_lora_and_projector(model, np.random.default_rng(7), 0.05)
    assert len(changed) == 2 * 3 + 4  # 3 LoRA layers x 2 LM layers, projector kernels and biases
    out = llava.export_lora_adapter(model, cfg, tmp_path / "adapter", include_projector=True)
    peft_model, injected = fx.load_with_adapter(transformers.LlavaForConditionalGeneration, folder, out)
    assert injected and all("language_model" in n for n in injected)  # nothing in the CLIP tower

    pixels, ids, mask = llava_verify.verify_inputs(cfg, batch=2, text_len=5, seed=6)
    inputs = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                  pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
    rows = (np.arange(2), [np.flatnonzero(m)[-1] for m in mask])
    last, last_base = fx.with_and_without_adapter(peft_model, inputs, lambda o: o.hidden_states[-1].numpy()[rows])
    assert np.abs(last - last_base).max() > 1e-2  # the adapter (and projector) matter
    ref = last / np.linalg.norm(last, axis=-1, keepdims=True)
    got = nnx.jit(lambda m, p, i, k: m.embed(i, k, p))(model, jnp.asarray(pixels), jnp.asarray(ids),
                                                      jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), ref, atol=TOL)


# ----------------------------------------------------------------------------------------------
# The laptop demo's vision tower.


def test_efficientnet_vision_tower():
    from idmr_jax.models.decoder_lm import DecoderLMConfig
    from idmr_jax.models.efficientnet import LITE0_STAGES, EfficientNetEncoderConfig, EfficientNetLiteConfig

    # A short Lite backbone (one block per stage) that still reaches stride 16.
    stages = tuple((1,) + s[1:] for s in LITE0_STAGES[:4])
    vision = EfficientNetEncoderConfig(backbone=EfficientNetLiteConfig(stages=stages, num_classes=0))
    text = DecoderLMConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1)
    with pytest.raises(ValueError, match="vision_feature_layer"):
        llava_mod.LlavaConfig(vision=vision, text=text, image_token_id=IMAGE_TOKEN)
    cfg = llava_mod.LlavaConfig(vision=vision, text=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=None)
    # Random values without op-by-op init (slow on CPU): abstract module, then numpy draws (positive variances).
    model = nnx.eval_shape(lambda: llava_mod.LlavaEmbedder(cfg, rngs=nnx.Rngs(0)))
    everything = nnx.Any(nnx.Param, nnx.BatchStat)
    rng = np.random.default_rng(0)
    flat = {k: (np.abs(rng.standard_normal(v.shape)) + 0.5 if k.endswith("var") else
                0.2 * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in mapping.flatten_params(nnx.state(model, everything)).items()}
    mapping.load_into(model, flat, variables=everything)
    px = np.random.default_rng(0).standard_normal((1, 32, 32, 3)).astype(np.float32)
    ids = np.full((1, 7), 3)
    ids[0, 1:5] = IMAGE_TOKEN  # 2x2 feature map at stride 16
    mask = np.ones_like(ids)

    @nnx.jit
    def run(m, px, ids, mask):
        tokens = m.vision(px).tokens[:, 1:]  # drop the pooled CLS, as the "default" strategy
        embeds = m.lm.embed(ids).at[:, 1:5].set(m.projector(tokens))
        manual = pooling.pool(m.lm(inputs_embeds=embeds, attention_mask=mask), mask)
        return manual, m.embed(ids, mask, px)

    manual, got = run(model, jnp.asarray(px), jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), np.asarray(manual), atol=1e-6)
