"""Qwen2-VL embedder: parity with transformers' Qwen2VLForConditionalGeneration (tiny random, float32) on images of
different sizes, the vision tower and the M-RoPE position ids alone, the reference preprocessing, the convert CLI
(verify / import / export round trip, strict loading), a PEFT LoRA adapter, and the fixed-size embedder contract
the shared trainer uses."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

import mllm_fixtures as fx
from idmr_jax.models import qwen2vl_inputs as qi
from idmr_jax.models.decoder_lm import DecoderLM, DecoderLMConfig
from idmr_jax.models.lora import LoRAConfig
from idmr_jax.models.qwen2vl import packed_inputs
from idmr_jax.weights import io, mapping, qwen2vl, qwen2vl_verify, torch_io

TOL = 1e-4
VOCAB, IMAGE, VIDEO, START, END, EMB = 96, 90, 91, 92, 93, 89


def _hf_config() -> transformers.Qwen2VLConfig:
    vision = dict(depth=2, embed_dim=32, hidden_size=48, mlp_ratio=2, num_heads=4, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    # head_dim 12: M-RoPE sections (2, 1, 3) of its 6 frequencies, unequal so that a mixed-up axis shows.
    text = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 3], "rope_theta": 10000.0})
    return transformers.Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE,
                                      video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2vl")
    return fx.save_random(transformers.Qwen2VLForConditionalGeneration, _hf_config(), folder,
                          is_embedding=lambda name: "embed_tokens" in name)


@pytest.fixture(scope="module")
def port(saved):
    return qwen2vl.load_hf_qwen2vl(saved[1], pooling="before_token", pooling_token_id=EMB)


# ----------------------------------------------------------------------------------------------
# Parity: the whole model (CLI verify), the vision tower, the position ids.


def test_cli_verify(saved):
    rc, out = fx.run_convert(["verify", "--format", "hf_qwen2vl", "--src", str(saved[1]), "--batch", "3"])
    lines = fx.check_verify_output(rc, out, TOL)
    assert any("images+text/left" in line for line in lines) and any("text/right" in line for line in lines)


def test_verify_batch_has_different_image_sizes(port):
    _, cfg = port
    patches, grid_thw, ids, mask = qwen2vl_verify.verify_inputs(cfg, batch=2)
    tokens = grid_thw.prod(-1) // 4
    assert tokens[0] != tokens[1] and (ids == IMAGE).sum(1).tolist() == tokens.tolist()
    assert patches.shape == (grid_thw.prod(-1).sum(), cfg.vision.patch_dim) and (mask[1] == 0).any()


def test_vision_tower_matches_transformers(saved, port):
    hf, _ = saved
    model, cfg = port
    patches, grid_thw, _, _ = qwen2vl_verify.verify_inputs(cfg, batch=3)
    with torch.no_grad():
        ref = hf.model.visual(torch.from_numpy(patches), grid_thw=torch.from_numpy(grid_thw))
    arrays = packed_inputs(cfg, np.zeros((1, 1), np.int64), None, grid_thw)
    feats = model.vision(jnp.asarray(patches)[None], jnp.asarray(arrays["vision_positions"])[None],
                                jnp.asarray(arrays["vision_segments"])[None])
    np.testing.assert_allclose(np.asarray(feats[0]), ref.last_hidden_state.numpy(), atol=TOL)
    np.testing.assert_allclose(np.asarray(model.projector(feats)[0]), ref.pooler_output.numpy(), atol=TOL)
    # The trainer's freeze_vision / train_projector regexes (^vision/, ^projector/) select the tower / the merger.
    assert {k.split("/")[0] for k in mapping.flatten_params(model)} == {"vision", "projector", "lm"}
    # Without the segment mask the images would see each other: the mask matters.
    unmasked = model.vision(jnp.asarray(patches)[None], jnp.asarray(arrays["vision_positions"])[None])
    assert np.abs(np.asarray(unmasked[0]) - ref.last_hidden_state.numpy()).max() > 1e-2


@pytest.mark.parametrize("padding", ["right", "left"])
def test_position_ids_equal_get_rope_index(saved, port, padding):
    hf, _ = saved
    _, cfg = port
    _, grid_thw, ids, mask = qwen2vl_verify.verify_inputs(cfg, batch=4, seed=3, padding=padding)
    ref_pos, ref_delta = hf.model.get_rope_index(
        torch.from_numpy(ids), mm_token_type_ids=torch.from_numpy((ids == IMAGE).astype(np.int64)),
        image_grid_thw=torch.from_numpy(grid_thw), attention_mask=torch.from_numpy(mask))
    pos, delta = qi.rope_index(ids, mask, grid_thw, image_token_id=IMAGE, spatial_merge_size=2)
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    np.testing.assert_array_equal(delta, ref_delta.numpy()[:, 0])


def test_fixed_grid_rope_index_equals_reference(saved):
    """Two same-size images in one row, a text-only row, left padding: the jittable builder equals
    get_rope_index."""
    hf, _ = saved
    img = [START] + [IMAGE] * 4 + [END]
    ids = np.array([[5] + img + [6, 7] + img + [8], [0] * 6 + list(range(9, 19))], np.int64)
    mask = np.array([[1] * 16, [0] * 6 + [1] * 10], np.int64)
    grid = np.array([[1, 4, 4]] * 2, np.int64)
    ref, _ = hf.model.get_rope_index(torch.from_numpy(ids), mm_token_type_ids=torch.from_numpy(
        (ids == IMAGE).astype(np.int64)), image_grid_thw=torch.from_numpy(grid), attention_mask=torch.from_numpy(mask))
    got = jax.jit(lambda i, m: qi.fixed_grid_rope_index(i, m, image_token_id=IMAGE, grid=(2, 2)))(ids, mask)
    np.testing.assert_array_equal(np.asarray(got), ref.numpy())


# ----------------------------------------------------------------------------------------------
# Preprocessing.


def test_smart_resize_and_patchify_match_the_reference_processor():
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as ref

    for h, w in [(28, 28), (50, 70), (300, 17), (1000, 1200), (5000, 4000), (29, 4000)]:
        kw = dict(factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
        assert qi.smart_resize(h, w, **kw) == ref.smart_resize(h, w, **kw)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(56, 84, 3)).astype(np.uint8)
    proc = ref.Qwen2VLImageProcessorPil(do_resize=False)
    out = proc(images=[image], return_tensors="np")
    patches, grid = qi.patchify_images([qi.normalize(image)])
    assert grid.tolist() == out["image_grid_thw"].tolist() == [[1, 4, 6]]
    np.testing.assert_allclose(patches, out["pixel_values"], atol=1e-5)
    fixed = qi.patchify_fixed(jnp.asarray(qi.normalize(image))[None], patch_size=14, merge_size=2,
                              temporal_patch_size=2)
    np.testing.assert_array_equal(np.asarray(fixed[0]), patches)
    assert qi.vision_segments([[1, 2, 2], [2, 2, 4]]).tolist() == [0] * 4 + [1] * 8 + [2] * 8


# ----------------------------------------------------------------------------------------------
# Import / export.


def test_verify_of_a_missing_folder_is_a_clear_error(tmp_path, capsys):
    """Not a transformers hub id: a one-line error naming the path, exit status 2."""
    rc, _ = fx.run_convert(["verify", "--format", "hf_qwen2vl", "--src", str(tmp_path / "nowhere")])
    assert rc == 2 and f"{tmp_path / 'nowhere'}: no such checkpoint folder" in capsys.readouterr().err


def test_import_export_round_trip_bit_exact(saved, tmp_path):
    _, folder = saved
    port, back = tmp_path / "port", tmp_path / "back"
    assert fx.run_convert(["import", "--format", "hf_qwen2vl", "--src", str(folder), "--out", str(port)])[0] == 0
    assert json.loads((port / "model_config.json").read_text())["kind"] == "qwen2vl"
    assert fx.run_convert(["export", "--format", "hf_qwen2vl", "--src", str(port), "--out", str(back)])[0] == 0
    model = fx.check_round_trip(folder, back, transformers.Qwen2VLForConditionalGeneration)
    assert model.config.text_config.rope_parameters["mrope_section"] == [2, 1, 3]
    rc, out = fx.run_convert(["verify", "--format", "hf_qwen2vl", "--src", str(folder), "--port", str(port)])
    assert rc == 0 and fx.worst_diff(out) <= TOL


def test_module_layout_and_strict_import(saved, tmp_path):
    hf, folder = saved
    cfg_json = json.loads((folder / "config.json").read_text())
    module_sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    assert qwen2vl.detect_layout(module_sd) == "module"
    torch_io.save_torch_state_dict(module_sd, tmp_path / "module", cfg_json)
    model, _ = qwen2vl.load_hf_qwen2vl(tmp_path / "module")
    np.testing.assert_array_equal(np.asarray(model.projector.fc2.bias[...]),
                                  module_sd["model.visual.merger.mlp.2.bias"])
    sd = load_file(str(folder / "model.safetensors"))
    sd.pop("visual.merger.mlp.2.bias")
    sd["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
    torch_io.save_torch_state_dict(sd, tmp_path / "bad", cfg_json)
    with pytest.raises(mapping.WeightMismatchError, match=r"visual\.merger\.mlp\.2\.bias"):
        qwen2vl.load_hf_qwen2vl(tmp_path / "bad")
    sd["visual.merger.mlp.2.bias"] = np.zeros(48, np.float32)
    torch_io.save_torch_state_dict(sd, tmp_path / "bad", cfg_json)
    with pytest.raises(mapping.WeightMismatchError, match="extra.weight"):
        qwen2vl.load_hf_qwen2vl(tmp_path / "bad")


def test_lora_adapter_loads_in_peft(saved, tmp_path):
    """A trained-looking LoRA (random B) on the LM and a changed merger (projector), exported as a PEFT adapter:
    PeftModel on Qwen2VLForConditionalGeneration gives the port's logits."""
    _, folder = saved
    lora = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "o_proj", "down_proj", "lm_head"))
    model, cfg = qwen2vl.load_hf_qwen2vl(folder, lora=lora)
    changed = fx.perturb_lora_and_projector(model, np.random.default_rng(7), 0.1)
    assert len(changed) == 4 * 2 + 1 + 6  # 4 LoRA layers x 2 LM layers, lm_head, merger ln_q / fc1 / fc2
    out = qwen2vl.export_lora_adapter(model, cfg, tmp_path / "adapter", include_projector=True)
    peft_model, injected = fx.load_with_adapter(transformers.Qwen2VLForConditionalGeneration, folder, out)
    assert len(injected) == 9 and all("language_model" in n or n.endswith("lm_head.lora_A") for n in injected)

    patches, grid_thw, ids, mask = qwen2vl_verify.verify_inputs(cfg, batch=2, seed=6)
    kw = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
              pixel_values=torch.from_numpy(patches), image_grid_thw=torch.from_numpy(grid_thw),
              mm_token_type_ids=torch.from_numpy((ids == IMAGE).astype(np.int64)))
    ref, ref_base = fx.with_and_without_adapter(peft_model, kw, lambda o: o.logits.numpy())
    valid = mask.astype(bool)
    assert np.abs(ref - ref_base)[valid].max() > 1e-2  # the adapter matters
    got = qwen2vl_verify.port_outputs(model, patches, grid_thw, ids, mask)["logits"]
    np.testing.assert_allclose(got[valid], ref[valid], atol=TOL)
    # The same through `convert export --lora-adapter`: the base with its LoRA left out (not merged), the adapter
    # in OUT/lora_adapter (the changed merger is part of the base).
    io.save_model(tmp_path / "port", model, cfg, kind="qwen2vl")
    rc, _ = fx.run_convert(["export", "--format", "hf_qwen2vl", "--src", str(tmp_path / "port"), "--out",
                            str(tmp_path / "hf"), "--lora-adapter"])
    assert rc == 0
    cli, _ = fx.load_with_adapter(transformers.Qwen2VLForConditionalGeneration, tmp_path / "hf",
                                  tmp_path / "hf" / "lora_adapter")
    with torch.no_grad():
        np.testing.assert_allclose(cli(**kw).logits.numpy()[valid], got[valid], atol=TOL)


