"""Decoder LM port (Qwen2 / Llama): parity with transformers, padding, scan/remat, greedy decoding, weight maps."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P

import idmr_jax  # noqa: F401  (sets flax config)
from idmr_jax import sharding
from idmr_jax.models import decoder_lm as D
from idmr_jax.models import rotary
from idmr_jax.weights import decoder_lm as lm_weights
from idmr_jax.weights import mapping, torch_io
from idmr_jax.weights.mapping import WeightMismatchError

TOL = 1e-4
VOCAB = 160
_TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-5)
# (family, tied, extra transformers kwargs): Qwen2 (q/k/v bias); Llama with every bias and an explicit head_dim.
CASES = {
    "qwen2": ("qwen2", False, {}),
    "qwen2-tied": ("qwen2", True, {}),
    "llama": ("llama", False, dict(attention_bias=True, mlp_bias=True, head_dim=24)),
    "llama-tied": ("llama", True, {}),
}


def _torch_model(case: str, seed: int = 0):
    family, tied, extra = CASES[case]
    torch.manual_seed(seed)
    if family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_TINY, tie_word_embeddings=tied, **extra))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_TINY, tie_word_embeddings=tied, **extra))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move every weight off its init (zero biases, unit norms) so each one matters
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.3 if "embed" in name else 0.05))
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case -> (torch model, folder written by save_pretrained)."""
    out = {}
    for case in CASES:
        model = _torch_model(case)
        folder = tmp_path_factory.mktemp(case)
        model.save_pretrained(folder)
        out[case] = (model, folder)
    return out


def _import(folder, **overrides) -> D.DecoderLM:
    cfg = lm_weights.config_from_hf(torch_io.read_hf_config(folder), **overrides)
    model = nnx.eval_shape(lambda: D.DecoderLM(cfg, rngs=nnx.Rngs(0)))
    lm_weights.load_hf_weights(model, torch_io.load_torch_state_dict(folder), source=str(folder))
    return model


@nnx.jit
def _fwd(model, ids, mask):
    h = model(ids, attention_mask=mask)
    return h, model.logits(h)


def _batch(left: bool, seed: int = 0):
    """[3, 9] ids with rows of length 9, 6 and 4, left or right padded (pad id 0)."""
    rng = np.random.default_rng(seed)
    lengths = [9, 6, 4]
    ids = np.zeros((3, 9), np.int64)
    mask = np.zeros((3, 9), np.int64)
    for r, n in enumerate(lengths):
        cols = slice(9 - n, 9) if left else slice(0, n)
        ids[r, cols] = rng.integers(1, VOCAB, n)
        mask[r, cols] = 1
    return ids, mask


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers_with_padding(saved, case):
    tmodel, folder = saved[case]
    model = _import(folder)
    if CASES[case][1]:  # tied: transformers does not save the head, and neither do we
        assert "lm_head.weight" not in torch_io.load_torch_state_dict(folder) and model.lm_head is None
    for left in (False, True):
        ids, mask = _batch(left)
        with torch.no_grad():
            ref = tmodel(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                         output_hidden_states=True)
        h, logits = _fwd(model, jnp.asarray(ids), jnp.asarray(mask))
        real = mask.astype(bool)
        np.testing.assert_allclose(np.asarray(h)[real], ref.hidden_states[-1].numpy()[real], atol=TOL, rtol=0)
        np.testing.assert_allclose(np.asarray(logits)[real], ref.logits.numpy()[real], atol=TOL, rtol=0)


@pytest.mark.parametrize("left", [False, True])
def test_padded_batch_equals_each_sequence_alone(saved, left):
    model = _import(saved["qwen2"][1])
    ids, mask = _batch(left, seed=3)
    h, _ = _fwd(model, jnp.asarray(ids), jnp.asarray(mask))
    for r in range(ids.shape[0]):
        real = mask[r].astype(bool)
        alone, _ = _fwd(model, jnp.asarray(ids[r:r + 1, real]), jnp.ones((1, int(real.sum())), jnp.int32))
        # Left padding shifts the default positions (arange over the padded row); RoPE only sees differences.
        np.testing.assert_allclose(np.asarray(h)[r, real], np.asarray(alone)[0], atol=1e-5, rtol=0)


