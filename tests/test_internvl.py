"""InternVL2.5 port (IDMR's backbone): parity with transformers' InternVLForConditionalGeneration and
InternVLVisionModel (tiny random, float32, both vision norm types), the convert CLI (verify / import / export round
trip, strict import), the PEFT adapter, the embedder contract, pixel shuffle, and dynamic tiling against
transformers' image processor."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from PIL import Image
from safetensors.numpy import load_file

import mllm_fixtures as fx
from idmr_jax.data import image_tiling
from idmr_jax.models import internvl as internvl_mod
from idmr_jax.models.lora import LoRAConfig
from idmr_jax.weights import internvl, internvl_verify, io, mapping, torch_io

TOL = 1e-4
VOCAB, IMAGE_TOKEN, TILE = 64, 63, 56
# Two tiny configurations that between them cover every option of the tower: the default InternVL2.5 tower
# (LayerNorm, mean pooling = no final norm) read at an inner layer with q/k/v biases and a tied head, and an
# RMSNorm tower with qk-norm and the final LayerNorm read at its last layer, with an untied head.
VARIANTS = {
    "layer_norm": dict(vision=dict(norm_type="layer_norm", attention_bias=True), vision_feature_layer=-2,
                       tie_word_embeddings=True),
    "rms_norm": dict(vision=dict(norm_type="rms_norm", use_qk_norm=True, use_mean_pooling=False),
                     vision_feature_layer=-1, tie_word_embeddings=False),
}


def _is_embedding(name: str) -> bool:
    return ("embed" in name and "patch" not in name) or "cls_token" in name


def _hf_config(variant: str) -> transformers.InternVLConfig:
    spec = VARIANTS[variant]
    vision = transformers.InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, image_size=TILE, patch_size=14, **spec["vision"])
    text = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                                       image_seq_length=4, vision_feature_layer=spec["vision_feature_layer"],
                                       tie_word_embeddings=spec["tie_word_embeddings"])


_MODELS: dict = {}


def _saved(variant: str, tmp_path_factory):
    if variant not in _MODELS:
        _MODELS[variant] = fx.save_random(transformers.InternVLForConditionalGeneration, _hf_config(variant),
                                          tmp_path_factory.mktemp(f"internvl_{variant}"), is_embedding=_is_embedding)
    return _MODELS[variant]


@pytest.fixture(scope="module")
def layer_norm(tmp_path_factory):
    return _saved("layer_norm", tmp_path_factory)


# ----------------------------------------------------------------------------------------------
# Parity.


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_internvit_matches_hf(variant, tmp_path_factory):
    """InternViT alone: every hidden_states[k] and last_hidden_state, at the tile size and (position table
    resized bicubically) at half of it."""
    hf, folder = _saved(variant, tmp_path_factory)
    model, _ = internvl.load_hf_internvl(folder)
    tower = hf.model.vision_tower
    for size in (TILE, TILE // 2):
        pixels = np.random.default_rng(size).standard_normal((3, size, size, 3)).astype(np.float32)
        with torch.no_grad():
            ref = tower(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
        got = np.asarray(nnx.jit(lambda m, p: m(p))(model.vision, jnp.asarray(pixels)))
        assert np.abs(got - ref.last_hidden_state.numpy()).max() <= TOL
        for k in range(-3, 3):
            got = np.asarray(model.vision.hidden_states(jnp.asarray(pixels), k))
            assert np.abs(got - ref.hidden_states[k].numpy()).max() <= TOL, k


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cli_verify(variant, tmp_path_factory):
    """Last hidden states, logits and the pooled embedding on images of 1 and 3 tiles (right and left padded)
    and a text-only batch, through ``python -m idmr_jax.convert verify``."""
    _, folder = _saved(variant, tmp_path_factory)
    rc, out = fx.run_convert(["verify", "--format", "hf_internvl", "--src", str(folder), "--batch", "2"])
    fx.check_verify_output(rc, out, TOL)
    assert internvl_verify.tiles_per_row(2) == [1, 3]


def test_pixel_shuffle_matches_reference(layer_norm):
    hf, _ = layer_norm
    x = np.random.default_rng(0).standard_normal((2, 4, 4, 6)).astype(np.float32)
    ref = hf.model.pixel_shuffle(torch.from_numpy(x), scale_factor=0.5).numpy()
    np.testing.assert_array_equal(np.asarray(internvl_mod.pixel_shuffle(jnp.asarray(x), 0.5)), ref)


# ----------------------------------------------------------------------------------------------
# Import / export.


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_import_export_round_trip_bit_exact(variant, tmp_path_factory, tmp_path):
    _, folder = _saved(variant, tmp_path_factory)
    port, back = tmp_path / "port", tmp_path / "back"
    assert fx.run_convert(["import", "--format", "hf_internvl", "--src", str(folder), "--out", str(port)])[0] == 0
    assert json.loads((port / "model_config.json").read_text())["kind"] == "internvl"
    assert fx.run_convert(["export", "--format", "hf_internvl", "--src", str(port), "--out", str(back)])[0] == 0
    model = fx.check_round_trip(folder, back, transformers.InternVLForConditionalGeneration)
    assert model.config.tie_word_embeddings == VARIANTS[variant]["tie_word_embeddings"]
    rc, out = fx.run_convert(["verify", "--format", "hf_internvl", "--src", str(folder), "--port", str(port)])
    assert rc == 0 and fx.worst_diff(out) <= TOL


def test_config_round_trips(layer_norm):
    _, folder = layer_norm
    cfg = internvl.internvl_config_from_hf(torch_io.read_hf_config(folder))
    assert internvl.internvl_config_from_hf(internvl.hf_internvl_config_dict(cfg)) == cfg
    assert io.config_from_dict(internvl_mod.InternVLConfig, io.config_to_dict(cfg)) == cfg
    assert cfg.tokens_per_image(TILE) == 4 and cfg.feature_dim == 4 * 32


def test_strict_import_names_the_tensor(layer_norm, tmp_path):
    _, folder = layer_norm
    sd = load_file(str(folder / "model.safetensors"))
    sd.pop("vision_tower.encoder.layer.1.lambda_2")
    bad = tmp_path / "bad"
    torch_io.save_torch_state_dict(sd, bad, json.loads((folder / "config.json").read_text()))
    with pytest.raises(mapping.WeightMismatchError, match="lambda_2"):
        internvl.load_hf_internvl(bad)
    rc, _ = fx.run_convert(["import", "--format", "hf_internvl", "--src", str(bad), "--out", str(tmp_path / "o")])
    assert rc == 2
    sd = load_file(str(folder / "model.safetensors"))
    sd["multi_modal_projector.extra.weight"] = np.zeros(3, np.float32)
    torch_io.save_torch_state_dict(sd, bad, json.loads((folder / "config.json").read_text()))
    with pytest.raises(mapping.WeightMismatchError, match="extra.weight"):
        internvl.load_hf_internvl(bad)


# ----------------------------------------------------------------------------------------------
# The embedder contract and the PEFT adapter.


@nnx.jit
def _embed(m, pixels, ids, mask):
    return m.embed(ids, mask, pixels)


@nnx.jit
def _vision_features(m, pixels):
    return m.vision_features(pixels)


def test_embed_from_vision_and_has_image(layer_norm):
    """``embed_from_vision(vision_features(px))`` is ``embed(px)`` for tiles in row-major order; with has_image
    (one single-tile image per row, or none) a mixed batch equals transformers."""
    hf, folder = layer_norm
    model, cfg = internvl.load_hf_internvl(folder)
    pixels, ids, mask = internvl_verify.verify_inputs(cfg, batch=2, text_len=5, seed=3)
    px = jnp.asarray(pixels)
    ref = _embed(model, px, jnp.asarray(ids), jnp.asarray(mask))
    features = _vision_features(model, px)
    assert features.shape == (4, cfg.tokens_per_image(TILE), cfg.feature_dim)
    got = nnx.jit(lambda m, f, i, k: m.embed_from_vision(f, i, k))(model, features, jnp.asarray(ids),
                                                                  jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-6)

    # One tile per row (the trainer's layout), rows 1 and 3 text only: their feature rows are zeroed placeholders.
    rng = np.random.default_rng(4)
    n = cfg.tokens_per_image(TILE)
    ids = rng.integers(1, IMAGE_TOKEN, size=(4, 3 + n))
    ids[0, 1:1 + n] = IMAGE_TOKEN
    ids[2, 2:2 + n] = IMAGE_TOKEN
    mask = np.ones_like(ids)
    mask[1, -2:] = 0
    has_image = jnp.asarray([True, False, True, False])
    got = nnx.jit(lambda m, f, i, k, h: m.embed_from_vision(f, i, k, has_image=h))(
        model, features * has_image[:, None, None], jnp.asarray(ids), jnp.asarray(mask), has_image)
    with torch.no_grad():
        hidden = hf.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                          pixel_values=torch.from_numpy(pixels[[0, 2]]).permute(0, 3, 1, 2)).last_hidden_state
    last = hidden.numpy()[np.arange(4), [np.flatnonzero(m)[-1] for m in mask]]
    np.testing.assert_allclose(np.asarray(got), last / np.linalg.norm(last, axis=-1, keepdims=True), atol=TOL)


def test_lora_adapter_loads_in_peft(layer_norm, tmp_path):
    """A trained-looking LoRA (random B) on the LM plus a changed projector, exported as a PEFT adapter:
    PeftModel on InternVLForConditionalGeneration gives the port's logits."""
    _, folder = layer_norm
    lora = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    model, cfg = internvl.load_hf_internvl(folder, lora=lora)
    changed = fx.perturb_lora_and_projector(model, np.random.default_rng(7), 0.05)
    assert len(changed) == 2 * 3 + 6  # 3 LoRA layers x 2 LM layers; projector norm, kernels and biases
    out = internvl.export_lora_adapter(model, cfg, tmp_path / "adapter", include_projector=True)
    peft_model, injected = fx.load_with_adapter(transformers.InternVLForConditionalGeneration, folder, out)
    assert injected and all("language_model" in n for n in injected)  # nothing in InternViT

    pixels, ids, mask = internvl_verify.verify_inputs(cfg, batch=2, text_len=5, seed=6)
    inputs = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                  pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
    ref, ref_base = fx.with_and_without_adapter(peft_model, inputs, lambda o: o.logits.numpy())
    valid = mask.astype(bool)
    assert np.abs(ref - ref_base)[valid].max() > 1e-2  # the adapter (and projector) matter
    got = nnx.jit(lambda m, p, i, k: m.logits(i, k, p))(model, jnp.asarray(pixels), jnp.asarray(ids),
                                                       jnp.asarray(mask))
    assert np.abs(np.asarray(got) - ref)[valid].max() <= TOL