# ----------------------------------------------------------------------------------------------
# The fixed-size embedder contract (the shared trainer's path).


def _fixed_batch(cfg, seed=0, size=(56, 56)):
    """Two same-size images (56 px: 4 LM tokens each), rows right-padded, each with an <emb> token."""
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((2, *size, 3)).astype(np.float32)
    lh, lw = cfg.token_grid(*size)
    img = [START] + [IMAGE] * (lh * lw) + [END]
    rows = [[3] + img + [4, 5, 6, EMB, 7], [8] + img + [9, EMB, 10]]
    ids = np.zeros((2, len(rows[0])), np.int64)
    mask = np.zeros((2, len(rows[0])), np.int64)
    for b, row in enumerate(rows):
        ids[b, :len(row)], mask[b, :len(row)] = row, 1
    return pixels, ids, mask


@pytest.mark.parametrize("size", [(56, 56), (56, 84)])
def test_fixed_size_path_matches_transformers_and_packed(saved, port, size):
    hf, _ = saved
    model, cfg = port
    assert cfg.tokens_per_image(56) == 4 and cfg.tokens_per_image(448) == 256
    pixels, ids, mask = _fixed_batch(cfg, size=size)
    hidden = nnx.jit(lambda m, i, k, p: m.hidden_states(i, k, p))(model, ids, mask, pixels)
    patches, grid_thw = qi.patchify_images(list(pixels))
    packed = model.hidden_states_for_grids(ids, mask, patches, grid_thw)
    with torch.no_grad():
        ref = hf.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                       pixel_values=torch.from_numpy(patches), image_grid_thw=torch.from_numpy(grid_thw),
                       mm_token_type_ids=torch.from_numpy((ids == IMAGE).astype(np.int64))).last_hidden_state
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[valid], ref.numpy()[valid], atol=TOL)
    np.testing.assert_allclose(np.asarray(packed)[valid], np.asarray(hidden)[valid], atol=1e-5)
    # LamRA's pooling: the hidden state just before <emb>.
    emb = nnx.jit(lambda m, i, k, p: m.embed(i, k, p))(model, ids, mask, pixels)
    before = ref.numpy()[np.arange(2), [np.flatnonzero(r == EMB)[0] - 1 for r in ids]]
    np.testing.assert_allclose(np.asarray(emb), before / np.linalg.norm(before, axis=-1, keepdims=True), atol=TOL)


