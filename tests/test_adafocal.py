"""AdaFocal: CAAM's attention modulation (beta * M_B), the Contextual Reasoning Module (PyTorch parity), every
ablation keyword of configs/oacir.py, and the retrieval head (L2 norms, max-over-tokens similarity).

One real tiny model is built per module (the first eager NNX init compiles every op; later builds reuse them);
other configs copy its BLIP-2 params so that comparisons run on the same weights.
"""

import dataclasses

import idmr_jax  # noqa: F401  (flax config)
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from configs import oacir
from idmr_jax.data.boxes import box_to_patch_mask
from idmr_jax.models import adafocal as af
from idmr_jax.models.crm import ContextualReasoningModule, CRMConfig
from idmr_jax.tasks.oacir.task import OacirTask, model_config
from idmr_jax.train.state import split_model

VOCAB = 128  # a small vocabulary keeps the tiny model's init cheap; nothing here depends on it
B, T = 2, 6
GRID, IMAGE = (4, 4), (56, 56)  # tiny ViT: 56 px, patch 14 -> 4x4 patches + CLS = 17 tokens
N = 1 + GRID[0] * GRID[1]


def tiny_config(arg: str = ""):
    """configs/oacir.py with `tiny` plus `arg`, with a small vocabulary and a 4-layer Q-Former: two cross-attention
    layers, so that the tests see the box bias reach each of several."""
    config = oacir.get_config(",".join(filter(None, ["tiny", arg])))
    config.model.qformer.vocab_size = VOCAB
    config.model.qformer.num_layers = 4
    return config


def build(cfg: af.AdaFocalConfig, seed: int = 0) -> af.AdaFocal:
    return af.AdaFocal(cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1))


def like(base: af.AdaFocal, **changes) -> af.AdaFocal:
    """A model of `base`'s config with `changes`, carrying `base`'s BLIP-2 params (same weights)."""
    model = build(dataclasses.replace(base.cfg, **changes), seed=7)
    nnx.update(model.blip2, nnx.state(base.blip2, nnx.Param))
    return model


