"""`convert import` refuses what it cannot import faithfully or safely, with one line that names the tensor or file:
non-float tensors where floats are wanted, NaN / inf weights, unsafe pickles, truncated files, bad JSON, and
shard entries that leave the checkpoint folder. Float-to-float casts are allowed and logged once per dtype pair."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from jax_env import subprocess_env
from idmr_jax import convert
from idmr_jax.weights import io, torch_io
from idmr_jax.weights.checks import ConvertError, cast_tensors
from idmr_jax.weights.mapping import NameMap, Rule

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A float32 transformers CLIPVisionModel folder (one layer, 2x2 patches)."""
    folder = tmp_path_factory.mktemp("clip")
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=28, patch_size=14)
    torch.manual_seed(0)
    transformers.CLIPVisionModel(cfg).save_pretrained(folder)
    return folder


def _weight_name(sd: dict) -> str:
    return next(k for k in sorted(sd) if k.endswith("patch_embedding.weight"))


def _variant(src: Path, dst: Path, change) -> Path:
    """A copy of checkpoint folder `src` whose state dict is `change(state dict)`."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    sd = dict(load_file(str(src / "model.safetensors")))
    save_file(change(sd), str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _import(src: Path, out: Path, *extra: str, fmt: str = "hf_clip_vision") -> int:
    return convert.main(["import", "--format", fmt, "--src", str(src), "--out", str(out), *extra])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    return err[0]


# ----------------------------------------------------------------------------------------------
# Tensor dtypes and values.


def test_integer_tensor_where_float_expected_is_refused(tiny_clip, tmp_path, capsys):
    name = _weight_name(load_file(str(tiny_clip / "model.safetensors")))
    src = _variant(tiny_clip, tmp_path / "int", lambda sd: {**sd, name: sd[name].astype(np.int32)})
    assert _import(src, tmp_path / "out") == 2
    line = _one_error_line(capsys)
    assert name in line and "int32" in line and "float" in line
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConvertError, match=f"{name}.*bool"):
        NameMap([Rule(name, "w")]).torch_to_flax({name: np.ones(3, bool)})


def test_cast_rule_allows_float_to_float_only(capsys):
    f16, i32 = np.ones(2, np.float16), np.ones(2, np.int32)
    out = cast_tensors({"a": f16, "b": i32}, {"a": np.float32, "b": np.int32}, source="ckpt")
    assert out["a"].dtype == np.float32 and out["b"] is i32
    assert capsys.readouterr().err.strip() == "ckpt: casting float16 -> float32 (1 tensor)"
    with pytest.raises(ConvertError, match="'w' is float16, the model wants int32"):
        cast_tensors({"w": f16}, {"w": np.int32}, source="ckpt")
    with pytest.raises(ConvertError, match="'w' is int32, the model wants float32"):
        cast_tensors({"w": i32}, {"w": np.float32}, source="ckpt")


def test_float16_checkpoint_imports_with_one_log_line_per_pair(tiny_clip, tmp_path, capsys):
    half = _variant(tiny_clip, tmp_path / "half", lambda sd: {k: v.astype(np.float16) for k, v in sd.items()})
    upcast = _variant(half, tmp_path / "upcast", lambda sd: {k: v.astype(np.float32) for k, v in sd.items()})
    assert _import(half, tmp_path / "out_half") == 0
    casts = [line for line in capsys.readouterr().err.splitlines() if "casting" in line]
    n = len(load_file(str(half / "model.safetensors")))
    assert casts == [f"{half}: casting float16 -> float32 ({n} tensors)"], casts
    assert _import(upcast, tmp_path / "out_upcast") == 0
    assert "casting" not in capsys.readouterr().err
    _, _, got = io.restore_params(tmp_path / "out_half")
    _, _, want = io.restore_params(tmp_path / "out_upcast")
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == np.float32 and np.array_equal(got[k], want[k]), k


def test_pretrained_init_cast_is_float_only_and_logged(tiny_clip, tmp_path, capsys):
    src = _variant(tiny_clip, tmp_path / "bf", lambda sd: {**sd, "ids": np.arange(3, dtype=np.int64),
                                                           **{k: v.astype(np.float64) for k, v in sd.items()}})
    sd = torch_io.load_torch_state_dict(src, float_dtype=np.float32)  # what the tasks' pretrained init reads
    assert sd["ids"].dtype == np.int64 and all(v.dtype == np.float32 for k, v in sd.items() if k != "ids")
    assert capsys.readouterr().err.count("casting float64 -> float32") == 1


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_weight_is_refused_unless_allowed(tiny_clip, tmp_path, capsys, bad):
    name = _weight_name(load_file(str(tiny_clip / "model.safetensors")))

    def poison(sd):
        w = sd[name].copy()
        w.flat[:3] = bad
        return {**sd, name: w}

    src = _variant(tiny_clip, tmp_path / "nan", poison)
    assert _import(src, tmp_path / "out") == 2
    line = _one_error_line(capsys)
    assert name in line and "3 non-finite" in line and "--allow-nonfinite" in line
    with pytest.raises(ConvertError, match="3 non-finite"):  # the tasks' pretrained init reads the same way
        torch_io.load_torch_state_dict(src, float_dtype=np.float32)
    assert _import(src, tmp_path / "out", "--allow-nonfinite") == 0
    _, _, flat = io.restore_params(tmp_path / "out")
    assert sum(int((~np.isfinite(v)).sum()) for v in flat.values()) == 3


# ----------------------------------------------------------------------------------------------
# Unreadable files.


class _Payload:
    """Unpickling this runs a shell command that creates `marker` (it must never run)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