def test_inputs_embeds_position_ids_and_score_tokens(saved):
    tmodel, folder = saved["llama"]
    model = _import(folder)
    ids, mask = _batch(True, seed=5)
    pos = np.array(rotary.positions_from_mask(jnp.asarray(mask)))  # a writable copy, for torch.from_numpy
    emb = model.embed(jnp.asarray(ids))
    h = model(inputs_embeds=emb, attention_mask=jnp.asarray(mask), position_ids=jnp.asarray(pos))
    with torch.no_grad():
        ref = tmodel(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                     position_ids=torch.from_numpy(pos), output_hidden_states=True)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(h)[real], ref.hidden_states[-1].numpy()[real], atol=TOL, rtol=0)
    yes_no = [7, 11]
    want = torch.log_softmax(ref.logits[:, -1], dim=-1)[:, yes_no].numpy()
    np.testing.assert_allclose(np.asarray(model.score_tokens(h[:, -1], yes_no)), want, atol=TOL, rtol=0)
    sub = torch.log_softmax(ref.logits[:, -1, yes_no], dim=-1).numpy()
    np.testing.assert_allclose(np.asarray(model.score_tokens(h[:, -1], yes_no, over="subset")), sub, atol=TOL)


def test_greedy_generation_matches_transformers(saved):
    tmodel, folder = saved["qwen2"]
    model = _import(folder)
    ids, mask = _batch(True, seed=7)
    n_new = 6
    ours = np.asarray(model.generate_greedy(jnp.asarray(ids), jnp.asarray(mask), n_new))
    # An eos that row 0 emits at step 2: that row must then be padded, exactly as transformers pads it.
    eos = int(ours[0, 1])
    ours_eos = np.asarray(model.generate_greedy(jnp.asarray(ids), jnp.asarray(mask), n_new, eos_token_id=eos,
                                                pad_token_id=0))
    for eos_id, got in ((None, ours), (eos, ours_eos)):
        with torch.no_grad():
            ref = tmodel.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                  max_new_tokens=n_new, do_sample=False, eos_token_id=eos_id, pad_token_id=0)
        ref_new = ref[:, ids.shape[1]:].numpy()
        np.testing.assert_array_equal(got[:, :ref_new.shape[1]], ref_new)
        assert np.all(got[:, ref_new.shape[1]:] == 0)
    assert np.all(ours_eos[0, 2:] == 0)
    # Embeddings as the prompt (LLaVA's path) give the same tokens.
    via_embeds = model.generate_greedy(None, jnp.asarray(mask), n_new, inputs_embeds=model.embed(jnp.asarray(ids)))
    np.testing.assert_array_equal(np.asarray(via_embeds), ours)
    # The scanned layout runs the KV cache through nnx.scan.
    scanned = _import(folder, scan=True)
    np.testing.assert_array_equal(np.asarray(scanned.generate_greedy(jnp.asarray(ids), jnp.asarray(mask), n_new)), ours)


def test_scan_equals_unscanned_and_remat_gradients(saved):
    folder = saved["llama"][1]
    base = _import(folder)
    ids, mask = _batch(False, seed=9)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)

    def loss(model):
        h = model(ids, attention_mask=mask)
        return jnp.sum(jnp.square(h) * mask[..., None]) + jnp.sum(model.logits(h[:, 0]) ** 2)

    grad = nnx.jit(nnx.value_and_grad(loss))
    want_v, want_g = grad(base)
    want = mapping.flatten_params(want_g)
    # Scan and remat together (one compile: the CPU budget is small); gradients must equal the plain loop's.
    model = _import(folder, scan=True, remat="dots")
    v, g = grad(model)
    np.testing.assert_allclose(float(v), float(want_v), rtol=1e-6)
    flat = mapping.flatten_params(g)
    assert flat["layers/self_attn/q_proj/kernel"].shape == (2, 64, 4, 24)  # stacked along "layers"
    flat = mapping.unstack_from_model(flat, lm_weights.decoder_lm_name_map(model.cfg))
    assert set(flat) == set(want)
    for k in want:
        np.testing.assert_allclose(flat[k], want[k], atol=1e-5, rtol=1e-5, err_msg=k)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_import_export_round_trip_is_bit_exact(saved, tmp_path, dtype):
    folder = tmp_path / "m"
    copy.deepcopy(saved["qwen2-tied"][0]).to(getattr(torch, dtype)).save_pretrained(folder)
    sd = torch_io.load_torch_state_dict(folder)
    cfg = lm_weights.config_from_hf(torch_io.read_hf_config(folder), param_dtype=dtype, scan=True)
    model = nnx.eval_shape(lambda: D.DecoderLM(cfg, rngs=nnx.Rngs(0)))
    lm_weights.load_hf_weights(model, sd)
    out = lm_weights.export_hf_state_dict(model, cfg)
    assert set(out) == set(sd)
    bits = np.uint16 if dtype == "bfloat16" else np.uint32
    for k, v in sd.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape, k
        np.testing.assert_array_equal(out[k].view(bits), v.view(bits), err_msg=k)
    # The exported folder (with our config.json) loads back into transformers with identical outputs.
    torch_io.save_torch_state_dict(out, tmp_path / "back", lm_weights.hf_config_dict(cfg))
    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        logits = [transformers.AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32)(ids).logits.numpy()
                  for f in (folder, tmp_path / "back")]
    np.testing.assert_array_equal(logits[0], logits[1])


