"""The jax_serving artifact is data only: loading it (``idmr_jax.serving.load`` or the vendored copy of that file)
reproduces the exported embeddings in a fresh process, never imports anything from the artifact folder, keeps
every path inside the folder and names the file or field of anything it refuses.

One tiny AdaFocal with random params is exported once for cpu per module (a few seconds); each test that changes
the artifact works on its own copy.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from configs import oacir
from idmr_jax import serving, serving_export
from idmr_jax.tasks.oacir.task import model_config
from idmr_jax.weights import workdir
from idmr_jax.weights.mapping import flatten_params

LOADER_FILE = Path(serving.__file__)  # also the standalone loader users vendor
ARTIFACT_FILES = ["params.npz", "query.jaxexport", "serving.json", "target.jaxexport"]
TEXT_LEN = 8


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, artifact folder): a tiny AdaFocal (56 px, vocabulary 128) with random params, exported for cpu."""
    config = oacir.get_config("tiny")
    config.model.qformer.vocab_size = 128  # a small vocabulary keeps the params small; nothing depends on it
    cfg = model_config(config)
    abstract = flatten_params(nnx.state(workdir.build_abstract("adafocal", cfg), nnx.Param))
    rng = np.random.default_rng(0)
    flat = {k: (0.05 * rng.standard_normal(a.shape)).astype(a.dtype) for k, a in abstract.items()}
    model = workdir.load_module("adafocal", cfg, flat)
    out = tmp_path_factory.mktemp("serving") / "artifact"
    serving_export.export(model, out, platforms=("cpu",), max_text_len=TEXT_LEN)
    return model, Path(out)


@pytest.fixture
def artifact(exported, tmp_path) -> Path:
    """A private copy of the exported artifact, free to tamper with."""
    return Path(shutil.copytree(exported[1], tmp_path / "artifact"))


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    b = 3
    mask = np.ones((b, TEXT_LEN), np.int32)
    mask[1, 5:] = 0
    return {"pixels": rng.standard_normal((b, 56, 56, 3)).astype(np.float32),
            "input_ids": (rng.integers(1, 128, (b, TEXT_LEN)) * mask).astype(np.int32),
            "attention_mask": mask,
            "box": np.array([[3.0, 5.5, 30.0, 41.0], [20.0, 0.0, 56.0, 28.0], [1.0, 1.0, 9.0, 9.0]], np.float32),
            "has_box": np.array([True, True, False])}


# Run in a fresh process whose working directory is neither the repo nor the artifact. `vendored` imports the
# loader file by path under another module name, as a user's copy of it is imported: no idmr_jax, no flax.
_FRESH_LOAD = textwrap.dedent("""
    import importlib.util, sys
    import numpy as np
    loader, artifact, inputs, outputs, loader_file = sys.argv[1:]
    if loader == "package":
        from idmr_jax import serving
    else:
        spec = importlib.util.spec_from_file_location("adafocal_serving", loader_file)
        serving = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(serving)
    assert artifact not in sys.path
    query_fn, target_fn = serving.load(artifact)
    x = dict(np.load(inputs))
    out = {"query": np.asarray(query_fn(x["pixels"], x["input_ids"], x["attention_mask"], x["box"], x["has_box"]))}
    for n in (3, 1):  # two batch sizes through the one symbolic-batch export
        out[f"target{n}"] = np.asarray(target_fn(x["pixels"][:n]))
    np.savez(outputs, **out)
    forbidden = ("torch", "orbax") if loader == "package" else ("flax", "idmr_jax", "torch", "orbax")
    bad = sorted(m for m in forbidden if m in sys.modules)
    assert not bad, bad
""")


def _load_in_fresh_process(loader: str, artifact: Path, tmp_path: Path) -> dict[str, np.ndarray]:
    np.savez(tmp_path / "inputs.npz", **_inputs())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", _FRESH_LOAD, loader, str(artifact), str(tmp_path / "inputs.npz"),
                           str(tmp_path / "outputs.npz"), str(LOADER_FILE)],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(np.load(tmp_path / "outputs.npz"))


def _plant_code(artifact: Path, marker: Path) -> None:
    """Modules that, if ever imported from the artifact folder, leave `marker` behind and fail."""
    for name in ("serving", "numpy", "jax", "flatbuffers", "json", "adafocal_serving"):
        (artifact / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write({name!r})\n"
                                             f"raise RuntimeError('planted {name} was imported')\n")


@pytest.mark.parametrize("loader", ["package", "vendored"])
def test_fresh_process_reproduces_embeddings_without_running_artifact_code(exported, artifact, tmp_path, loader):
    model, _ = exported
    assert sorted(p.name for p in artifact.iterdir()) == ARTIFACT_FILES  # data only: no loader copy
    marker = tmp_path / "planted_code_ran"
    _plant_code(artifact, marker)
    served = _load_in_fresh_process(loader, artifact, tmp_path)
    assert not marker.exists(), marker.read_text()

    leaves, _, query, target = serving_export.embedding_functions(model)
    x = _inputs()
    want_query = np.asarray(jax.jit(query)(leaves, *x.values()))
    want_target = np.asarray(jax.jit(target)(leaves, x["pixels"]))
    np.testing.assert_allclose(served["query"], want_query, atol=1e-5, rtol=0)
    for n in (3, 1):
        np.testing.assert_allclose(served[f"target{n}"], want_target[:n], atol=1e-5, rtol=0)
    assert np.ptp(want_query) > 1e-3  # not a constant output: the comparison is not vacuous