# ----------------------------------------------------------------------------------------------
# Dynamic tiling.


@pytest.mark.parametrize("height,width,max_tiles", [(60, 200, 6), (200, 60, 6), (100, 100, 6), (90, 130, 12),
                                                    (30, 40, 4), (57, 300, 12)])
def test_tiling_matches_the_image_processor(height, width, max_tiles):
    """Tiles, their order and count equal GotOcr2ImageProcessor's (InternVL's, crop_to_patches=True; the PIL
    backend, the one transformers picks without torchvision) bit for bit: grids 3x1, 1x3, 2x2, 3x2, 1x1, 5x1."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    rng = np.random.default_rng(height * 1000 + width)
    image = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
    proc = GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, crop_to_patches=True, min_patches=1,
                                    max_patches=max_tiles, image_mean=list(image_tiling.IMAGENET_MEAN),
                                    image_std=list(image_tiling.IMAGENET_STD))
    ref = proc(images=[image], return_tensors="np")
    got, n = image_tiling.dynamic_tiles(image, tile_size=TILE, max_tiles=max_tiles)
    assert n == int(ref["num_patches"][0]) == proc.get_number_of_image_patches(
        height, width, {"crop_to_patches": True, "max_patches": max_tiles})
    np.testing.assert_array_equal(got, ref["pixel_values"].transpose(0, 2, 3, 1))  # bit-exact


def test_tiling_grid_and_order():
    columns, rows = image_tiling.optimal_grid(100, 300, 448, 1, 12)
    assert (columns, rows) == (3, 1)
    # A 2x2 grid of flat colours: the tiles come row-major, then the thumbnail.
    img = np.zeros((112, 112, 3), np.uint8)
    img[:56, 56:] = 80
    img[56:, :56] = 160
    img[56:, 56:] = 240
    tiles, n = image_tiling.tile_image(img, tile_size=56, min_tiles=4, max_tiles=4)
    assert n == 5 and tiles.shape == (5, 56, 56, 3)
    assert [int(t[28, 28, 0]) for t in tiles[:4]] == [0, 80, 160, 240]
    single, n1 = image_tiling.tile_image(img, tile_size=56, max_tiles=1)
    assert n1 == 1 and single.shape == (1, 56, 56, 3)  # one tile: no thumbnail
    with pytest.raises(ValueError):
        image_tiling.tile_image(img.astype(np.float32))


def test_sharded_embed_and_gradient_on_a_4x2_mesh(layer_norm):
    """The embedder under the default sharding rules on a 4 (fsdp) x 2 (model) mesh: transformers' embeddings, and
    a finite gradient reaching the vision tower, the projector and the LM."""
    import jax

    from idmr_jax import sharding

    hf, folder = layer_norm
    model, cfg = internvl.load_hf_internvl(folder)
    pixels, ids, mask = internvl_verify.verify_inputs(cfg, batch=4, text_len=5, seed=8)
    args = (jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask))
    with torch.no_grad():
        hidden = hf.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                          pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).last_hidden_state.numpy()
    last = hidden[np.arange(4), [np.flatnonzero(m)[-1] for m in mask]]
    want = last / np.linalg.norm(last, axis=-1, keepdims=True)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "model": 2})
    rules = sharding.DEFAULT_RULES
    graphdef, state = nnx.split(model)
    sharded = nnx.merge(graphdef, jax.device_put(state, sharding.state_shardings(state, mesh, rules)))

    @nnx.jit
    def loss_and_grad(m, px, i, a):
        def loss(m):
            with sharding.axis_rules(mesh, rules):
                emb = m.embed(i, a, px)
            return jnp.sum(emb * jnp.roll(emb, 1, axis=0)), emb

        return nnx.value_and_grad(loss, has_aux=True)(m)

    (_, got), grads = loss_and_grad(sharded, *args)
    np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)
    flat = {k: np.asarray(v) for k, v in mapping.flatten_params(grads).items()}
    assert all(np.isfinite(v).all() for v in flat.values())
    for prefix in ("vision/", "projector/", "lm/"):
        assert max(np.abs(v).max() for k, v in flat.items() if k.startswith(prefix)) > 0, prefix


def test_vision_remat_keeps_gradients(layer_norm):
    import jax

    _, folder = layer_norm
    px = jnp.asarray(np.random.default_rng(9).standard_normal((2, TILE, TILE, 3)).astype(np.float32))

    def grads(remat):
        model, _ = internvl.load_hf_internvl(folder, remat=remat)
        g = nnx.jit(nnx.grad(lambda m: jnp.sum(jnp.sin(m.vision_features(px)))))(model)
        return {k: np.asarray(v) for k, v in mapping.flatten_params(g).items() if k.startswith("vision/")}

    plain, remat = grads("none"), grads("full")
    assert set(plain) == set(remat)
    for k in plain:
        np.testing.assert_allclose(remat[k], plain[k], atol=1e-6, rtol=1e-5, err_msg=k)
    assert jax.tree.leaves(plain)
