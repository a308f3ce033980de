"""Resume rules: a run continues a workdir only with the config the workdir was trained with.

On resume the config saved with the latest checkpoint is compared with the new one, field by field (dotted paths).
Only the fields in :data:`FREE_FIELDS` may change: how long to train, how often to log, checkpoint and evaluate,
where the data and the initial weights are read from, the mesh (Orbax reshards on restore) and how the
run reports. Everything else — the task, the model, the optimiser, the loss, the seed, the batch size and the data
recipe — shapes the state or the training it continues, so a change is an error that lists the fields
(``old -> new``). To change one of them on purpose (e.g. the learning rate) pass
``--config.train.resume=ignore_config``; otherwise start a new workdir.

``config.train.resume``:

    check          (default) compare as above
    ignore_config  resume whatever the config says (a state of a different shape still fails to restore)
    fresh          start from the initial weights in a workdir whose checkpoints were all found corrupt (moved to
                   ``checkpoints/corrupt/``); refused while it holds a finished checkpoint

A fresh init never happens silently in a workdir that has held checkpoints.
"""

from __future__ import annotations

import json
from typing import Any

from idmr_jax.train import workdir as layout

# Dotted config paths (a path covers everything under it) that may differ between a checkpoint and its resume.
FREE_FIELDS = (
    "mode",
    "train.num_steps", "train.num_epochs", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.async_checkpoints", "train.progress", "train.resume", "train.verify_checkpoints",
    "eval",
    "data.train_dir", "data.val_dir", "data.num_workers", "data.demo_cache", "data.tokenizer",
    "model.init",
    "sharding.mesh",
)

# Fields added to configs after checkpoints were written, with the value a saved config without them meant; a field
# absent from the saved config compares as this value (IDMR workdirs from before the universal task trained on
# triplets, with one image slot per row).
ADDED_FIELDS = {
    "data.format": "triplets",
    "data.prompt_set": "",
    "data.image_slots.query": -1, "data.image_slots.cand": -1, "data.image_slots.hn": -1,
    "model.backbone": "llava",
    "data.demo_split": "standard",
    "optim.group_start_steps": {},
}

RESUME_MODES = ("check", "ignore_config", "fresh")


class ConfigChangedError(ValueError):
    """The new config differs from the checkpoint's in fields that are not free to change."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def _is_free(path: str) -> bool:
    return any(path == f or path.startswith(f + ".") for f in FREE_FIELDS)


def changed_fields(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """``[(dotted path, old, new)]`` for every field of the JSON configs that differs and is not free to change
    (a field missing on one side shows as ``<absent>``; one of `ADDED_FIELDS` missing from `old` as its value)."""
    # Through JSON, so tuples and lists (a ConfigDict's and a saved config's) compare equal.
    a, b = _flatten(json.loads(json.dumps(old))), _flatten(json.loads(json.dumps(new)))
    absent = "<absent>"
    a.update({k: v for k, v in ADDED_FIELDS.items() if k not in a and k in b})
    return [(k, a.get(k, absent), b.get(k, absent)) for k in sorted(a.keys() | b.keys())
            if not _is_free(k) and a.get(k, absent) != b.get(k, absent)]


def check_config(saved: dict, current: dict, *, step: int, workdir) -> None:
    """Raises ConfigChangedError listing the fields that differ (see the module docstring) between `saved`, the
    config of checkpoint `step`, and `current`; a no-op when ``current.train.resume`` is ``ignore_config``."""
    if current.get("train", {}).get("resume", "check") == "ignore_config":
        return
    diffs = changed_fields(saved, current)
    if diffs:
        lines = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, old, new in diffs)
        raise ConfigChangedError(
            f"{workdir} was trained (checkpoint {step}) with a different config:\n{lines}\n"
            "Resuming would continue that run under another recipe. Start a new --workdir, or, if the change is "
            "deliberate (e.g. the learning rate), pass --config.train.resume=ignore_config.")


class NoUsableCheckpointError(RuntimeError):
    """A workdir that has held checkpoints has none that restores, and no flag allows a fresh start."""


def check_fresh_start(workdir, mode: str, *, before_restore: bool) -> None:
    """Enforces "no silent fresh init in a workdir that has held checkpoints" (see the module docstring).

    `before_restore`: with ``resume=fresh``, refuses a workdir that still holds a finished checkpoint. Otherwise
    (nothing restored): refuses unless ``resume=fresh`` when ``checkpoints/`` has held any checkpoint.
    """
    steps = layout.finished_steps(workdir)
    corrupt = layout.corrupt_dir(workdir)
    moved = sorted(p.name for p in corrupt.iterdir()) if corrupt.is_dir() else []
    if before_restore:
        if mode == "fresh" and steps:
            raise ValueError(f"--config.train.resume=fresh: {workdir} holds finished checkpoints {steps}; a fresh "
                             "run there would overwrite them. Use a new --workdir.")
        return
    if mode != "fresh" and (steps or moved):
        raise NoUsableCheckpointError(
            f"{workdir} has held checkpoints but none restores (moved aside: {moved} in {corrupt}); a fresh start "
            "here would silently discard that run. Inspect them, then use a new --workdir or pass "
            "--config.train.resume=fresh to start from the initial weights in this one.")


def check_latest_config(workdir, current: dict) -> None:
    """`check_config` against the latest finished checkpoint of `workdir`, before anything is built (so a changed
    config fails at once). An unreadable saved config is left to the restore, which moves that checkpoint aside."""
    steps = layout.finished_steps(workdir)
    if not steps:
        return
    step_dir = layout.checkpoints_dir(workdir) / str(steps[-1])
    try:
        saved = layout.read_config(step_dir)
    except Exception:  # noqa: BLE001 - corruption is reported (and handled) by the restore
        return
    check_config(saved.to_dict(), current, step=steps[-1], workdir=workdir)
