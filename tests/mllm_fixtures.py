"""Helpers shared by the MLLM port tests (test_llava, test_internvl, test_qwen2vl): tiny random transformers
models saved with ``save_pretrained``, the convert CLI with its output captured, and the checks every port makes
of ``convert verify`` and of the import -> export round trip."""

from __future__ import annotations

import contextlib
import io as pyio
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from idmr_jax import convert
from idmr_jax.weights import mapping


def randomise(model: torch.nn.Module, seed: int, *, is_embedding: Callable[[str], bool]) -> None:
    """Moves every parameter off its init so that each one matters for the outputs (the parameters
    `is_embedding` names by a larger step)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if is_embedding(name) else 0.08
            p.add_(torch.randn(p.shape, generator=g) * scale)


def save_random(model_cls, config, folder: Path, *, is_embedding: Callable[[str], bool]):
    """(model, folder): `model_cls(config)` in eval mode, :func:`randomise`-d (torch seed 0, step seed 1) and
    saved to `folder` with ``save_pretrained``."""
    torch.manual_seed(0)
    hf = model_cls(config).eval()
    randomise(hf, 1, is_embedding=is_embedding)
    hf.save_pretrained(folder)
    return hf, folder


def run_convert(argv) -> tuple[int, str]:
    """(exit status, stdout) of ``python -m idmr_jax.convert`` with `argv`."""
    buf = pyio.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = convert.main(argv)
    return rc, buf.getvalue()


def worst_diff(out: str) -> float:
    """The ``max_abs_diff=`` of a verify output's last line."""
    lines = out.strip().splitlines()
    assert lines[-1].startswith("max_abs_diff=")
    return float(lines[-1].split("=")[1])


def check_verify_output(rc: int, out: str, tol: float) -> list[str]:
    """Asserts a passing ``convert verify`` of an MLLM format: 9 per-output lines (3 outputs x 3 cases) whose
    largest difference is the final ``max_abs_diff=``, within `tol`. Returns the lines."""
    assert rc == 0, out
    lines = out.strip().splitlines()
    worst = worst_diff(out)
    per_output = [float(line.rsplit("max_abs_diff=", 1)[1]) for line in lines[:-1]]
    assert len(per_output) == 9 and max(per_output) == pytest.approx(worst, rel=1e-3)
    assert worst <= tol
    return lines


def check_round_trip(folder: Path, back: Path, model_cls):
    """Asserts that the exported `back` holds `folder`'s tensors bit for bit and that `model_cls` loads it
    strictly (no missing, unexpected or misshapen tensor); returns that model."""
    orig, again = load_file(str(folder / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert set(orig) == set(again)
    for k, v in orig.items():
        assert again[k].dtype == v.dtype and np.array_equal(again[k], v), k
    model, info = model_cls.from_pretrained(back, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return model


def perturb_lora_and_projector(model, rng: np.random.Generator, scale: float) -> dict[str, np.ndarray]:
    """Makes a fresh LoRA look trained: adds `scale` * N(0, 1) to every ``lora_b`` and every ``projector/``
    param of `model` (in place); returns the changed params."""
    flat = {k: np.asarray(v) for k, v in mapping.flatten_params(model).items()}
    changed = {k: v + scale * rng.standard_normal(v.shape).astype(v.dtype) for k, v in flat.items()
               if k.endswith("lora_b") or k.startswith("projector/")}
    mapping.load_into(model, {**flat, **changed})
    return changed


def load_with_adapter(model_cls, folder: Path, adapter: Path):
    """(PeftModel of ``model_cls.from_pretrained(folder)`` with the adapter folder `adapter`, in eval mode; the
    names of the modules PEFT gave a LoRA, i.e. those ending in ``lora_A``)."""
    import peft

    base = model_cls.from_pretrained(folder).eval()
    peft_model = peft.PeftModel.from_pretrained(base, adapter).eval()
    return peft_model, [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]


def with_and_without_adapter(peft_model, inputs: dict, read: Callable) -> tuple[np.ndarray, np.ndarray]:
    """``read(peft_model(**inputs))`` with the adapter, then with it disabled (no grad)."""
    with torch.no_grad():
        on = read(peft_model(**inputs))
        with peft_model.disable_adapter():
            off = read(peft_model(**inputs))
    return on, off
