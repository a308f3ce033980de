"""The README's main command on a shortened budget: same code path as the demo, tiny benchmark, 3 steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_end_to_end_shortened(tmp_path):
    # One CPU device, as on a laptop (an 8-way SPMD compile of this model costs minutes for nothing here).
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "idmr_jax.main", "--config=configs/oacir.py:demo", f"--workdir={tmp_path / 'wd'}",
           f"--config.data.demo_cache={tmp_path / 'cache'}", "--config.data.demo_size=tiny",
           "--config.train.num_steps=3", "--config.train.log_every=1", "--config.train.checkpoint_every=3",
           "--config.data.batch_size=8", "--config.eval.batch_size=8", "--config.train.progress=False"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "initialised" in proc.stdout  # the packaged EfficientNet-Lite0 and MiniLM weights were loaded
    eval_dir = tmp_path / "wd" / "eval"
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    for key in ("demo/R@1", "demo/R@5", "demo/R@10", "demo/R@50", "demo/R_ID@1", "demo/R_ID@5", "avg"):
        assert 0.0 <= metrics[key] <= 100.0, key
    rankings = [json.loads(line) for line in (eval_dir / "rankings.jsonl").read_text().splitlines()]
    assert rankings and all(r["subset"] == "demo" for r in rankings)
    assert (eval_dir / "demo_results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads(next((tmp_path / "cache").glob("shards-*/val/manifest.json")).read_text())
    assert manifest["counts"]["queries"] == len(rankings)
