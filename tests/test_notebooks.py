"""Executes the Colab notebooks in notebooks/ top to bottom (short variants) and checks what they report.

Each notebook runs in a fresh IPython kernel started from this interpreter (a kernelspec written to a temporary
folder, so no system-wide ``python3`` kernel can substitute another Python), with the repository root as its
working directory, one CPU device, ``IDMR_NOTEBOOK_QUICK=1`` (tiny benchmark, 2 training steps) and
``IDMR_NOTEBOOK_DIR`` pointing at a temporary folder where the notebooks write their outputs and a summary JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from jax_env import subprocess_env

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
CELL_TIMEOUT_S = 900  # the quickstart's training cell compiles the train step: minutes on a busy 2-core machine


def _kernel_manager(tmp: Path):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = tmp / "kernels" / "idmr-test"
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "idmr_jax tests", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(tmp / "kernels")], ensure_native_kernel=False)
    return KernelManager(kernel_name="idmr-test", kernel_spec_manager=specs)


def _run_notebook(name: str, tmp: Path) -> Path:
    """Executes notebooks/<name>.ipynb; returns the folder it wrote to. A failing cell fails the test with its
    source and traceback (nbclient's CellExecutionError carries both)."""
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code"), \
        f"{name}.ipynb is stored with outputs: clear them"
    out = tmp / "out"
    env = subprocess_env(devices=1, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", IDMR_NOTEBOOK_QUICK="1",
                         IDMR_NOTEBOOK_DIR=str(out),
                         # the kernel's own tracebacks without ANSI colour codes, so failures read cleanly in pytest
                         TERM="dumb", NO_COLOR="1")
    client = nbclient.NotebookClient(nb, km=_kernel_manager(tmp), timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(ROOT)}})
    try:
        client.execute(env=env)
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{name}.ipynb failed:\n{e}", pytrace=False)
    except nbclient.exceptions.CellTimeoutError as e:
        pytest.fail(f"{name}.ipynb: a cell ran over {CELL_TIMEOUT_S} s:\n{e}", pytrace=False)
    finally:
        nbformat.write(nb, tmp / f"{name}.executed.ipynb")  # with outputs, for a look after a failure
    return out


@pytest.mark.slow
def test_quickstart_notebook(tmp_path):
    out = _run_notebook("oacir_quickstart", tmp_path)
    summary = json.loads((out / "quickstart_summary.json").read_text())
    for key in ("demo/R@1", "demo/R@5", "demo/R_ID@1", "avg"):
        assert 0.0 <= summary["metrics"][key] <= 100.0, key
    original, other_text, other_box = summary["original"], summary["other_text"], summary["other_box"]
    assert len(original) == len(other_text) == len(other_box) == 5
    # The same reference with another quadruple's text, or with the box moved off the object, ranks differently.
    assert other_text != original and other_box != original, summary
    eval_dir = out / "quickstart_quick" / "eval"
    assert (eval_dir / "demo_results.png").read_bytes()[:4] == b"\x89PNG"
    # One query at a time (interactive.Retriever: PIL decode, its own encoder) reproduces the evaluation's
    # rankings (Grain gallery pass, cached vision tokens) for both quadruples of the reference.
    lines = (eval_dir / "rankings.jsonl").read_text().splitlines()
    ranked = {r["query_id"]: r["ranking"] for r in map(json.loads, lines)}
    first, second = summary["query_ids"]
    assert ranked[first][:5] == original and ranked[second][:5] == other_text, (ranked, summary)


@pytest.mark.slow
def test_port_and_verify_notebook(tmp_path):
    out = _run_notebook("port_and_verify", tmp_path)
    summary = json.loads((out / "port_summary.json").read_text())
    assert 0.0 <= summary["max_abs_diff"] <= 1e-4, summary["per_output"]
    assert summary["round_trip"] == 0.0
    assert summary["missing_keys"] == [] and summary["unexpected_keys"] == []