def param_paths(model) -> list[str]:
    return ["/".join(str(k) for k in path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def cross_attentions(model: af.AdaFocal, embeds, ids, mask, bias):
    """The activation pass run on the model's Q-Former directly: (hidden [B, Q+T, D], cross-attn probs per layer)."""
    out = model.blip2.qformer(query_embeds=model.blip2.query_tokens[...], input_ids=ids, attention_mask=mask,
                              image_embeds=embeds, attention_bias=bias, return_cross_attentions=True)
    return out.last_hidden_state, out.cross_attentions


def box_mass(probs, box_mask) -> np.ndarray:
    """Attention mass on the boxed image tokens: [B, H, Q, N] x [B, N] -> [B, H, Q]."""
    return np.einsum("bhqn,bn->bhq", np.asarray(probs, np.float64), np.asarray(box_mask, np.float64))


@pytest.fixture(scope="module")
def base():
    return build(model_config(tiny_config()))


@pytest.fixture(scope="module")
def inputs(base):
    """(image_embeds, input_ids, attention_mask with padding, box mask) for a batch of 2.

    The image tokens are random unit-scale vectors (what ``ln_vision`` outputs); the ViT is tested elsewhere.
    """
    rng = np.random.default_rng(0)
    embeds = jnp.asarray(rng.normal(size=(B, N, base.cfg.blip2.vision.width)).astype(np.float32))
    ids = rng.integers(1, VOCAB, size=(B, T))
    mask = np.ones((B, T), np.int32)
    mask[1, 4:] = 0
    ids[1, 4:] = 0
    boxes = np.stack([box_to_patch_mask([3, 2, 30, 25], GRID, IMAGE, patch=14),     # 2x3 patches
                      box_to_patch_mask([30, 30, 56, 56], GRID, IMAGE, patch=14)])  # the bottom-right 2x2 patches
    assert embeds.shape == (B, N, base.cfg.blip2.vision.width)
    assert boxes.sum(1).tolist() == [6, 4] and not boxes[:, 0].any()
    return embeds, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(boxes)


# ----------------------------------------------------------------------------------------------
# beta = 0 is the standard baseline; a large beta focuses cross-attention on the box.


def test_none_mode_has_no_caam_params(base):
    none = like(base, beta_mode="none")
    fixed = like(base, beta_mode="fixed", fixed_beta=2.0)
    for model in (none, fixed):
        paths = param_paths(model)
        assert not any(p.startswith(("probe_tokens", "crm")) for p in paths)
        assert all(p.startswith("blip2/") for p in paths)
    caam = [p for p in param_paths(base) if not p.startswith("blip2/")]
    assert "probe_tokens" in caam and any(p.startswith("crm/layers/1/in_proj/") for p in caam)
    assert base.probe_tokens.shape == (8, 64)


def test_zero_beta_equals_baseline_bit_for_bit(base, inputs):
    embeds, ids, mask, boxes = inputs
    none = like(base, beta_mode="none")
    zero = like(base, beta_mode="fixed", fixed_beta=0.0)
    q_none, beta_none = none.query_features(embeds, ids, mask, boxes)
    q_zero, beta_zero = zero.query_features(embeds, ids, mask, boxes)
    assert np.all(np.asarray(beta_none) == 0) and np.all(np.asarray(beta_zero) == 0)
    np.testing.assert_array_equal(np.asarray(q_none), np.asarray(q_zero))
    # The adaptive model whose CRM outputs exactly 0 (softplus(-1e4) == 0 in float32) is the baseline too.
    adaptive = nnx.clone(base)
    adaptive.crm.head_out.kernel[...] = jnp.zeros_like(adaptive.crm.head_out.kernel[...])
    adaptive.crm.head_out.bias[...] = jnp.full_like(adaptive.crm.head_out.bias[...], -1e4)
    q_ada, beta_ada = adaptive.query_features(embeds, ids, mask, boxes)
    assert np.all(np.asarray(beta_ada) == 0)
    np.testing.assert_array_equal(np.asarray(q_none), np.asarray(q_ada))
    # (Compiled, a zero bias is bit-identical too: tests/test_blip2.py::test_attention_bias_through_blip2.)
    # Targets never see the bias.
    np.testing.assert_array_equal(np.asarray(none.target_features(embeds)), np.asarray(zero.target_features(embeds)))


def test_large_beta_focuses_every_cross_attention_layer(base, inputs):
    embeds, ids, mask, boxes = inputs
    big = like(base, beta_mode="fixed", fixed_beta=1e4)
    q_big, beta = big.query_features(embeds, ids, mask, boxes)
    np.testing.assert_array_equal(np.asarray(beta), np.full((B, 1), 1e4, np.float32))
    bias = af.attention_bias(beta, boxes)
    assert bias.shape == (B, 1, 1, N)
    hidden, probs = cross_attentions(big, embeds, ids, mask, bias)
    # Same inputs as the model's activation pass: its query feature is read off this very pass.
    np.testing.assert_array_equal(np.asarray(big.blip2.text_projection(hidden[:, 8])), np.asarray(q_big))
    assert len(probs) == len(base.cfg.blip2.qformer.cross_attention_layers) == 2
    _, plain = cross_attentions(big, embeds, ids, mask, None)
    for layer, (p, p0) in enumerate(zip(probs, plain)):
        assert p.shape == (B, 4, 8, N)
        mass = box_mass(p, boxes)
        assert mass.min() > 0.99, f"cross-attention layer {layer}: min box mass {mass.min()}"
        assert box_mass(p0, boxes).min() < 0.5  # without the bias some queries look elsewhere
    # No box (all-zero M_B): the large beta has no effect at all.
    none = like(base, beta_mode="none")
    no_box = jnp.zeros_like(boxes)
    q_nobox, _ = big.query_features(embeds, ids, mask, no_box)
    q_plain, _ = none.query_features(embeds, ids, mask, no_box)
    np.testing.assert_array_equal(np.asarray(q_nobox), np.asarray(q_plain))
    assert np.abs(np.asarray(q_big) - np.asarray(q_plain)).max() > 1e-3


def test_vector_beta_moves_only_its_query_tokens(base, inputs):
    embeds, ids, mask, boxes = inputs
    config = tiny_config("vector")
    cfg = model_config(config)
    assert cfg.crm.num_outputs == cfg.blip2.num_query_tokens == 8
    model = build(cfg, seed=3)
    beta = model.beta(embeds, ids, mask)
    assert beta.shape == (B, 8) and np.all(np.asarray(beta) >= 0)
    assert af.attention_bias(beta, boxes).shape == (B, 1, 8, N)
    q, beta_q = model.query_features(embeds, ids, mask, boxes)
    np.testing.assert_array_equal(np.asarray(beta_q), np.asarray(beta))
    assert q.shape == (B, 32)

    # Drive the CRM so that beta is 1e4 for query tokens 1 and 5 and exactly 0 for the others.
    focus = np.zeros(8, bool)
    focus[[1, 5]] = True
    model.crm.head_out.kernel[...] = jnp.zeros_like(model.crm.head_out.kernel[...])
    model.crm.head_out.bias[...] = jnp.asarray(np.where(focus, 1e4, -1e4), jnp.float32)
    q, beta = model.query_features(embeds, ids, mask, boxes)
    np.testing.assert_array_equal(np.asarray(beta), np.broadcast_to(np.where(focus, 1e4, 0.0), (B, 8)))
    hidden, probs = cross_attentions(model, embeds, ids, mask, af.attention_bias(beta, boxes))
    np.testing.assert_array_equal(np.asarray(model.blip2.text_projection(hidden[:, 8])), np.asarray(q))
    _, plain = cross_attentions(model, embeds, ids, mask, None)
    for layer, (p, p0) in enumerate(zip(probs, plain)):
        mass, mass0 = box_mass(p, boxes), box_mass(p0, boxes)
        assert mass[:, :, focus].min() > 0.99, f"layer {layer}"
        assert mass0[:, :, focus].min() < 0.5
        assert mass[:, :, ~focus].mean() < 0.6, f"layer {layer}"  # the others are not pulled onto the box
    # In the first cross-attention layer the other query tokens' attention is untouched, bit for bit (later
    # layers differ only through self-attention mixing the focused tokens' outputs in).
    np.testing.assert_array_equal(np.asarray(probs[0])[:, :, ~focus], np.asarray(plain[0])[:, :, ~focus])
    assert np.abs(np.asarray(probs[0])[:, :, focus] - np.asarray(plain[0])[:, :, focus]).max() > 0.1


# ----------------------------------------------------------------------------------------------
# The Contextual Reasoning Module.


class TorchCRM(torch.nn.Module):
    """The released CRM's structure: [CLS] + nn.TransformerEncoder + Linear-ReLU-Linear + Softplus."""

    def __init__(self, d, nhead, ffn, layers, head_hidden, outputs, dropout=0.1):
        super().__init__()
        self.cls = torch.nn.Parameter(torch.randn(1, 1, d))
        layer = torch.nn.TransformerEncoderLayer(d, nhead, ffn, dropout, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, layers)
        self.head = torch.nn.Sequential(torch.nn.Linear(d, head_hidden), torch.nn.ReLU(),
                                        torch.nn.Linear(head_hidden, outputs), torch.nn.Softplus())

    def forward(self, probes):
        x = torch.cat([self.cls.expand(probes.shape[0], -1, -1), probes], dim=1)
        return self.head(self.encoder(x)[:, 0])


def _copy_linear(dst: nnx.Linear, src: torch.nn.Linear | None = None, *, weight=None, bias=None):
    weight = src.weight if src is not None else weight
    bias = src.bias if src is not None else bias
    dst.kernel[...] = jnp.asarray(weight.detach().numpy().T)
    dst.bias[...] = jnp.asarray(bias.detach().numpy())


def _copy_norm(dst: nnx.LayerNorm, src: torch.nn.LayerNorm):
    dst.scale[...] = jnp.asarray(src.weight.detach().numpy())
    dst.bias[...] = jnp.asarray(src.bias.detach().numpy())


# The CRM tests use the tiny config's CRM sizes (d 64, 4 heads, FFN 128, head 64, 8 probes) and batch 2, so that
# the eager ops compiled for the module's model are reused.
D, HEADS, FFN, HH, K = 64, 4, 128, 64, 8


@pytest.mark.parametrize("outputs", [1, 8])
def test_crm_transformer_matches_pytorch(outputs):
    d, nhead, ffn, layers, hh, k, b = D, HEADS, FFN, 2, HH, K, B
    torch.manual_seed(outputs)
    ref = TorchCRM(d, nhead, ffn, layers, hh, outputs).eval()
    with torch.no_grad():  # LayerNorms start at 1 / 0: perturb them so the copy is really checked
        for layer in ref.encoder.layers:
            for norm in (layer.norm1, layer.norm2):
                norm.weight.add_(0.1 * torch.randn(d))
                norm.bias.add_(0.1 * torch.randn(d))
        ref.head[2].bias.add_(0.5)
    cfg = CRMConfig(hidden_size=d, num_probes=k, aggregator="transformer", num_layers=layers, num_heads=nhead,
                    ffn_dim=ffn, dropout=0.1, head_hidden=hh, num_outputs=outputs)
    crm = ContextualReasoningModule(cfg, rngs=nnx.Rngs(0))
    crm.cls_token[...] = jnp.asarray(ref.cls.detach().numpy().reshape(1, d))
    for mine, theirs in zip(crm.layers, ref.encoder.layers):
        assert theirs.norm_first is False and theirs.norm1.eps == cfg.layer_norm_eps == 1e-5
        attn = theirs.self_attn
        _copy_linear(mine.in_proj, weight=attn.in_proj_weight, bias=attn.in_proj_bias)
        _copy_linear(mine.out_proj, attn.out_proj)
        _copy_linear(mine.linear1, theirs.linear1)
        _copy_linear(mine.linear2, theirs.linear2)
        _copy_norm(mine.norm1, theirs.norm1)
        _copy_norm(mine.norm2, theirs.norm2)
    _copy_linear(crm.head_hidden, ref.head[0])
    _copy_linear(crm.head_out, ref.head[2])

    probes = np.random.default_rng(outputs).normal(size=(b, k, d)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(probes)).numpy()
    beta = np.asarray(crm(jnp.asarray(probes)))
    assert beta.shape == expected.shape == (b, outputs)
    assert np.abs(beta - expected).max() <= 1e-5
    assert np.all(beta >= 0) and np.ptp(beta) > 1e-3  # the probes matter


def _softplus(x):
    return np.logaddexp(0.0, x)


def test_crm_beta_head_is_float32_under_bf16_compute():
    """The last projection runs in float32: under bf16 compute a beta near 15 would move in steps of 0.0625."""
    cfg = CRMConfig(hidden_size=D, num_probes=K, aggregator="avgpool", head_hidden=HH, dtype="bfloat16")
    crm = ContextualReasoningModule(cfg, rngs=nnx.Rngs(1))
    crm.head_out.kernel[...] = jnp.zeros_like(crm.head_out.kernel[...])
    targets = np.array([15.0, 15.01, 15.02, 15.03], np.float32)
    betas = []
    for t in targets:
        crm.head_out.bias[...] = jnp.full_like(crm.head_out.bias[...], t)
        betas.append(float(crm(jnp.ones((1, K, D), jnp.bfloat16))[0, 0]))
    np.testing.assert_allclose(betas, _softplus(targets), rtol=0, atol=1e-5)
    assert len(set(betas)) == len(targets)


@pytest.mark.parametrize("aggregator", ["avgpool", "mlp"])
def test_crm_pooling_aggregators(aggregator):
    d, k, b, hh = D, K, B, HH
    cfg = CRMConfig(hidden_size=d, num_probes=k, aggregator=aggregator, head_hidden=hh)
    crm = ContextualReasoningModule(cfg, rngs=nnx.Rngs(1))
    assert not hasattr(crm, "layers") and not hasattr(crm, "cls_token")
    probes = np.random.default_rng(2).normal(size=(b, k, d)).astype(np.float32)
    beta = np.asarray(crm(jnp.asarray(probes)))
    # Hand-computed: pool (mean, or ReLU(Linear(concat))) -> Linear -> ReLU -> Linear -> softplus.
    w = {name: np.asarray(v[...]) for name, v in nnx.to_flat_state(nnx.state(crm, nnx.Param))}
    get = lambda *path: w[path]  # noqa: E731
    if aggregator == "avgpool":
        pooled = probes.mean(1)
    else:
        pooled = np.maximum(probes.reshape(b, k * d) @ get("mixer", "kernel") + get("mixer", "bias"), 0)
    h = np.maximum(pooled @ get("head_hidden", "kernel") + get("head_hidden", "bias"), 0)
    expected = _softplus(h @ get("head_out", "kernel") + get("head_out", "bias"))
    assert beta.shape == (b, 1)
    np.testing.assert_allclose(beta, expected, rtol=1e-5, atol=1e-6)
    assert np.all(beta >= 0)


def test_beta_is_never_negative():
    cfg = CRMConfig(hidden_size=D, num_probes=K, num_layers=1, num_heads=HEADS, ffn_dim=FFN, head_hidden=HH,
                    num_outputs=8)
    crm = ContextualReasoningModule(cfg, rngs=nnx.Rngs(2))
    crm.head_out.bias[...] = jnp.asarray([-80.0, -20.0, -5.0, 0.0, 0.0, 5.0, 20.0, 80.0])
    probes = 100 * np.random.default_rng(3).normal(size=(B, K, D)).astype(np.float32)
    beta = np.asarray(crm(jnp.asarray(probes)))
    assert np.all(beta >= 0) and np.all(np.isfinite(beta))
    assert beta[:, 0].max() < 1e-20 and beta[:, -1].min() > 1  # softplus: ~0 and ~identity at the extremes
    base_cfg = model_config(tiny_config())
    with pytest.raises(ValueError, match="fixed_beta"):
        dataclasses.replace(base_cfg, beta_mode="fixed", fixed_beta=-1.0)
    with pytest.raises(ValueError, match="beta_mode"):
        dataclasses.replace(base_cfg, beta_mode="manual")


# ----------------------------------------------------------------------------------------------
# Every ablation keyword builds and runs.


ABLATIONS = ["", "baseline", "fixed_beta=0.5", "vector", "crm=mlp", "crm=avgpool", "crm_layers=1", "probes=4",
             "frozen_probes", "roi", "entity"]


@pytest.mark.parametrize("arg", ABLATIONS)
def test_ablation_keyword_builds_and_runs(arg, base, inputs):
    embeds, ids, mask, boxes = inputs
    config = tiny_config(arg)
    task = OacirTask(config)
    cfg = task.model_config
    model = build(cfg)
    q, beta = model.query_features(embeds, ids, mask, boxes)
    targets = model.target_features(embeds)
    assert q.shape == (B, 32) and targets.shape == (B, 8, 32)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(q), axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(targets), axis=-1), 1.0, atol=1e-5)
    beta = np.asarray(beta)
    assert beta.shape == (B, 8 if arg == "vector" else 1) and np.all(beta >= 0) and np.all(np.isfinite(beta))

    paths = param_paths(model)
    caam = [p for p in paths if p.startswith(("probe_tokens", "crm"))]
    _, trainable, _ = split_model(model, task.frozen_patterns)
    trainable_paths = ["/".join(str(k) for k in p) for p, _ in nnx.to_flat_state(trainable)]
    assert not any(p.startswith("blip2/vision/") for p in trainable_paths)  # the ViT is frozen
    if arg in ("baseline", "roi", "fixed_beta=0.5"):
        assert cfg.beta_mode == ("fixed" if arg == "fixed_beta=0.5" else "none")
        assert caam == []
        np.testing.assert_array_equal(beta, np.full((B, 1), 0.5 if arg == "fixed_beta=0.5" else 0.0))
    else:
        assert cfg.beta_mode == "adaptive" and "probe_tokens" in caam
        assert ("probe_tokens" in trainable_paths) == (arg != "frozen_probes")
    if arg == "frozen_probes":
        assert any(rx in task.frozen_patterns for rx in (r"^probe_tokens$", r"^probe_tokens(/|$)"))
        assert "probe_tokens" not in trainable_paths and any(p.startswith("crm/") for p in trainable_paths)
    if arg == "vector":
        assert model.crm.head_out.kernel.shape == (64, 8)
    if arg == "crm=mlp":
        assert model.crm.mixer.kernel.shape == (8 * 64, 64) and not any("layers" in p for p in caam)
    if arg == "crm=avgpool":
        assert not any("layers" in p or "mixer" in p for p in caam)
    if arg in ("", "entity", "frozen_probes", "probes=4", "vector"):
        assert len(model.crm.layers) == 2
    if arg == "crm_layers=1":
        assert len(model.crm.layers) == 1
    if caam:
        assert model.probe_tokens.shape == (4 if arg == "probes=4" else 8, 64)
    assert config.data.roi_crop == (arg == "roi")
    assert config.data.text_entity == (arg == "entity")


