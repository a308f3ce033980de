"""Mixed precision as one policy: ``config.precision`` ("float32" | "bf16") and ``config.precision_overrides``.

A config names one policy for the whole model; the task's ``model_config`` asks this module for each part's dtypes
(:func:`compute_dtype`, :func:`param_dtype`), so no module carries a dtype field of its own in the config.

``"float32"``: everything in float32. The tiny test configs use it, so the exact parity tests stay exact.

``"bf16"`` (the full recipes and the OACIR laptop demo; the IDMR demo measured no faster in bf16 on a 2-core CPU):

* trainable parameters and the optimiser state are float32 (the update is applied to float32 master weights);
* matmuls and activations are bfloat16; matrix units (TPU MXU, GPU tensor cores, CPU AMX) accumulate the products
  in float32;
* float32 whatever the policy: LayerNorm / RMSNorm statistics, BatchNorm folding, softmax, the L2 normalisation
  of the features, the temperature-scaled logits, their logsumexp and the loss;
* the features that meet in the global InfoNCE are bfloat16: their all-gather (or ring ``ppermute``), and the
  reduce-scatter that is its transpose in the backward pass, move half the bytes
  (:mod:`idmr_jax.losses.contrastive` gathers features in the dtype they arrive in; the ring's gradient
  accumulators alone stay float32);
* frozen parts (a frozen vision tower, the LM base under LoRA, a frozen projector) *store* their weights in their
  compute dtype. A matmul kernel is cast to the compute dtype before every matmul anyway, so the matmuls see the
  same values; only the frozen LayerNorm / BatchNorm parameters are rounded once. It halves their memory
  (EVA ViT-g/14: 1.0B parameters, 4 GB -> 2 GB), their checkpoint and their host-to-device copy. Converters and
  checkpoint restores keep working: ``write_into_state`` and Orbax cast to the state's dtype.

Parts (``PARTS``): OACIR ``vision`` (ViT or EfficientNet), ``qformer`` (with ``ln_vision``, the query tokens and the
projection heads: its outputs are the features), ``caam`` (the probe tokens and the CRM); IDMR ``vision``,
``projector``, ``text`` (the decoder LM) and ``lora`` (the LoRA branch's compute dtype; its factors train, so
they are float32). ``config.precision_overrides = {part: "float32" | "bfloat16"}`` sets one part's compute dtype
(and, for a frozen part, its storage) against the policy, e.g. ``{"vision": "bfloat16"}`` under "float32".

Drift of "bf16" against "float32" on the tiny configs, same init and batch, per model family (ViT, EfficientNet,
Q-Former, CAAM, decoder LM, LoRA) and for one train step of the tiny AdaFocal and IDMR recipes; asserted by
``tests/test_precision.py`` from :data:`TOLERANCES` (measured maxima in brackets, CPU, JAX 0.10):

* ``features``: ||f_bf16 - f_f32|| / ||f_f32|| of the outputs (0.048, the tiny Q-Former with its wide 0.2 init; the
  L2-normalised AdaFocal features 0.035). bf16 keeps 8 mantissa bits, 0.4% per rounding, compounded over layers;
* ``loss``: |L_bf16 - L_f32| / L_f32 (0.014, tiny AdaFocal at temperature 0.07);
* ``grad``: 1 - cosine(g_bf16, g_f32) of the whole gradient (0.013, Q-Former);
* ``step``: ||u_bf16 - u_f32|| / ||u_f32|| of the first optimiser update u (0.52, tiny AdaFocal). Adam's first
  update is lr * g / |g| elementwise: a gradient entry below the rounding noise flips sign, which is why this bound
  is loose; an update in a random direction would read sqrt(2), a reversed one 2.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import ml_collections

from idmr_jax.tasks import model_task_name

POLICIES = ("float32", "bf16")
DTYPES = ("float32", "bfloat16")  # what an override may name
# The compute dtype of every part under each policy.
_POLICY_DTYPE = {"float32": "float32", "bf16": "bfloat16"}
# The parts of each task's model that take a dtype (see the module docstring).
PARTS = {"oacir": ("vision", "qformer", "caam"), "idmr": ("vision", "projector", "text", "lora")}
# bf16 vs float32 drift bounds on the tiny configs (see the module docstring; tests/test_precision.py).
TOLERANCES = {"features": 0.1, "loss": 0.03, "grad": 0.03, "step": 0.8}
# Config fields of the per-module dtypes that ``precision`` replaced, by task: (field, part it maps to).
_LEGACY_FIELDS = {"oacir": (("vision.dtype", "vision"), ("qformer.dtype", "qformer")),
                  "idmr": (("vision.dtype", "vision"), ("text.dtype", "text"), ("text.dtype", "projector"),
                           ("text.dtype", "lora"))}


def policy(config: ml_collections.ConfigDict) -> str:
    """``config.precision``; "float32" for a config without one."""
    return config.get("precision", "float32")


def _overrides(config: ml_collections.ConfigDict) -> Mapping[str, str]:
    return config.get("precision_overrides") or {}


def _check_part(config: ml_collections.ConfigDict, part: str) -> None:
    parts = PARTS[model_task_name(config)]
    if part not in parts:
        raise ValueError(f"unknown precision part {part!r} for task {model_task_name(config)!r}; parts: {list(parts)}")


def compute_dtype(config: ml_collections.ConfigDict, part: str) -> jnp.dtype:
    """The dtype `part` computes in: ``config.precision_overrides[part]``, else the policy's."""
    _check_part(config, part)
    name = _overrides(config).get(part) or _POLICY_DTYPE[policy(config)]
    return jnp.dtype(name)


