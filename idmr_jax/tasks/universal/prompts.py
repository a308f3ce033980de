"""Prompt sets of the universal task: data, not code. A prompt set is a JSON file with one template per side
(``query`` / ``candidate``) and modality (``text``, ``image``, ``image,text``); ``{text}`` is the side's text and
``<image>`` the image placeholder. ``config.data.prompt_set`` names a file; "" is the packaged
``prompt_sets/default.json``."""

from __future__ import annotations

import json
import os

from idmr_jax.tasks.universal.records import MODALITIES

DEFAULT = os.path.join(os.path.dirname(__file__), "prompt_sets", "default.json")
SIDES = ("query", "candidate")


def load_prompt_set(path: str = "") -> dict[str, dict[str, str]]:
    """{side: {modality: template}} from `path` ("" = the default set); ValueError naming the file and the entry for
    a missing template, or an image modality whose template has no ``<image>`` (a text one must have none)."""
    path = path or DEFAULT
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    out = {}
    for side in SIDES:
        templates = data.get(side)
        if not isinstance(templates, dict):
            raise ValueError(f"{path}: no '{side}' object of templates")
        out[side] = {}
        for modality, (_, has_image) in MODALITIES.items():
            t = templates.get(modality)
            if not isinstance(t, str) or not t:
                raise ValueError(f"{path}: {side}.{modality}: missing template")
            if ("<image>" in t) != has_image:
                raise ValueError(f"{path}: {side}.{modality}: the <image> placeholder must appear exactly when the "
                                 "side has an image")
            out[side][modality] = t
    return out