# ----------------------------------------------------------------------------------------------
# Features and similarity.


def test_features_are_normalised_and_similarity_is_max_over_tokens(base, inputs):
    embeds, ids, mask, boxes = inputs
    q, _ = base.query_features(embeds, ids, mask, boxes)
    targets = base.target_features(embeds)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(q), axis=-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(targets), axis=-1), 1.0, atol=1e-6)
    # Query = image-grounded text [CLS] with the bias; target = image-only query tokens (no bias, no text).
    np.testing.assert_array_equal(np.asarray(targets), np.asarray(base.blip2.image_features(embeds)))

    rng = np.random.default_rng(4)
    queries = rng.normal(size=(3, 16)).astype(np.float32)
    tokens = rng.normal(size=(5, 7, 16)).astype(np.float32)
    sim = np.asarray(af.similarity(jnp.asarray(queries), jnp.asarray(tokens)))
    loop = np.empty((3, 5))
    for i in range(3):
        for j in range(5):
            loop[i, j] = max(float(np.dot(queries[i], tokens[j, t])) for t in range(7))
    assert sim.shape == (3, 5)
    np.testing.assert_allclose(sim, loop, rtol=1e-5, atol=1e-5)
    # With the model's features.
    model_sim = np.asarray(af.similarity(q, targets))
    np.testing.assert_allclose(model_sim, np.einsum("qe,tke->qtk", np.asarray(q), np.asarray(targets)).max(-1),
                               rtol=1e-6, atol=1e-6)
