"""LoRA on Dense / DecoderLM: PEFT init and formula, frozen split, merge/unmerge, PEFT adapter parity."""

from __future__ import annotations

import copy
import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

import idmr_jax  # noqa: F401  (sets flax config)
from idmr_jax.models import decoder_lm as D
from idmr_jax.models import layers as L
from idmr_jax.models import lora as lora_lib
from idmr_jax.models.lora import LoRAConfig
from idmr_jax.train import state as train_state
from idmr_jax.weights import decoder_lm as lm_weights
from idmr_jax.weights import io, mapping, torch_io
from idmr_jax.weights import peft as peft_weights

TOL = 1e-4
VOCAB = 150


def _dense(lora, in_f=(4, 6), out_f=10, seed=0):
    return L.Dense(in_f, out_f, in_axes=("heads", "kv"), out_axes=("embed",), lora=lora, rngs=nnx.Rngs(seed))


def test_dense_without_lora_is_unchanged_and_lora_follows_peft():
    x = np.asarray(jax.random.normal(jax.random.key(1), (2, 3, 4, 6)))
    apply = nnx.jit(lambda layer, v: layer(v))
    plain = _dense(None)
    assert set(mapping.flatten_params(plain)) == {"kernel", "bias"}
    assert not nnx.state(plain, nnx.Not(nnx.Param))  # no RNG or other state either
    w, b = np.asarray(plain.kernel[...]), np.asarray(plain.bias[...])
    y_plain = np.asarray(apply(plain, x))
    np.testing.assert_allclose(y_plain, np.einsum("btij,ijo->bto", x, w) + b, atol=1e-5)

    cfg = LoRAConfig(rank=3, alpha=12.0, dropout=0.0)
    layer = _dense(cfg)
    a = np.asarray(layer.lora_a[...])
    # PEFT: kaiming_uniform(a=sqrt(5)) on [r, in] = U(-1/sqrt(in), 1/sqrt(in)); B starts at zero.
    assert a.shape == (4, 6, 3) and np.abs(a).max() <= 24 ** -0.5 and np.abs(a).max() > 0.9 * 24 ** -0.5
    assert np.all(np.asarray(layer.lora_b[...]) == 0) and layer.lora_b.shape == (3, 10)
    assert layer.lora_a.get_metadata()["out_sharding"] == ("heads", "kv", None)
    assert layer.lora_b.get_metadata()["out_sharding"] == (None, "embed")

    # y = x W + b + x A B * alpha / r, with multi-dim inputs flattened as PEFT sees them.
    layer.kernel[...], layer.bias[...] = plain.kernel[...], plain.bias[...]
    np.testing.assert_allclose(np.asarray(apply(layer, x)), y_plain, atol=0)  # fresh adapter: a no-op
    bb = np.random.default_rng(2).standard_normal((3, 10)).astype(np.float32)
    layer.lora_b[...] = jnp.asarray(bb)
    a = np.asarray(layer.lora_a[...]).reshape(24, 3)
    want = y_plain + x.reshape(2, 3, 24) @ a @ bb * 4.0
    np.testing.assert_allclose(np.asarray(apply(layer, x)), want, atol=1e-5)
    assert LoRAConfig(rank=4, alpha=8, use_rslora=True).scale == 4.0


def test_frozen_patterns_train_only_lora():
    cfg = D.DecoderLMConfig(vocab_size=VOCAB, lora=LoRAConfig(rank=2, targets=("q_proj", "v_proj")))
    model = nnx.eval_shape(lambda: D.DecoderLM(cfg, rngs=nnx.Rngs(0)))
    paths = set(mapping.flatten_params(model))
    lora_paths = {p for p in paths if lora_lib.is_lora_path(p)}
    assert lora_paths == {f"layers/{i}/self_attn/{m}/{f}" for i in range(2) for m in ("q_proj", "v_proj")
                          for f in ("lora_a", "lora_b")}
    _, params, _ = train_state.split_model(model, lora_lib.frozen_patterns())
    assert set(mapping.flatten_params(params)) == lora_paths
    _, params, _ = train_state.split_model(model, lora_lib.frozen_patterns(extra_trainable=(r"^norm/",)))
    assert set(mapping.flatten_params(params)) == lora_paths | {"norm/scale"}


def _random_lora(model: nnx.Module, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v.shape).astype(np.float32) * 0.1
            for k, v in mapping.flatten_params(model).items() if lora_lib.is_lora_path(k)}


