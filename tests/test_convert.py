"""End-to-end tests of checkpoint IO and `python -m idmr_jax.convert` against transformers (tiny random models)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from jax_env import subprocess_env
from idmr_jax import convert
from idmr_jax.weights import io, torch_io
from idmr_jax.weights.blip2 import convert as blip2_convert

REPO = Path(__file__).resolve().parents[1]


def _perturb(model: torch.nn.Module, seed: int) -> None:
    # transformers initialises biases to 0 and LayerNorms to 1; noise on every tensor makes a swapped or dropped
    # bias / norm visible in the outputs.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _tiny_blip2_config() -> transformers.Blip2Config:
    vision = transformers.Blip2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, patch_size=14, image_size=56)
    qformer = transformers.Blip2QFormerConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                              intermediate_size=128, cross_attention_frequency=2,
                                              encoder_hidden_size=64, vocab_size=99, max_position_embeddings=32,
                                              use_qformer_text_input=True)
    return transformers.Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                                    num_query_tokens=8, image_text_hidden_size=32, use_qformer_text_input=True)


def _make_blip2(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = transformers.Blip2ForImageTextRetrieval(_tiny_blip2_config()).eval()
    _perturb(model, seed)
    with torch.no_grad():  # BLIP-2's EVA attention has no key bias (LAVIS stores q_bias / v_bias only)
        for layer in model.vision_model.encoder.layers:
            d = layer.self_attn.qkv.bias.shape[0] // 3
            layer.self_attn.qkv.bias[d:2 * d] = 0
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_blip2(tmp_path_factory) -> Path:
    return _make_blip2(tmp_path_factory.mktemp("hf_blip2"), seed=0)


@pytest.fixture(scope="module")
def imported(hf_blip2, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "ckpt"
    assert convert.main(["import", "--format", "hf_blip2", "--src", str(hf_blip2), "--out", str(out)]) == 0
    return out


def _safetensors(path: Path) -> dict[str, np.ndarray]:
    return torch_io.load_torch_state_dict(path)


def _last_line_diff(stdout: str) -> float:
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("max_abs_diff="), stdout
    return float(last.split("=", 1)[1])


# ----------------------------------------------------------------------------------------------
# State dict IO.


def test_torch_state_dict_formats_keep_dtypes(tmp_path):
    bf16 = torch.randn(3, 5).to(torch.bfloat16)
    sd = {"a.weight": bf16, "b.bias": torch.arange(4, dtype=torch.int64), "c": torch.randn(2, 2)}
    # LAVIS-style training checkpoint: weights under "model", next to non-tensor entries.
    torch.save({"model": sd, "epoch": 3, "config": {"lr": 1e-5}}, tmp_path / "ckpt.pth")
    got = torch_io.load_torch_state_dict(tmp_path / "ckpt.pth")
    assert got["a.weight"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got["a.weight"].view(np.int16), bf16.view(torch.int16).numpy())
    np.testing.assert_array_equal(got["b.bias"], np.arange(4))

    torch_io.save_torch_state_dict(got, tmp_path / "st", {"model_type": "test"})
    assert json.loads((tmp_path / "st" / "config.json").read_text()) == {"model_type": "test"}
    back = torch_io.load_torch_state_dict(tmp_path / "st")
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == got[k].dtype and back[k].tobytes() == got[k].tobytes(), k
    assert torch_io.load_torch_state_dict(tmp_path / "st", float_dtype=np.float32)["a.weight"].dtype == np.float32
    assert torch_io.safetensors_header(tmp_path / "st" / "model.safetensors")["__metadata__"] == {"format": "pt"}


def test_sharded_safetensors_folder(tmp_path, hf_blip2):
    model = transformers.Blip2ForImageTextRetrieval.from_pretrained(hf_blip2)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    got, ref = torch_io.load_torch_state_dict(tmp_path), _safetensors(hf_blip2)
    assert set(got) == set(ref)
    assert all(np.array_equal(got[k], ref[k]) for k in ref)


# ----------------------------------------------------------------------------------------------
# hf_blip2: verify, import/export.


@pytest.mark.slow  # a fresh interpreter: imports, first-call op compilation and jit (~30-70 s on 2 busy cores)
def test_verify_cli_subprocess(hf_blip2):
    env = subprocess_env(devices=1)
    proc = subprocess.run([sys.executable, "-m", "idmr_jax.convert", "verify", "--format", "hf_blip2",
                           "--src", str(hf_blip2)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    for name in ("vision_tokens", "qformer_image ", "qformer_image_text", "text_features", "itm_logits"):
        assert any(line.startswith(name) for line in lines), proc.stdout
    assert _last_line_diff(proc.stdout) <= 1e-4


def test_import_export_bit_exact_and_strict_transformers_load(hf_blip2, imported, tmp_path):
    meta = json.loads((imported / io.MODEL_CONFIG_FILE).read_text())
    assert meta["kind"] == "blip2" and meta["config"]["num_query_tokens"] == 8
    out = tmp_path / "hf_out"
    assert convert.main(["export", "--format", "hf_blip2", "--src", str(imported), "--out", str(out)]) == 0
    ref, got = _safetensors(hf_blip2), _safetensors(out)
    assert set(got) == set(ref), (sorted(set(ref) - set(got)), sorted(set(got) - set(ref)))
    for k in ref:
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape, k
        assert got[k].tobytes() == ref[k].tobytes(), f"{k} differs"

    model, info = transformers.Blip2ForImageTextRetrieval.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    original = transformers.Blip2ForImageTextRetrieval.from_pretrained(hf_blip2).config
    for key in ("num_query_tokens", "image_text_hidden_size", "use_qformer_text_input"):
        assert getattr(model.config, key) == getattr(original, key), key
    assert model.config.qformer_config.use_qformer_text_input


def test_restore_model_runs_like_the_import(imported, hf_blip2):
    module, cfg = io.restore_model(imported)
    assert cfg.num_query_tokens == 8 and cfg.qformer.num_layers == 4
    ref = _safetensors(hf_blip2)
    np.testing.assert_array_equal(np.asarray(module.query_tokens[...]), ref["query_tokens"][0])
    # Export needs no module: the flat params come straight from Orbax.
    kind, _, flat = io.restore_params(imported)
    assert kind == "blip2" and "qformer/layers/0/crossattention/key/kernel" in flat

    # Straight into a sharded layout on the 8 fake devices (the odd test vocabulary, like BLIP-2's 30523, is
    # replicated along the axis it cannot be split on).
    from idmr_jax import sharding as shd
    from idmr_jax.weights.mapping import flatten_params

    mesh = shd.make_mesh({"data": 1, "fsdp": 4, "model": 2})
    sharded, _ = io.restore_model(imported, mesh=mesh, rules=shd.DEFAULT_RULES)
    got = flatten_params(sharded)
    assert set(got) == set(flat)
    assert all(np.array_equal(np.asarray(got[k]), flat[k]) for k in flat)
    kernel = got["qformer/layers/0/ffn/intermediate/kernel"]
    assert tuple(kernel.sharding.spec) == ("fsdp", "model") and len(kernel.addressable_shards) == 8


def test_import_torch_bin_state_dict_with_config_flag(hf_blip2, imported, tmp_path):
    # A bare .bin state dict (read with weights_only=True) in a folder without config.json, plus --config.
    sd = transformers.Blip2ForImageTextRetrieval.from_pretrained(hf_blip2).state_dict()
    torch.save(sd, tmp_path / "weights.bin")
    out = tmp_path / "from_bin"
    assert convert.main(["import", "--format", "hf_blip2", "--src", str(tmp_path / "weights.bin"),
                         "--config", str(hf_blip2 / "config.json"), "--out", str(out)]) == 0
    _, cfg_a, a = io.restore_params(imported)
    _, cfg_b, b = io.restore_params(out)
    assert cfg_a == cfg_b and set(a) == set(b)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_verify_fails_on_mismatched_weights(hf_blip2, imported, tmp_path, capsys):
    other = _make_blip2(tmp_path / "other", seed=1)
    # The port restored from `imported` (seed-0 weights) against the seed-1 reference: must be caught.
    code = convert.main(["verify", "--format", "hf_blip2", "--src", str(other), "--port", str(imported)])
    out = capsys.readouterr()
    assert code == 1, out.out + out.err
    assert _last_line_diff(out.out) > 1e-2
    # The same import against its own source passes.
    assert convert.main(["verify", "--format", "hf_blip2", "--src", str(hf_blip2), "--port", str(imported)]) == 0
    assert _last_line_diff(capsys.readouterr().out) <= 1e-4


def test_verify_bfloat16_within_documented_tolerance(hf_blip2, capsys):
    assert convert.main(["verify", "--format", "hf_blip2", "--src", str(hf_blip2), "--dtype", "bfloat16"]) == 0
    diff = _last_line_diff(capsys.readouterr().out)
    assert 0 < diff <= convert.DEFAULT_TOL["bfloat16"]


def _folder_with(src: Path, dst: Path, sd: dict[str, np.ndarray]) -> Path:
    torch_io.save_torch_state_dict(sd, dst)
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def test_import_is_strict_and_names_the_tensor(hf_blip2, tmp_path, capsys):
    sd = _safetensors(hf_blip2)
    victim = "qformer.encoder.layer.2.crossattention.attention.key.weight"
    missing = _folder_with(hf_blip2, tmp_path / "missing", {k: v for k, v in sd.items() if k != victim})
    assert convert.main(["import", "--format", "hf_blip2", "--src", str(missing), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert victim in err and "missing" in err

    extra = _folder_with(hf_blip2, tmp_path / "extra", {**sd, "qformer.encoder.layer.9.extra.weight": sd[victim]})
    assert convert.main(["import", "--format", "hf_blip2", "--src", str(extra), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "qformer.encoder.layer.9.extra.weight" in err and "unexpected" in err

    bad = dict(sd)
    bad[victim] = sd[victim][:, :32]
    wrong = _folder_with(hf_blip2, tmp_path / "wrong", bad)
    assert convert.main(["import", "--format", "hf_blip2", "--src", str(wrong), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert victim in err and "(64, 32)" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_import_generation_checkpoint_parts(tmp_path, capsys):
    cfg = _tiny_blip2_config()
    cfg.qformer_config.use_qformer_text_input = False
    cfg.use_qformer_text_input = False
    cfg.text_config = transformers.OPTConfig(vocab_size=99, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                             num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=16)
    torch.manual_seed(0)
    model = transformers.Blip2ForConditionalGeneration(cfg).eval()
    model.save_pretrained(tmp_path / "gen")
    out = tmp_path / "gen_imported"
    assert convert.main(["import", "--format", "hf_blip2", "--src", str(tmp_path / "gen"), "--out", str(out)]) == 0
    assert "Freshly initialised" in capsys.readouterr().err
    _, _, flat = io.restore_params(out)
    sd = _safetensors(tmp_path / "gen")
    np.testing.assert_array_equal(flat["query_tokens"], sd["query_tokens"][0])
    value = sd["qformer.encoder.layer.2.crossattention.attention.value.weight"].T
    np.testing.assert_array_equal(flat["qformer/layers/2/crossattention/value/kernel"].reshape(value.shape), value)
    fresh = json.loads((out / io.MODEL_CONFIG_FILE).read_text())["source"]["freshly_initialised"]
    assert "qformer/word_embeddings/embedding" in fresh and "itm_head/kernel" in fresh


# ----------------------------------------------------------------------------------------------
# LAVIS.


def test_lavis_export_import_round_trip(imported, tmp_path):
    lavis = tmp_path / "lavis"
    assert convert.main(["export", "--format", "lavis_blip2", "--src", str(imported), "--out", str(lavis)]) == 0
    sd = _safetensors(lavis)
    assert "Qformer.bert.encoder.layer.0.crossattention.self.key.weight" in sd and "temp" in sd
    assert any(k.startswith("visual_encoder.blocks.1.") for k in sd) and "ln_vision.weight" in sd

    back = tmp_path / "back"
    assert convert.main(["import", "--format", "lavis_blip2", "--src", str(lavis / "model.safetensors"),
                         "--out", str(back)]) == 0
    _, cfg_a, a = io.restore_params(imported)
    _, cfg_b, b = io.restore_params(back)
    assert cfg_a == cfg_b
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_lavis_config_inferred_from_shapes(imported, tmp_path):
    lavis = tmp_path / "lavis"
    convert.export_checkpoint("lavis_blip2", imported, lavis)
    _, cfg, _ = io.restore_params(imported)
    inferred = blip2_convert.infer_lavis_config(_safetensors(lavis))
    # Head counts are not in the shapes (documented convention: width // 64); everything else is.
    expected = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, num_heads=1),
                                   qformer=dataclasses.replace(cfg.qformer, num_heads=1))
    assert inferred.num_query_tokens == expected.num_query_tokens and inferred.embed_dim == expected.embed_dim
    for sub in ("vision", "qformer"):
        a, b = getattr(inferred, sub), getattr(expected, sub)
        for f in dataclasses.fields(a):
            if f.name not in ("initializer_range", "hidden_dropout", "attention_dropout", "layer_norm_eps"):
                assert getattr(a, f.name) == getattr(b, f.name), (sub, f.name)


# ----------------------------------------------------------------------------------------------
# CLIP vision and BERT.


def test_import_hf_clip_vision_and_scan_restore(tmp_path):
    import jax.numpy as jnp

    cfg = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, patch_size=14, image_size=56)
    torch.manual_seed(0)
    model = transformers.CLIPVisionModel(cfg).eval()
    _perturb(model, 0)
    model.save_pretrained(tmp_path / "clip")
    out = tmp_path / "clip_imported"
    assert convert.main(["import", "--format", "hf_clip_vision", "--src", str(tmp_path / "clip"),
                         "--out", str(out)]) == 0
    pixels = np.random.default_rng(0).standard_normal((2, 56, 56, 3)).astype(np.float32)
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
    # Restored as saved, and re-laid out into scanned (stacked) layers: both must match transformers.
    for overrides in (None, {"scan": True}):
        vit, vcfg = io.restore_model(out, overrides=overrides)
        got = vit(jnp.asarray(pixels))
        np.testing.assert_allclose(np.asarray(got.tokens), ref.last_hidden_state.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(np.asarray(got.pooled), ref.pooler_output.numpy(), atol=1e-4, rtol=0)
    assert vcfg.scan


def test_import_hf_bert_as_qformer(tmp_path):
    import jax.numpy as jnp

    cfg = transformers.BertConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=32)
    torch.manual_seed(0)
    bert = transformers.BertModel(cfg).eval()
    _perturb(bert, 0)
    bert.save_pretrained(tmp_path / "bert")
    out = tmp_path / "bert_imported"
    assert convert.main(["import", "--format", "hf_bert", "--src", str(tmp_path / "bert"), "--out", str(out),
                         "--encoder-hidden-size", "48", "--cross-attention-freq", "2"]) == 0
    kind, qcfg, flat = io.restore_params(out)
    assert kind == "qformer" and qcfg.encoder_hidden_size == 48 and qcfg.cross_attention_freq == 2
    assert flat["layers/0/crossattention/key/kernel"].shape[0] == 48 and "layers/1/crossattention/key/kernel" not in flat
    for i in range(2):  # BLIP-2's init: the query FFN starts as a copy of the text FFN.
        np.testing.assert_array_equal(flat[f"layers/{i}/ffn_query/intermediate/kernel"],
                                      flat[f"layers/{i}/ffn/intermediate/kernel"])
    # Text-only the Q-Former is a plain BERT encoder (token type 0 folded into the positions).
    qformer, _ = io.restore_model(out)
    ids = np.random.default_rng(0).integers(1, 99, size=(2, 7))
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        ref = bert(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    got = np.asarray(qformer(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask)).last_hidden_state)
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], ref[valid], atol=1e-4, rtol=0)


def test_cli_errors_are_clear(tmp_path, capsys):
    assert convert.main(["import", "--format", "hf_blip2", "--src", str(tmp_path / "nope"),
                         "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert convert.main(["export", "--format", "hf_blip2", "--src", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "model_config.json" in capsys.readouterr().err
