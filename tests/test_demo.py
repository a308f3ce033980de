"""The README's main command on a shortened budget, and the demo's packaged Q-Former weights.

The end-to-end run takes the demo's own code path (the real-photo benchmark built and converted, the packaged
EfficientNet-Lite0, the cached frozen-encoder pass, training, the evaluation and its outputs, the quiet log and the
results table) with a 2-layer, 64-wide Q-Former from scratch: compiling the 384-wide MiniLM Q-Former's programs
would cost most of a minute and prove nothing more. That the bundled MiniLM weights fit the demo's Q-Former is
checked on its own, without building the model.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jax_env import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
SMALL_QFORMER = ["--config.model.init.format=", "--config.model.qformer.num_layers=2",
                 "--config.model.qformer.hidden_size=64", "--config.model.qformer.num_heads=4",
                 "--config.model.qformer.intermediate_size=128", "--config.model.caam.num_heads=4",
                 "--config.model.caam.ffn_dim=128", "--config.model.caam.head_hidden=64",
                 "--config.model.caam.num_layers=1"]


@pytest.mark.slow
def test_demo_end_to_end_shortened(tmp_path):
    # One CPU device, as on a laptop (an 8-way SPMD compile costs time for nothing here).
    env = subprocess_env(devices=1)
    cmd = [sys.executable, "-m", "idmr_jax.main", "--config=configs/oacir.py:demo", f"--workdir={tmp_path / 'wd'}",
           f"--config.data.demo_cache={tmp_path / 'cache'}", "--config.data.demo_size=tiny",
           "--config.train.num_steps=2", "--config.train.log_every=1", "--config.data.batch_size=8",
           "--config.eval.batch_size=8", "--config.train.progress=False", *SMALL_QFORMER]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "initialised" in proc.stdout  # the packaged EfficientNet-Lite0 weights were loaded
    assert "frozen-encoder tokens" in proc.stdout  # the demo trains on cached tokens
    # Quiet by default: no INFO lines from Orbax, absl, Grain or JAX (warnings and errors would still show).
    assert not [line for line in proc.stderr.splitlines() if line.startswith("I")], proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("oacir results"):].splitlines()
    assert table[1].split()[:3] == ["subset", "R@1", "R@5"] and table[2].split()[0] == "demo"

    eval_dir = tmp_path / "wd" / "eval"
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    for key in ("demo/R@1", "demo/R@5", "demo/R@10", "demo/R@50", "demo/R_ID@1", "demo/R_ID@5", "avg"):
        assert 0.0 <= metrics[key] <= 100.0, key
    assert f"{metrics['demo/R@1']:.2f}" in table[2].split()  # the table prints what metrics.json holds
    rankings = [json.loads(line) for line in (eval_dir / "rankings.jsonl").read_text().splitlines()]
    assert rankings and all(r["subset"] == "demo" for r in rankings)
    assert (eval_dir / "demo_results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads(next((tmp_path / "cache").glob("shards-*/val/manifest.json")).read_text())
    assert manifest["counts"]["queries"] == len(rankings)
    # The final checkpoint only (config: checkpoint_every beyond the demo's steps).
    assert sorted(p.name for p in (tmp_path / "wd" / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]


def test_the_bundled_minilm_initialises_the_demo_qformer():
    """configs/oacir.py:demo's Q-Former takes every tensor of the packaged all-MiniLM-L6-v2 with its shape; only the
    cross-attention (which BERT lacks) starts fresh."""
    from flax import nnx

    from configs import oacir
    from idmr_jax.data.text import bundled_tokenizer_dir
    from idmr_jax.models.qformer import QFormer
    from idmr_jax.tasks.oacir.task import model_config
    from idmr_jax.weights.blip2.names import qformer_from_bert
    from idmr_jax.weights.torch_io import load_torch_state_dict

    cfg = model_config(oacir.get_config("demo")).blip2.qformer
    converted, left = qformer_from_bert(load_torch_state_dict(bundled_tokenizer_dir(), float_dtype=np.float32), cfg)
    shapes = {"/".join(str(k) for k in path): v.shape
              for path, v in nnx.to_flat_state(nnx.state(nnx.eval_shape(lambda: QFormer(cfg, rngs=nnx.Rngs(0))), nnx.Param))}
    assert {k: v.shape for k, v in converted.items()} == {k: shapes[k] for k in converted}
    assert len(converted) > 100 and left and all("crossattention" in k for k in left)
    assert set(converted) | set(left) == set(shapes)
