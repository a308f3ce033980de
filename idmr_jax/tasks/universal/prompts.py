"""Prompt sets of the universal task: data, not code. A prompt set is a JSON file with templates per side
(``query`` / ``candidate``) and modality (``text``, ``image``, ``image,text``); ``{text}`` is the side's text and
``<image>`` the image placeholder. An entry is one template or a list of them: training draws one at random per
example (InstructCIR's stage 2), evaluation always uses the first, so its results are reproducible.
``config.data.prompt_set`` names a file, or a packaged set by name ("instructcir" is ``prompt_sets/instructcir.json``);
"" is the packaged ``prompt_sets/default.json``."""

from __future__ import annotations

import json
import os

from idmr_jax.tasks.universal.records import MODALITIES

DEFAULT = os.path.join(os.path.dirname(__file__), "prompt_sets", "default.json")
SIDES = ("query", "candidate")


def load_prompt_set(path: str = "") -> dict[str, dict[str, tuple[str, ...]]]:
    """{side: {modality: templates}} from `path` ("" = the default set); ValueError naming the file and the entry
    for a missing template, or an image modality whose template has no ``<image>`` (a text one must have none)."""
    path = path or DEFAULT
    if not path.endswith(".json") and os.sep not in path:
        path = os.path.join(os.path.dirname(DEFAULT), f"{path}.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    out = {}
    for side in SIDES:
        templates = data.get(side)
        if not isinstance(templates, dict):
            raise ValueError(f"{path}: no '{side}' object of templates")
        out[side] = {}
        for modality, (_, has_image) in MODALITIES.items():
            entry = templates.get(modality)
            options = [entry] if isinstance(entry, str) else entry
            if not isinstance(options, list) or not options or not all(isinstance(t, str) and t for t in options):
                raise ValueError(f"{path}: {side}.{modality}: missing template (a string or a list of strings)")
            for t in options:
                if ("<image>" in t) != has_image:
                    raise ValueError(f"{path}: {side}.{modality}: the <image> placeholder must appear exactly when "
                                     f"the side has an image, in {t!r}")
            out[side][modality] = tuple(options)
    return out