def param_dtype(config: ml_collections.ConfigDict, part: str, *, frozen: bool) -> jnp.dtype:
    """The dtype `part` stores its weights in: float32 when it trains (master weights for the optimiser), its
    compute dtype when it is frozen (see the module docstring)."""
    return compute_dtype(config, part) if frozen else jnp.dtype(jnp.float32)


def policy_for_dtype(name: str) -> str:
    """The policy whose compute dtype is `name` ("bfloat16" or "bf16" -> "bf16", "float32" -> "float32"), e.g. for
    a ``--dtype`` flag."""
    policies = {"bf16": "bf16", "bfloat16": "bf16", "float32": "float32"}
    if name not in policies:
        raise ValueError(f"no precision policy computes in {name!r}; use one of {sorted(policies)}")
    return policies[name]


def dtype_name(dtype) -> str:
    """``jnp.dtype`` -> the name the model configs take ("float32", "bfloat16")."""
    return jnp.dtype(dtype).name


def check(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError for an unknown policy, part or dtype in ``config.precision`` / ``precision_overrides``."""
    if policy(config) not in POLICIES:
        raise ValueError(f"config.precision = {policy(config)!r}: use one of {list(POLICIES)}")
    parts = PARTS[model_task_name(config)]
    for part, dtype in dict(_overrides(config)).items():
        if part not in parts:
            raise ValueError(f"config.precision_overrides has unknown part {part!r} for task "
                             f"{model_task_name(config)!r}; parts: {list(parts)}")
        if dtype not in DTYPES:
            raise ValueError(f"config.precision_overrides.{part} = {dtype!r}: use one of {list(DTYPES)}")


def upgrade_legacy_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A config saved before ``config.precision`` existed, with its per-module dtypes as the equivalent policy.

    Configs written before the precision policy carry ``model.vision.dtype`` / ``model.qformer.dtype`` (OACIR) or
    ``model.vision.dtype`` / ``model.text.dtype`` / ``model.text.param_dtype`` (IDMR). They map to policy
    "float32" with one override per part that ran in another dtype (e.g. the full OACIR recipe's frozen ViT in
    bfloat16 -> ``{"vision": "bfloat16"}``), and the old fields are removed, so the model builds as it was trained
    (a frozen bf16 part now stores bf16 weights: the same values its matmuls saw) and a resume compares it with
    today's config field by field. A config that already has ``precision`` is returned as is. Works in place and
    returns `config`.
    """
    if "precision" in config or "model" not in config:
        return config
    try:
        legacy = _LEGACY_FIELDS[model_task_name(config)]
    except ValueError:  # an unknown task: left for the caller's own check to report
        return config
    overrides = {}
    for field, part in legacy:
        node, leaf = field.split(".")
        dtype = config.model.get(node, {}).get(leaf, "float32")
        if dtype != "float32":
            overrides[part] = dtype
    with config.unlocked():
        for field, _ in legacy:
            node, leaf = field.split(".")
            if node in config.model and leaf in config.model[node]:
                del config.model[node][leaf]
        if "text" in config.model and "param_dtype" in config.model.text:
            del config.model.text["param_dtype"]  # always float32 then: trainable parts still are
        config.precision = "float32"
        config.precision_overrides = ml_collections.ConfigDict(overrides)
    return config