def test_embed_from_vision_contract(port):
    model, cfg = port
    pixels, ids, mask = _fixed_batch(cfg, seed=1)
    ids, mask, pixels = jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels)
    feats = model.vision_features(pixels)
    assert feats.shape == (2, 16, cfg.vision.embed_dim)
    full = model.embed(ids, mask, pixels)
    np.testing.assert_allclose(np.asarray(model.embed_from_vision(feats, ids, mask)), np.asarray(full), atol=1e-6)
    # A mixed batch: row 0 keeps its image, row 1 is text only (its image tokens become text, its slot is zeros).
    text_ids = jnp.where(ids[1] == IMAGE, 11, ids[1])
    mixed_ids = jnp.stack([ids[0], text_ids])
    has_image = jnp.array([True, False])
    slots = jnp.where(has_image[:, None, None], feats, 0.0)
    mixed = model.embed_from_vision(slots, mixed_ids, mask, has_image=has_image)
    np.testing.assert_allclose(np.asarray(mixed[0]), np.asarray(full[0]), atol=1e-6)
    alone = model.embed(mixed_ids[1:], mask[1:])
    np.testing.assert_allclose(np.asarray(mixed[1]), np.asarray(alone[0]), atol=1e-5)


def test_mrope_with_equal_rows_is_the_1d_rope():
    """DecoderLMConfig.mrope_section is off by default; with it, [B, T] positions (three equal rows) reproduce the
    1D rope, and [3, B, T] positions with different rows change the outputs."""
    cfg = DecoderLMConfig(vocab_size=32, hidden_size=48, intermediate_size=64, num_heads=4, num_kv_heads=2)
    m1 = DecoderLM(cfg, rngs=nnx.Rngs(0))
    m3 = DecoderLM(dataclasses.replace(cfg, mrope_section=(2, 1, 3)), rngs=nnx.Rngs(0))
    ids = jnp.arange(14).reshape(2, 7) % 32
    pos = jnp.broadcast_to(jnp.arange(7)[None] + 2, (2, 7))
    run = nnx.jit(lambda m, p: m(ids, position_ids=p))
    np.testing.assert_array_equal(np.asarray(run(m1, pos)), np.asarray(run(m3, pos)))
    three = jnp.stack([pos, pos * 2, pos + 5])
    assert np.abs(np.asarray(run(m3, three)) - np.asarray(run(m1, pos))).max() > 1e-3
    with pytest.raises(ValueError, match="mrope_section"):
        DecoderLMConfig(hidden_size=48, num_heads=4, mrope_section=(2, 2, 3))


def test_config_from_transformers_4_layout(saved):
    """The released checkpoints' config.json (transformers 4.x: text fields at the top level, rope_scaling of type
    "mrope", vision in_chans) translates to the same config as 5.23's nested one, and back."""
    _, folder = saved
    nested = json.loads((folder / "config.json").read_text())
    text = dict(nested["text_config"])
    rope = text.pop("rope_parameters")
    vision = {k: v for k, v in nested["vision_config"].items() if k not in ("in_channels", "rope_parameters")}
    flat = {**{k: v for k, v in nested.items() if k != "text_config"}, **text, "model_type": "qwen2_vl",
            "vision_config": {**vision, "in_chans": 3}, "rope_theta": rope["rope_theta"],
            "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}}
    cfg = qwen2vl.qwen2vl_config_from_hf(nested)
    assert qwen2vl.qwen2vl_config_from_hf(flat) == cfg
    assert cfg.text.mrope_section == (2, 1, 3) and cfg.vision_start_token_id == START
    assert qwen2vl.qwen2vl_config_from_hf(qwen2vl.hf_qwen2vl_config_dict(cfg)) == cfg