class _Arbitrary:
    """An ordinary class: still not something a weights-only unpickler rebuilds."""


@pytest.mark.parametrize("payload", ["system", "class"])
def test_unsafe_pickle_is_refused_without_running_it(tmp_path, capsys, payload):
    marker = tmp_path / "payload_ran"
    obj = _Payload(marker) if payload == "system" else _Arbitrary()
    src = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "extra": obj}, src)
    assert _import(src, tmp_path / "out", fmt="lavis_blip2") == 2
    line = _one_error_line(capsys)
    assert str(src) in line and "not a weights-only checkpoint" in line and "cannot be loaded safely" in line
    assert "weights_only=False" not in line and "weights_only" not in line.replace("weights-only", "")
    assert not marker.exists()


def test_unsafe_pickle_cli_subprocess(tmp_path):
    # The real command line in a fresh interpreter (~10 s: the error comes before any model is built).
    marker = tmp_path / "payload_ran"
    src = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2), "extra": _Payload(marker)}, src)
    env = subprocess_env(devices=1)
    proc = subprocess.run([sys.executable, "-m", "idmr_jax.convert", "import", "--format", "lavis_blip2", "--src",
                           str(src), "--out", str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(src) in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert "weights_only=False" not in proc.stderr and not marker.exists()


def test_truncated_safetensors_names_the_file(tiny_clip, tmp_path, capsys):
    data = (tiny_clip / "model.safetensors").read_bytes()
    for i, cut in enumerate((4, 40, len(data) - 16)):
        src = tmp_path / f"cut{i}.safetensors"
        src.write_bytes(data[:cut])
        assert _import(src, tmp_path / "out", fmt="lavis_blip2") == 2
        line = _one_error_line(capsys)
        assert str(src) in line and "not a readable safetensors file" in line


def test_truncated_torch_file_names_the_file(tmp_path, capsys):
    full = tmp_path / "full.pth"
    torch.save({"w": torch.zeros(64)}, full)
    src = tmp_path / "cut.pth"
    src.write_bytes(full.read_bytes()[:200])
    assert _import(src, tmp_path / "out", fmt="lavis_blip2") == 2
    assert str(src) in _one_error_line(capsys)


def test_config_that_is_not_json_names_the_file(tiny_clip, tmp_path, capsys):
    src = _variant(tiny_clip, tmp_path / "badcfg", lambda sd: sd)
    (src / "config.json").write_text('{"model_type": "clip_vision_model",')
    assert _import(src, tmp_path / "out") == 2
    line = _one_error_line(capsys)
    assert str(src / "config.json") in line and "not a valid JSON file" in line


# ----------------------------------------------------------------------------------------------
# Sharded checkpoints: shard names stay inside the folder.


@pytest.mark.parametrize("index_file", ["model.safetensors.index.json", "pytorch_model.bin.index.json"])
@pytest.mark.parametrize("entry", ["../x.safetensors", "sub/../../x.safetensors", "ABSOLUTE", "link.safetensors"])
def test_index_entry_outside_the_folder_is_refused(tiny_clip, tmp_path, capsys, index_file, entry):
    outside = tmp_path / "x.safetensors"
    outside.write_bytes((tiny_clip / "model.safetensors").read_bytes())
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_clip / "config.json").read_text())
    if entry == "ABSOLUTE":
        entry = str(outside)
    elif entry == "link.safetensors":
        (folder / entry).symlink_to(outside)
    (folder / index_file).write_text(json.dumps({"weight_map": {"a.weight": entry}}))
    with pytest.raises(ConvertError, match="outside the checkpoint folder") as e:
        torch_io.load_torch_state_dict(folder)
    assert str(folder / index_file) in str(e.value) and repr(entry) in str(e.value)
    assert _import(folder, tmp_path / "out") == 2
    line = _one_error_line(capsys)
    assert str(folder / index_file) in line and repr(entry) in line


def test_index_entry_inside_the_folder_still_loads(tiny_clip, tmp_path):
    folder = tmp_path / "ckpt"
    (folder / "shards").mkdir(parents=True)
    (folder / "shards" / "a.safetensors").write_bytes((tiny_clip / "model.safetensors").read_bytes())
    names = load_file(str(tiny_clip / "model.safetensors"))
    weight_map = {k: "shards/./a.safetensors" for k in names}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert set(torch_io.load_torch_state_dict(folder)) == set(names)
