"""Export of trained AdaFocal checkpoints: official PyTorch names (lavis_adafocal), transformers BLIP-2 (hf_blip2)
and the jax.export serving artifact, from a tiny model trained for 2 steps by ``python -m idmr_jax.main``."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from jax_env import subprocess_env
from idmr_jax import convert
from idmr_jax.weights import adafocal as adafocal_weights
from idmr_jax.weights import io, workdir
from idmr_jax.weights.blip2 import convert as blip2_convert
from idmr_jax.weights.blip2 import verify as blip2_verify
from idmr_jax.weights.conversion import ConvertError, ExportOptions
from idmr_jax.weights.mapping import flatten_params, unstack_from_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import oacir  # noqa: E402


# ----------------------------------------------------------------------------------------------
# The official state dict of Blip2QformerOacirAdaFocal for the paper config, written by hand from
# github HaHaJun1101/OACIR lavis/models/blip2_models/{blip2_qformer_oacir_adafocal,blip2,Qformer}.py and
# lavis/models/eva_vit.py (create_eva_vit_g: 1408 wide, 39 blocks, mlp_ratio 4.3637 -> 6144, patch 14, 224 px,
# qkv_bias -> q_bias/v_bias, no final norm; BertLMHeadModel from bert-base-uncased resized to 30523 = + [DEC];
# nn.TransformerEncoderLayer(768, nhead=8) defaults: FFN 2048; output_head Linear(768, 512) ReLU Linear(512, 1)).

_EVA_BLOCK = {
    "norm1.weight": (1408,), "norm1.bias": (1408,),
    "attn.q_bias": (1408,), "attn.v_bias": (1408,), "attn.qkv.weight": (4224, 1408),
    "attn.proj.weight": (1408, 1408), "attn.proj.bias": (1408,),
    "norm2.weight": (1408,), "norm2.bias": (1408,),
    "mlp.fc1.weight": (6144, 1408), "mlp.fc1.bias": (6144,), "mlp.fc2.weight": (1408, 6144), "mlp.fc2.bias": (1408,),
}


def _bert_attention(kv_width: int) -> dict:
    return {"self.query.weight": (768, 768), "self.query.bias": (768,),
            "self.key.weight": (768, kv_width), "self.key.bias": (768,),
            "self.value.weight": (768, kv_width), "self.value.bias": (768,),
            "output.dense.weight": (768, 768), "output.dense.bias": (768,),
            "output.LayerNorm.weight": (768,), "output.LayerNorm.bias": (768,)}


def _bert_ffn(suffix: str) -> dict:
    return {f"intermediate{suffix}.dense.weight": (3072, 768), f"intermediate{suffix}.dense.bias": (3072,),
            f"output{suffix}.dense.weight": (768, 3072), f"output{suffix}.dense.bias": (768,),
            f"output{suffix}.LayerNorm.weight": (768,), f"output{suffix}.LayerNorm.bias": (768,)}


_CRM_LAYER = {
    "self_attn.in_proj_weight": (2304, 768), "self_attn.in_proj_bias": (2304,),
    "self_attn.out_proj.weight": (768, 768), "self_attn.out_proj.bias": (768,),
    "linear1.weight": (2048, 768), "linear1.bias": (2048,), "linear2.weight": (768, 2048), "linear2.bias": (768,),
    "norm1.weight": (768,), "norm1.bias": (768,), "norm2.weight": (768,), "norm2.bias": (768,),
}


def _official_paper_state_dict(beta_outputs: int | None = 1) -> dict[str, tuple]:
    """name -> shape; beta_outputs 1 = Blip2QformerOacirAdaFocal, 32 = the vector variant, None = the baseline."""
    sd = {"visual_encoder.cls_token": (1, 1, 1408), "visual_encoder.pos_embed": (1, 257, 1408),
          "visual_encoder.patch_embed.proj.weight": (1408, 3, 14, 14), "visual_encoder.patch_embed.proj.bias": (1408,)}
    for i in range(39):
        sd.update({f"visual_encoder.blocks.{i}.{k}": s for k, s in _EVA_BLOCK.items()})
    sd.update({"ln_vision.weight": (1408,), "ln_vision.bias": (1408,), "query_tokens": (1, 32, 768)})
    q = "Qformer.bert."
    sd.update({q + "embeddings.word_embeddings.weight": (30523, 768),
               q + "embeddings.position_embeddings.weight": (512, 768),
               q + "embeddings.LayerNorm.weight": (768,), q + "embeddings.LayerNorm.bias": (768,),
               q + "embeddings.position_ids": (1, 512)})
    for i in range(12):
        layer = {**{f"attention.{k}": s for k, s in _bert_attention(768).items()},
                 **_bert_ffn(""), **_bert_ffn("_query")}
        if i % 2 == 0:
            layer.update({f"crossattention.{k}": s for k, s in _bert_attention(1408).items()})
        sd.update({f"{q}encoder.layer.{i}.{k}": s for k, s in layer.items()})
    c = "Qformer.cls.predictions."
    sd.update({c + "bias": (30523,), c + "transform.dense.weight": (768, 768), c + "transform.dense.bias": (768,),
               c + "transform.LayerNorm.weight": (768,), c + "transform.LayerNorm.bias": (768,),
               c + "decoder.weight": (30523, 768), c + "decoder.bias": (30523,)})
    sd.update({"vision_proj.weight": (256, 768), "vision_proj.bias": (256,), "text_proj.weight": (256, 768),
               "text_proj.bias": (256,), "temp": ()})
    if beta_outputs is not None:
        sd.update({"contextual_probe_tokens": (1, 8, 768), "crm_module.cls_token": (1, 1, 768),
                   "crm_module.output_head.0.weight": (512, 768), "crm_module.output_head.0.bias": (512,),
                   "crm_module.output_head.2.weight": (beta_outputs, 512),
                   "crm_module.output_head.2.bias": (beta_outputs,)})
        for i in range(2):
            sd.update({f"crm_module.transformer_encoder.layers.{i}.{k}": s for k, s in _CRM_LAYER.items()})
    return sd


def _abstract_export(config_arg: str):
    """Export names / shapes / dtypes of a model built from abstract arrays only (ViT-g is never allocated)."""
    from flax import nnx

    from idmr_jax.tasks.oacir.task import model_config

    config = oacir.get_config(config_arg)
    m = config.model
    m.caam.num_heads, m.caam.ffn_dim = 8, 2048  # the official CRM's (tiny configs use 4 / 128; export refuses those)
    cfg = model_config(config)
    flat = flatten_params(nnx.state(workdir.build_abstract("adafocal", cfg), nnx.Param))
    flat = {k: np.broadcast_to(np.zeros((), v.dtype), v.shape) for k, v in flat.items()}
    sd, notes = adafocal_weights.to_official_state_dict(
        unstack_from_model(flat, adafocal_weights.lavis_adafocal_map(cfg)), cfg, abstract=True)
    return cfg, sd, notes


def test_official_names_and_shapes_paper_config():
    cfg, sd, notes = _abstract_export("paper")
    expected = _official_paper_state_dict()
    got = {k: tuple(v.shape) for k, v in sd.items()}
    assert sorted(set(expected) - set(got)) == [] and sorted(set(got) - set(expected)) == []
    assert {k: s for k, s in got.items() if s != expected[k]} == {}
    assert len(got) == 885
    assert sd["Qformer.bert.embeddings.position_ids"].dtype == np.int64
    assert all(v.dtype == np.float32 for k, v in sd.items() if not k.endswith("position_ids"))
    assert adafocal_weights.official_class(cfg) == "Blip2QformerOacirAdaFocal"
    # configs/oacir.py builds the Q-Former with bert-base's 30522 tokens: the [DEC] row is appended on export.
    assert notes["dec_row_appended"] and notes["dropped"] == ["blip2/itm_head/bias", "blip2/itm_head/kernel"]


def test_vector_and_baseline_variants():
    # The literal covers them too; checked on the tiny config (one ViT-g trace is enough per test file).
    _, scalar, _ = _abstract_export("tiny")
    cfg, vector, _ = _abstract_export("tiny,vector")
    assert adafocal_weights.official_class(cfg) == "Blip2QformerOacirAdaFocalVector"
    assert {k: v.shape for k, v in vector.items() if scalar[k].shape != v.shape} == {
        "crm_module.output_head.2.weight": (8, 64), "crm_module.output_head.2.bias": (8,)}
    cfg, baseline, _ = _abstract_export("tiny,baseline")
    assert adafocal_weights.official_class(cfg) == "Blip2QformerOacirBaseline"
    assert sorted(set(scalar) - set(baseline)) == sorted(
        k for k in _official_paper_state_dict() if k.startswith(("crm_module.", "contextual_probe_tokens")))
    assert set(baseline) < set(scalar)


def test_models_without_an_official_class_are_refused():
    from idmr_jax.tasks.oacir.task import model_config
    from idmr_jax.weights.workdir import ModelSource

    demo = model_config(oacir.get_config("demo"))  # EfficientNet-Lite0 vision encoder
    source = ModelSource("adafocal", demo, {}, {})
    with pytest.raises(ConvertError, match="EfficientNet.*cannot be exported as hf_blip2"):
        blip2_convert.blip2_part(source, "demo-workdir", "hf_blip2")
    with pytest.raises(ConvertError, match="efficientnet"):
        adafocal_weights.export_lavis_adafocal(source, "demo-workdir", "unused", ExportOptions())
    mlp = model_config(oacir.get_config("paper,crm=mlp"))
    with pytest.raises(ValueError, match="aggregator 'mlp'"):
        adafocal_weights.lavis_adafocal_map(mlp)


def test_crm_hyperparameters_that_no_shape_shows_are_checked():
    """The official CRM is nn.TransformerEncoderLayer(d_model=768, nhead=8, dim_feedforward=2048): another head
    count loads strictly into it (no tensor shape depends on it) and computes another beta, so export refuses it."""
    import dataclasses

    from idmr_jax.tasks.oacir.task import model_config
    from idmr_jax.weights.workdir import ModelSource

    paper = model_config(oacir.get_config("paper"))
    adafocal_weights.check_exportable(paper)  # the official values pass
    four_heads = dataclasses.replace(paper, crm=dataclasses.replace(paper.crm, num_heads=4))
    with pytest.raises(ValueError, match="model.caam.num_heads is 4; the official CRM has 8 heads"):
        adafocal_weights.lavis_adafocal_map(four_heads)
    with pytest.raises(ConvertError, match="model.caam.num_heads is 4"):
        adafocal_weights.export_lavis_adafocal(ModelSource("adafocal", four_heads, {}, {}), "wd", "unused",
                                               ExportOptions())
    wide = dataclasses.replace(paper, crm=dataclasses.replace(paper.crm, ffn_dim=1024))
    with pytest.raises(ValueError, match="model.caam.ffn_dim is 1024; the official CRM has 2048 FFN units"):
        adafocal_weights.check_exportable(wide)
    eps = dataclasses.replace(paper, crm=dataclasses.replace(paper.crm, layer_norm_eps=1e-6))
    with pytest.raises(ValueError, match="crm.layer_norm_eps is 1e-06"):
        adafocal_weights.check_exportable(eps)
    tiny = model_config(oacir.get_config("tiny"))  # 4 heads, FFN 128
    with pytest.raises(ValueError, match="num_heads is 4"):
        adafocal_weights.check_exportable(tiny)
    # The baseline has no CRM: nothing to check.
    adafocal_weights.check_exportable(dataclasses.replace(four_heads, beta_mode="none"))


# ----------------------------------------------------------------------------------------------
# A tiny model trained for 2 steps (checkpoints at steps 1 and 2) by the real entry point.


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    wd = tmp_path_factory.mktemp("workdir")
    # One device: the layout of the checkpoint does not matter here and one device compiles fastest.
    env = subprocess_env(devices=1)
    cmd = [sys.executable, "-m", "idmr_jax.main", "--config=configs/oacir.py:tiny,fake", f"--workdir={wd}",
           "--config.train.num_steps=2", "--config.train.checkpoint_every=1", "--config.data.batch_size=4",
           "--config.model.qformer.num_layers=2",  # layer 0 with cross-attention, layer 1 without: both kinds
           "--config.model.caam.num_heads=8", "--config.model.caam.ffn_dim=2048",  # the official CRM's (lavis_adafocal)
           "--config.eval.at_end=False", "--config.train.progress=False", "--config.train.async_checkpoints=False"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return wd


@pytest.fixture(scope="module")
def latest(trained) -> workdir.TrainedCheckpoint:
    return workdir.restore(trained)


def _safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return dict(load_file(str(path)))


@pytest.mark.slow  # the trained fixture: 2 steps of the tiny model, about 50 s
def test_workdir_latest_step_and_step_dir(trained, latest):
    assert workdir.find_checkpoint(trained) == (trained / "checkpoints" / "2", 2)
    first = workdir.restore(trained / "checkpoints" / "1")
    assert latest.step == 2 and first.step == 1 and latest.kind == "adafocal"
    assert latest.model_config.blip2.num_query_tokens == 8 and set(latest.flat) == set(first.flat)
    assert any(k.startswith("blip2/vision/") for k in latest.flat)  # frozen params are read too
    moved = [k for k in latest.flat if not np.array_equal(latest.flat[k], first.flat[k])]
    assert "probe_tokens" in moved and not any(k.startswith("blip2/vision/") for k in moved)
    with pytest.raises(FileNotFoundError, match="neither a training workdir"):
        workdir.read_source(trained / "checkpoints")
    assert convert.main(["export", "--format", "jax_serving", "--src", str(trained), "--out",
                         str(trained / "never"), "--platforms", "gpu"]) == 2
    assert not (trained / "never").exists()


@pytest.mark.slow
def test_lavis_adafocal_export_import_bit_exact(trained, latest, tmp_path):
    out = tmp_path / "lavis"
    assert convert.main(["export", "--format", "lavis_adafocal", "--src", str(trained), "--out", str(out)]) == 0
    sd = _safetensors(out / "model.safetensors")
    ck = latest
    cfg = ck.model_config
    # The real export has exactly the names / shapes of the abstract (shape-only) path the paper test uses.
    flat = unstack_from_model(ck.flat, adafocal_weights.lavis_adafocal_map(cfg))
    abstract, _ = adafocal_weights.to_official_state_dict(flat, cfg, abstract=True)
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in abstract.items()}

    # Values, spot-checked with the official layouts written out independently of the name map.
    f = ck.flat
    np.testing.assert_array_equal(sd["query_tokens"][0], f["blip2/query_tokens"])
    np.testing.assert_array_equal(sd["contextual_probe_tokens"][0], f["probe_tokens"])
    np.testing.assert_array_equal(sd["crm_module.transformer_encoder.layers.1.self_attn.in_proj_weight"],
                                  f["crm/layers/1/in_proj/kernel"].T)
    np.testing.assert_array_equal(sd["crm_module.output_head.2.weight"], f["crm/head_out/kernel"].T)
    qkv_bias = f["blip2/vision/encoder/layers/1/attn/qkv/bias"]  # [3, heads, head_dim]
    np.testing.assert_array_equal(sd["visual_encoder.blocks.1.attn.v_bias"], qkv_bias[2].reshape(-1))
    np.testing.assert_array_equal(sd["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"],
                                  f["blip2/qformer/layers/0/crossattention/key/kernel"].reshape(64, 64).T)
    assert "Qformer.bert.encoder.layer.1.crossattention.self.key.weight" not in sd
    emb = sd["Qformer.bert.embeddings.word_embeddings.weight"]
    np.testing.assert_array_equal(emb[:-1], f["blip2/qformer/word_embeddings/embedding"])
    assert not emb[-1].any()  # the appended [DEC] row
    np.testing.assert_array_equal(sd["Qformer.cls.predictions.decoder.weight"], emb)  # tied, as in LAVIS
    np.testing.assert_array_equal(sd["Qformer.bert.embeddings.position_ids"], np.arange(512)[None])
    assert float(sd["temp"]) == float(f["blip2/temp"]) and sd["temp"].shape == ()

    # Without model_config.json the architecture is read off the shapes (head counts by convention).
    inferred = adafocal_weights.infer_config(sd, blip2_convert.infer_lavis_config(sd))
    assert inferred.blip2.qformer.vocab_size == 30523 and inferred.blip2.qformer.num_layers == 2
    assert (inferred.crm.num_probes, inferred.crm.num_layers, inferred.crm.ffn_dim, inferred.crm.head_hidden,
            inferred.crm.num_outputs) == (8, 2, 2048, 64, 1) and inferred.beta_mode == "adaptive"

    # Import back: every official tensor lands where it came from, bit for bit; only itm_head is fresh.
    back = tmp_path / "back"
    assert convert.main(["import", "--format", "lavis_adafocal", "--src", str(out), "--out", str(back)]) == 0
    meta = json.loads((back / io.MODEL_CONFIG_FILE).read_text())
    assert meta["kind"] == "adafocal" and meta["source"]["freshly_initialised"] == sorted(adafocal_weights.UNMAPPED)
    kind, _, restored = io.restore_params(back)
    assert kind == "adafocal" and set(restored) == set(ck.flat)
    differ = [k for k in restored if restored[k].tobytes() != ck.flat[k].tobytes()]
    assert set(differ) <= set(adafocal_weights.UNMAPPED)  # (the itm_head bias may still equal its zero init)
    # ... and exporting the imported model gives the same file contents.
    again = tmp_path / "again"
    assert convert.main(["export", "--format", "lavis_adafocal", "--src", str(back), "--out", str(again)]) == 0
    sd2 = _safetensors(again / "model.safetensors")
    assert set(sd2) == set(sd) and all(sd2[k].tobytes() == sd[k].tobytes() for k in sd)


@pytest.mark.slow
def test_crm_matches_torch_transformer_encoder(latest):
    """The exported crm_module.* in a torch nn.TransformerEncoder + head (the official CRM) gives our beta."""
    import jax
    from flax import nnx

    ck = latest
    rng = np.random.default_rng(0)
    # Training moved the params by ~1e-3 only: noise on every CRM tensor makes a swapped bias or norm visible.
    flat = {k: (v + 0.05 * rng.standard_normal(v.shape).astype(v.dtype)) if k.startswith("crm/") else v
            for k, v in ck.flat.items()}
    model = workdir.load_module("adafocal", ck.model_config, flat)
    sd, _ = adafocal_weights.to_official_state_dict(
        unstack_from_model(flat, adafocal_weights.lavis_adafocal_map(ck.model_config)), ck.model_config)

    c = ck.model_config.crm

    class CRM(torch.nn.Module):  # the names and semantics of the official ContextualReasoningModule
        def __init__(self):
            super().__init__()
            self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, c.hidden_size))
            layer = torch.nn.TransformerEncoderLayer(d_model=c.hidden_size, nhead=c.num_heads,
                                                     dim_feedforward=c.ffn_dim, batch_first=True)
            self.transformer_encoder = torch.nn.TransformerEncoder(layer, num_layers=c.num_layers,
                                                                   enable_nested_tensor=False)
            self.output_head = torch.nn.Sequential(torch.nn.Linear(c.hidden_size, c.head_hidden), torch.nn.ReLU(),
                                                   torch.nn.Linear(c.head_hidden, c.num_outputs))

        def forward(self, x):
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            return torch.nn.functional.softplus(self.output_head(self.transformer_encoder(x)[:, 0]))

    ref = CRM().eval()
    crm = {k[len("crm_module."):]: torch.from_numpy(np.array(v)) for k, v in sd.items() if k.startswith("crm_module.")}
    ref.load_state_dict(crm, strict=True)
    probes = rng.standard_normal((3, c.num_probes, c.hidden_size)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(probes)).numpy()
    got = np.asarray(nnx.jit(lambda m, x: m.crm(x))(model, jax.numpy.asarray(probes)))
    assert want.shape == got.shape == (3, 1)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.ptp(want) > 1e-3  # distinct inputs give distinct betas: the comparison is not vacuous


@pytest.mark.slow
def test_hf_blip2_from_workdir_loads_strictly_and_matches(trained, latest, tmp_path):
    import transformers

    out = tmp_path / "hf"
    assert convert.main(["export", "--format", "hf_blip2", "--src", str(trained), "--out", str(out)]) == 0
    model, info = transformers.Blip2ForImageTextRetrieval.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    # The workdir trained the LAVIS recipe (ln_vision eps 1e-5); transformers' post_layernorm always takes the
    # ViT's eps (1e-6), which the exporter warns about. Compare with the port at the eps the HF model computes with.
    hf_cfg = dataclasses.replace(latest.model_config,
                                 blip2=dataclasses.replace(latest.model_config.blip2, ln_vision_eps=None))
    port = workdir.load_module("adafocal", hf_cfg, latest.flat)
    pixels, ids, mask = blip2_verify.random_inputs(model.config, batch=2, text_len=8, seed=1)
    ref = blip2_verify.reference_outputs(model.float().eval(), pixels, ids, mask)
    got = blip2_verify.port_outputs(port.blip2, pixels, ids, mask)
    for name in ("vision_tokens", "qformer_image", "qformer_image_text", "image_features", "text_features"):
        np.testing.assert_allclose(got[name], ref[name], atol=1e-4, rtol=0, err_msg=name)


_RUN_STANDALONE = textwrap.dedent("""
    import importlib.util, sys
    import numpy as np
    # A vendored copy of idmr_jax/serving.py, imported by path: no idmr_jax, no flax (the artifact holds no code).
    spec = importlib.util.spec_from_file_location("adafocal_serving", sys.argv[4])
    serving = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serving)
    query_fn, target_fn = serving.load(sys.argv[1])
    x = dict(np.load(sys.argv[2]))
    out = {"query": np.asarray(query_fn(x["pixels"], x["input_ids"], x["attention_mask"], x["box"], x["has_box"]))}
    for n in (3, 1):  # two batch sizes through the one symbolic-batch export (the cheaper function)
        out[f"target{n}"] = np.asarray(target_fn(x["pixels"][:n]))
    np.savez(sys.argv[3], **out)
    bad = sorted(m for m in ("flax", "idmr_jax", "torch", "orbax") if m in sys.modules)
    assert not bad, bad