def test_loader_file_needs_only_jax_numpy_and_the_standard_library():
    tree = ast.parse(LOADER_FILE.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0}
    outside = sorted(m for m in imported if m.split(".")[0] not in sys.stdlib_module_names | {"jax", "numpy"})
    assert not outside, outside
    assert not any(isinstance(node, ast.ImportFrom) and node.level for node in ast.walk(tree))


def _edit_metadata(artifact: Path, edit) -> None:
    meta = json.loads((artifact / "serving.json").read_text())
    edit(meta)
    (artifact / "serving.json").write_text(json.dumps(meta))


def _set_field(meta: dict, field: str, value) -> None:
    *parents, last = field.split(".")
    for key in parents:
        meta = meta[key]
    meta[last] = value


@pytest.mark.parametrize("field", ["params_file", "functions.query.file", "functions.target.file"])
@pytest.mark.parametrize("value", ["../x", "/etc/passwd", "sub/../../x", "C:\\x"])
def test_paths_outside_the_artifact_are_refused(artifact, field, value):
    _edit_metadata(artifact, lambda meta: _set_field(meta, field, value))
    with pytest.raises(serving.ServingArtifactError, match=re.escape(f"{field} = {value!r}")):
        serving.load(artifact)


def test_symlink_leaving_the_artifact_is_refused(artifact, tmp_path):
    outside = tmp_path / "outside.npz"
    shutil.move(artifact / "params.npz", outside)
    (artifact / "params.npz").symlink_to(outside)
    with pytest.raises(serving.ServingArtifactError, match=r"params_file = 'params.npz'.*outside the artifact"):
        serving.load(artifact)


@pytest.mark.parametrize("corruption", ["truncated", "random", "zeros", "other_format"])
def test_invalid_jaxexport_is_named(artifact, corruption):
    path = artifact / "target.jaxexport"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "random": np.random.default_rng(3).bytes(len(data)),
                      "zeros": bytes(1000), "other_format": (artifact / "params.npz").read_bytes()[:4096]}[corruption])
    with pytest.raises(serving.ServingArtifactError,
                       match=re.escape(f"{path.resolve()}: not a valid jax.export artifact")):
        serving.load(artifact)


def test_corrupted_program_is_named_at_load_time(artifact):
    path = artifact / "target.jaxexport"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2  # inside the serialized StableHLO: the flatbuffer still parses
    data[middle:middle + 200] = np.random.default_rng(0).bytes(200)
    path.write_bytes(bytes(data))
    with pytest.raises(serving.ServingArtifactError, match=re.escape(str(path.resolve()))):
        serving.load(artifact)


def test_pickled_params_are_refused_and_never_unpickled(artifact, tmp_path):
    marker = tmp_path / "unpickled"
    with np.load(artifact / "params.npz") as npz:
        arrays = dict(npz)
    # An object array whose unpickling would create `marker`.
    payload = np.empty(1, dtype=object)
    payload[0] = _Touch(marker)
    arrays["p0000"] = payload
    np.savez(artifact / "params.npz", **arrays)
    with pytest.raises(serving.ServingArtifactError, match=r"params\.npz: array p0000 .* is refused"):
        serving.load(artifact)
    assert not marker.exists()


class _Touch:
    """Pickles as a call to ``Path.touch(path)``."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


def test_params_not_matching_serving_json_are_refused(artifact):
    with np.load(artifact / "params.npz") as npz:
        arrays = dict(npz)
    first = arrays["p0000"]
    np.savez(artifact / "params.npz", **{**arrays, "p0000": np.zeros(first.shape + (2,), first.dtype)})
    with pytest.raises(serving.ServingArtifactError, match=r"param .*\(p0000\) is .*serving\.json says"):
        serving.load(artifact)
    np.savez(artifact / "params.npz", **{k: v for k, v in arrays.items() if k != "p0001"}, extra=first)
    with pytest.raises(serving.ServingArtifactError, match=r"missing \['p0001'\], undeclared \['extra'\]"):
        serving.load(artifact)


def test_declarations_not_matching_the_functions_are_refused(artifact):
    def grow_first_param(meta):
        meta["params"][0]["shape"] = meta["params"][0]["shape"] + [2]

    _edit_metadata(artifact, grow_first_param)
    with pytest.raises(serving.ServingArtifactError, match=r"query\.jaxexport: takes param .* serving\.json says"):
        serving.load(artifact)

    _edit_metadata(artifact, lambda meta: meta["params"][0].update(dtype="object"))
    with pytest.raises(serving.ServingArtifactError, match=r"params\[0\]\.dtype = 'object': not a numeric dtype"):
        serving.load(artifact)