def test_strict_loading_errors(saved):
    tmodel, folder = saved["qwen2"]
    sd = torch_io.load_torch_state_dict(folder)
    cfg = lm_weights.config_from_hf(torch_io.read_hf_config(folder))
    model = nnx.eval_shape(lambda: D.DecoderLM(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(WeightMismatchError, match="model.layers.1.mlp.up_proj.weight"):
        lm_weights.load_hf_weights(model, {k: v for k, v in sd.items() if "layers.1.mlp.up_proj" not in k})
    with pytest.raises(WeightMismatchError, match="extra.weight"):
        lm_weights.load_hf_weights(model, {**sd, "extra.weight": np.zeros(3)})
    bad = dict(sd)
    bad["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
    with pytest.raises(WeightMismatchError, match="k_proj"):
        lm_weights.load_hf_weights(model, bad)
    # The LLaVA layout: the same map under another prefix.
    llava = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v for k, v in sd.items()}
    lm_weights.load_hf_weights(model, llava, prefix="model.language_model.")


def test_config_translation():
    for case in CASES:
        family, tied, extra = CASES[case]
        cls = transformers.Qwen2Config if family == "qwen2" else transformers.LlamaConfig
        hf = cls(**_TINY, tie_word_embeddings=tied, **extra)
        cfg = lm_weights.config_from_hf(hf)
        assert (cfg.family, cfg.tie_word_embeddings, cfg.rope_theta, cfg.num_kv_heads) == (family, tied, 500.0, 2)
        assert cfg.dim_per_head == extra.get("head_dim", 16)
        again = lm_weights.config_from_hf(cls(**lm_weights.hf_config_dict(cfg)).to_dict())
        assert again == cfg
    # transformers 4 style config.json: top-level rope_theta, rope_scaling.
    old = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
               num_attention_heads=2, rope_theta=1e6, rms_norm_eps=1e-5)
    assert lm_weights.config_from_hf(old).rope_theta == 1e6 and lm_weights.config_from_hf(old).num_kv_heads == 2
    with pytest.raises(ValueError, match="rope type 'llama3' is not implemented"):
        lm_weights.config_from_hf({**old, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ValueError, match="sliding-window"):
        lm_weights.config_from_hf({**old, "model_type": "qwen2", "use_sliding_window": True})
    with pytest.raises(ValueError, match="hidden_act"):
        lm_weights.config_from_hf({**old, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="num_kv_heads"):
        D.DecoderLMConfig(num_heads=4, num_kv_heads=3)


def test_sharded_forward_matches_single_device(saved):
    folder = saved["qwen2"][1]
    model = _import(folder)
    ids, mask = (jnp.asarray(a) for a in _batch(True, seed=11))
    ids, mask = jnp.concatenate([ids, ids[:1]]), jnp.concatenate([mask, mask[:1]])  # batch 4 for data x fsdp
    want = np.asarray(_fwd(model, ids, mask)[0])
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "model": 4})
    rules = sharding.DEFAULT_RULES
    graphdef, state = nnx.split(model)
    shardings = sharding.state_shardings(state, mesh, rules)
    specs = {k: v.spec for k, v in mapping.flatten_params(nnx.State(shardings)).items()}
    assert specs["layers/0/self_attn/q_proj/kernel"] == P("fsdp", "model", None)
    assert specs["layers/0/self_attn/k_proj/kernel"] == P("fsdp", None, None)  # 2 kv heads on 4 shards: replicated
    assert specs["lm_head/kernel"] == P("fsdp", "model")
    sharded = nnx.merge(graphdef, jax.device_put(state, shardings))
    assert sharded.layers[0].mlp.up_proj.kernel[...].sharding.spec == P("fsdp", "model")

    @nnx.jit
    def fwd(m, i, a):
        with sharding.axis_rules(mesh, rules):
            return m(i, attention_mask=a)

    got = fwd(sharded, ids, mask)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_dtype_split_bf16_compute(saved):
    model = _import(saved["qwen2"][1], dtype="bfloat16", param_dtype="bfloat16")
    h, logits = _fwd(model, jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))
    assert h.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(h.astype(jnp.float32))))
    assert all(v.dtype == jnp.bfloat16 for v in mapping.flatten_params(model).values())
    ref, _ = _fwd(_import(saved["qwen2"][1]), jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))
    np.testing.assert_allclose(np.asarray(h, np.float32), np.asarray(ref), atol=0.1, rtol=0.05)