def _lora_model(folder, lora: LoRAConfig, seed: int = 0, **overrides) -> D.DecoderLM:
    """Base weights from a transformers folder plus random (nonzero) LoRA factors, without a random init."""
    cfg = lm_weights.config_from_hf(torch_io.read_hf_config(folder), lora=lora, **overrides)
    model = nnx.eval_shape(lambda: D.DecoderLM(cfg, rngs=nnx.Rngs(params=0, dropout=1)))
    base = lm_weights.decoder_lm_name_map(cfg).torch_to_flax(torch_io.load_torch_state_dict(folder))
    mapping.load_into(model, {**base, **_random_lora(model, seed)})
    nnx.reseed(model, dropout=seed, policy="match_shape")  # concrete dropout keys (eval_shape left them abstract)
    return model


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, rope_theta=1000.0)
    model = transformers.Qwen2ForCausalLM(hf)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    folder = tmp_path_factory.mktemp("qwen2")
    model.eval().save_pretrained(folder)
    return model, folder


@nnx.jit
def _fwd(model, ids, mask):
    h = model(ids, attention_mask=mask)
    return h, model.logits(h)


def _inputs():
    ids = np.random.default_rng(0).integers(1, VOCAB, (2, 7))
    mask = np.ones((2, 7), np.int64)
    mask[1, 5:] = 0
    return ids, mask


def test_merge_and_unmerge(qwen2_folder):
    _, folder = qwen2_folder
    lora = LoRAConfig(rank=4, alpha=8.0)
    ids, mask = (jnp.asarray(a) for a in _inputs())
    # Functional merge (unscanned): base params only, loadable into the same architecture without LoRA.
    model = _lora_model(folder, lora)
    before = mapping.flatten_params(model)
    want = np.asarray(_fwd(model, ids, mask)[1])
    merged_flat = lora_lib.merge(before, lora)
    assert not any(lora_lib.is_lora_path(k) for k in merged_flat)
    plain = nnx.eval_shape(lambda: D.DecoderLM(lm_weights.config_from_hf(torch_io.read_hf_config(folder)),
                                               rngs=nnx.Rngs(0)))
    mapping.load_into(plain, merged_flat)
    np.testing.assert_allclose(np.asarray(_fwd(plain, ids, mask)[1]), want, atol=TOL, rtol=0)
    restored = lora_lib.unmerge(merged_flat, before, lora)
    for k, v in before.items():
        np.testing.assert_allclose(restored[k], v, atol=1e-6, rtol=0, err_msg=k)

    # In place on a scanned module (stacked factors): LoRA branches switch off while merged.
    model = nnx.eval_shape(lambda: D.DecoderLM(dataclasses.replace(model.cfg, scan=True), rngs=nnx.Rngs(0)))
    mapping.load_into(model, before)
    lora_lib.merge(model)
    with pytest.raises(ValueError, match="already merged"):
        lora_lib.merge(model)
    np.testing.assert_allclose(np.asarray(_fwd(model, ids, mask)[1]), want, atol=TOL, rtol=0)
    lora_lib.unmerge(model)
    after = mapping.unstack_from_model(mapping.flatten_params(model), mapping.NameMap(
        lm_weights.decoder_lm_rules(model.cfg) + lm_weights.lora_rules(model.cfg)))
    for k, v in before.items():
        np.testing.assert_allclose(np.asarray(after[k]), np.asarray(v), atol=1e-6, rtol=0, err_msg=k)


def test_bf16_base_with_float32_lora_and_dropout(qwen2_folder):
    _, folder = qwen2_folder
    lora = LoRAConfig(rank=4, alpha=8.0, dropout=0.5)
    model = _lora_model(folder, lora, scan=True, param_dtype="bfloat16", dtype="bfloat16")
    dtypes = {k: v.dtype for k, v in mapping.flatten_params(model).items()}
    assert all((d == jnp.float32) == lora_lib.is_lora_path(k) for k, d in dtypes.items()), dtypes
    ids, mask = (jnp.asarray(a) for a in _inputs())

    @nnx.jit
    def train_fwd(m, seed):
        nnx.reseed(m, dropout=jax.random.key(seed), policy="match_shape")
        return m(ids, attention_mask=mask, deterministic=False)

    # Stacked layers hold one dropout key per layer: reseeding needs policy="match_shape".
    a, b, a2 = (np.asarray(train_fwd(model, s), np.float32) for s in (1, 2, 1))
    np.testing.assert_array_equal(a, a2)  # reproducible from the seed
    assert np.abs(a - b).max() > 1e-2


