"""Modification texts for the demo benchmark, written from templates.

A text describes the *target*: its context (the hand-written description), where the instance sits (read off the
pasted box) and how large it is; it names the object the way OACIRR's MLLM captions do ("the same cup ...").
Several phrasings of each part are chosen by the caller's seeded RNG, so texts vary while staying true.
"""

from __future__ import annotations

import numpy as np

# Box-centre thirds of the image -> position key (column, row).
_COLS = ("left", "center", "right")
_ROWS = ("top", "middle", "bottom")

POSITION_PHRASES: dict[tuple[str, str], tuple[str, ...]] = {
    ("left", "top"): ("in the upper left corner", "at the top left"),
    ("center", "top"): ("near the top", "at the top of the image"),
    ("right", "top"): ("in the upper right corner", "at the top right"),
    ("left", "middle"): ("on the left side", "on the left"),
    ("center", "middle"): ("in the center", "in the middle of the image"),
    ("right", "middle"): ("on the right side", "on the right"),
    ("left", "bottom"): ("in the lower left corner", "at the bottom left"),
    ("center", "bottom"): ("near the bottom", "at the bottom of the image"),
    ("right", "bottom"): ("in the lower right corner", "at the bottom right"),
}

SIZE_PHRASES: dict[str, tuple[str, ...]] = {
    "small": ("small in the frame", "quite small", "shown small"),
    "medium": ("at a medium size", "moderately sized", "neither large nor small"),
    "large": ("large in the frame", "filling much of the frame", "shown large"),
}

# {obj}: category, {ctx}: context description, {where}: position phrase, {size}: size phrase.
TEMPLATES: tuple[str, ...] = (
    "Show the same {obj} {where}, {size}, in front of {ctx}.",
    "Place the {obj} against {ctx}, {where} and {size}.",
    "Same {obj}, but now {where} with {ctx} behind it, {size}.",
    "Now the {obj} appears {where}, {size}, set against {ctx}.",
    "Move the {obj} into a scene of {ctx}, placing it {where}, {size}.",
    "Keep the {obj} but replace the background with {ctx}; it sits {where}, {size}.",
    "The {obj} should be {where} with {ctx} all around it, {size}.",
    "Change the setting to {ctx} and put the {obj} {where}, {size}.",
)

# Texts that keep the reference's context (the context benchmark, `plan.KINDS`): they say "the same scene" and never
# describe it, so the target's context can only be read off the reference image. {obj}, {where}, {size} as above.
KEEP_TEMPLATES: tuple[str, ...] = (
    "Same {obj} in the same scene, now {where}, {size}.",
    "Keep the background as it is and move the {obj} {where}, {size}.",
    "The {obj} stays in this setting but sits {where}, {size}.",
    "In the same place, show the {obj} {where}, {size}.",
    "Leave the surroundings unchanged; the {obj} is now {where} and {size}.",
    "Another shot of the same scene with the {obj} {where}, {size}.",
)

# Box area / image area below SMALL is "small", at or above LARGE is "large".
SMALL, LARGE = 0.08, 0.2


def position_key(box: tuple[int, int, int, int], width: int, height: int) -> tuple[str, str]:
    """(column, row) of the box centre in the image's 3x3 grid of thirds."""
    cx, cy = (box[0] + box[2]) / 2 / width, (box[1] + box[3]) / 2 / height
    return _COLS[min(int(cx * 3), 2)], _ROWS[min(int(cy * 3), 2)]


def size_key(box: tuple[int, int, int, int], width: int, height: int) -> str:
    """'small' / 'medium' / 'large' by the box's share of the image area."""
    frac = (box[2] - box[0]) * (box[3] - box[1]) / (width * height)
    return "small" if frac < SMALL else "large" if frac >= LARGE else "medium"


def modification_text(rng: np.random.Generator, category: str, context: str | None,
                      box: tuple[int, int, int, int], width: int, height: int) -> str:
    """One modification text for a target whose instance (``category``) sits at ``box`` in a
    ``width`` x ``height`` image of ``context``; ``context=None``: the target keeps the reference's context, and
    the text says so without describing it (`KEEP_TEMPLATES`)."""
    where = POSITION_PHRASES[position_key(box, width, height)]
    size = SIZE_PHRASES[size_key(box, width, height)]
    templates = KEEP_TEMPLATES if context is None else TEMPLATES
    template = templates[int(rng.integers(len(templates)))]
    return template.format(obj=category, ctx=context, where=where[int(rng.integers(len(where)))],
                           size=size[int(rng.integers(len(size)))])