""")


@pytest.mark.slow
def test_jax_serving_runs_standalone(trained, latest, tmp_path):
    import jax.numpy as jnp
    from flax import nnx

    from idmr_jax.data.boxes import box_to_patch_mask

    out = tmp_path / "serving"
    assert convert.main(["export", "--format", "jax_serving", "--src", str(trained), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["params.npz", "query.jaxexport", "serving.json",
                                                     "target.jaxexport"]  # data only
    meta = json.loads((out / "serving.json").read_text())
    assert meta["platforms"] == ["cpu", "cuda", "tpu"] and meta["max_text_len"] == 32
    assert meta["functions"]["query"]["outputs"][0]["shape"] == ["b", 32]
    assert meta["functions"]["target"]["outputs"][0]["shape"] == ["b", 8, 32]

    rng = np.random.default_rng(2)
    b, length = 3, 32
    x = {"pixels": rng.standard_normal((b, 56, 56, 3)).astype(np.float32),
         "input_ids": rng.integers(1, 30522, (b, length)).astype(np.int32),
         "attention_mask": np.ones((b, length), np.int32),
         "box": np.array([[3.0, 5.5, 30.0, 41.0], [20.0, 0.0, 56.0, 28.0], [1.0, 1.0, 9.0, 9.0]], np.float32),
         "has_box": np.array([True, True, False])}
    x["attention_mask"][1, 12:] = 0
    x["input_ids"][1, 12:] = 0
    np.savez(tmp_path / "inputs.npz", **x)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", _RUN_STANDALONE, str(out), str(tmp_path / "inputs.npz"),
                           str(tmp_path / "outputs.npz"), str(REPO / "idmr_jax" / "serving.py")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    served = dict(np.load(tmp_path / "outputs.npz"))

    # The in-process model, with the box rasterised by the data pipeline's NumPy rule.
    model = workdir.load_module("adafocal", latest.model_config, latest.flat)
    grid = (4, 4)  # 56 px / patch 14
    masks = np.stack([box_to_patch_mask(box if has else None, grid, (56, 56), patch=14)
                      for box, has in zip(x["box"], x["has_box"])])
    assert masks[0].sum() > 0 and masks[2].sum() == 0

    @nnx.jit
    def reference(m, pixels, ids, attention, box_mask):
        image = m.encode_image(pixels)
        query, _ = m.query_features(image, ids, attention, box_mask)
        no_box, _ = m.query_features(image, ids, attention, jnp.zeros_like(box_mask))
        return query, no_box, m.target_features(image)

    query, no_box, target = (np.asarray(a) for a in reference(
        model, x["pixels"], x["input_ids"], x["attention_mask"], jnp.asarray(masks)))
    np.testing.assert_allclose(served["query"], query, atol=1e-5, rtol=0)
    for n in (3, 1):
        np.testing.assert_allclose(served[f"target{n}"], target[:n], atol=1e-5, rtol=0)
    # The box changes the query (beta > 0 on the box patches): the served box input is not ignored.
    assert np.abs(query[:2] - no_box[:2]).max() > 1e-4