def test_peft_adapter_parity(qwen2_folder, tmp_path):
    tmodel, folder = qwen2_folder
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
    lora = LoRAConfig(rank=4, alpha=8.0, dropout=0.1, targets=targets)
    model = _lora_model(folder, lora, seed=3)
    cfg = model.cfg
    out = peft_weights.export_peft_adapter(mapping.flatten_params(model), cfg, tmp_path / "adapter",
                                          base_model_name_or_path=str(folder))
    meta = json.loads((out / "adapter_config.json").read_text())
    assert (meta["peft_type"], meta["r"], meta["lora_alpha"], meta["bias"]) == ("LORA", 4, 8, "none")
    assert meta["target_modules"] == sorted(targets)

    ids, mask = _inputs()
    with torch.no_grad():
        pmodel = peft.PeftModel.from_pretrained(copy.deepcopy(tmodel), out).eval()
        ref = pmodel(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                     output_hidden_states=True)
        plain = tmodel(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    h, logits = (np.asarray(a) for a in _fwd(model, jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    ref_h = ref.hidden_states[-1].numpy()
    assert np.abs(ref.logits.numpy() - plain).max() > 0.1  # the adapter matters
    np.testing.assert_allclose(h[real], ref_h[real], atol=TOL, rtol=0)
    np.testing.assert_allclose(logits[real], ref.logits.numpy()[real], atol=TOL, rtol=0)
    last = mask.sum(1) - 1  # right padding: the last real token, L2-normalised (IDMR / VLM2Vec embedding)
    ours_e, ref_e = h[np.arange(2), last], ref_h[np.arange(2), last]
    np.testing.assert_allclose(ours_e / np.linalg.norm(ours_e, axis=-1, keepdims=True),
                               ref_e / np.linalg.norm(ref_e, axis=-1, keepdims=True), atol=TOL, rtol=0)

    # Import gives the factors back exactly; a scanned model exports the same tensors.
    back = peft_weights.import_peft_adapter(out, cfg)
    flat = mapping.flatten_params(model)
    assert set(back) == {k for k in flat if lora_lib.is_lora_path(k)}
    for k, v in back.items():
        np.testing.assert_array_equal(v, np.asarray(flat[k]))
    scanned = nnx.eval_shape(lambda: D.DecoderLM(dataclasses.replace(cfg, scan=True), rngs=nnx.Rngs(0)))
    mapping.load_into(scanned, flat)  # the same values, stacked along "layers"
    out2 = peft_weights.export_peft_adapter(mapping.flatten_params(scanned), scanned.cfg, tmp_path / "adapter2")
    from safetensors.numpy import load_file
    t1, t2 = load_file(str(out / "adapter_model.safetensors")), load_file(str(out2 / "adapter_model.safetensors"))
    assert set(t1) == set(t2) and all(np.array_equal(t1[k], t2[k]) for k in t1)
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight" in t1
    assert t1["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (4, 96)
    assert t1["base_model.model.lm_head.lora_B.weight"].shape == (VOCAB, 4)

    with pytest.raises(ValueError, match="r=4"):
        peft_weights.import_peft_adapter(out, lm_weights.config_from_hf(torch_io.read_hf_config(folder),
                                                                        lora=LoRAConfig(rank=8)))
    with pytest.raises(Exception, match="lora"):
        peft_weights.export_peft_adapter({}, cfg, tmp_path / "empty")


def test_save_and_restore_converted_lora_model(qwen2_folder, tmp_path):
    _, folder = qwen2_folder
    model = _lora_model(folder, LoRAConfig(rank=2, alpha=4.0, targets=("q_proj", "down_proj")))
    io.save_model(tmp_path / "ckpt", model, model.cfg)
    restored, cfg = io.restore_model(tmp_path / "ckpt", overrides={"scan": True})
    assert cfg.lora == model.cfg.lora and cfg.scan and isinstance(cfg.lora.targets, tuple)
    name_map = mapping.NameMap(lm_weights.decoder_lm_rules(cfg) + lm_weights.lora_rules(cfg))
    got = mapping.unstack_from_model(mapping.flatten_params(restored), name_map)
    want = mapping.flatten_params(model)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


def test_lm_lora_adapter_targets_only_the_language_model(tmp_path):
    """export_lm_lora_adapter (the LLaVA / InternVL / Qwen2-VL adapters): ``target_modules`` is a regex that PEFT
    matches in full; it names the LM's layers and the top-level ``lm_head``, never a vision tower's q_proj."""
    lora = LoRAConfig(rank=2, alpha=4.0, targets=("q_proj", "lm_head"))
    cfg = D.DecoderLMConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1, lora=lora)
    flat = {f"lm/{k}": v for k, v in mapping.flatten_params(D.DecoderLM(cfg, rngs=nnx.Rngs(0))).items()}
    out = peft_weights.export_lm_lora_adapter(flat, cfg, tmp_path / "adapter", lm_prefix="model.language_model.")
    pattern = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert re.fullmatch(pattern, "model.language_model.layers.0.self_attn.q_proj")
    assert re.fullmatch(pattern, "lm_head")
    assert not re.fullmatch(pattern, "model.vision_tower.encoder.layers.0.self_attn.q_proj")
    assert not re.fullmatch(pattern, "model.language_model.layers.0.self_attn.k_proj")
    with pytest.raises(ValueError, match="no LoRA"):
        peft_weights.export_lm_lora_adapter(flat, dataclasses.replace(cfg, lora=None), tmp_path / "none",
                                            lm_prefix="model.language_model.")
