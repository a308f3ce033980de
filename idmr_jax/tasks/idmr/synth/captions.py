"""Location captions for IDMR triplets: where the marked instance is and what surrounds it, not what it is.

Two captioners share one interface, ``captioner.name`` (recorded in each triplet and in the caches) and
``captioner.caption(request) -> str``:

- `TemplateCaptioner` (offline, the default): from the box geometry (the box centre's cell in a 3x3 grid, its
  share of the image) and the other annotated objects (nearest first, the relation to the closest one), plus
  the scene description when the source has one. Templates and phrasings are drawn by an RNG seeded with
  (seed, annotation id), so a caption depends on nothing but its instance and the seed.
- `MllmCaptioner`: draws a green box around the instance on the full image and asks a multimodal LLM, through a
  ``generate(image_with_box, prompt) -> str`` callable, to describe the object's location and surroundings (the
  IDMR recipe). `llava_generate` builds such a callable from the project's LLaVA port.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from idmr_jax.tasks.idmr.synth.geometry import Box, box_gap, position_key, relation, size_key


@dataclasses.dataclass(frozen=True)
class CaptionRequest:
    """What a captioner may look at for one instance. ``neighbours`` are the image's other annotated objects as
    (category, box) pairs; ``load_image`` returns the full source image (only image-based captioners call it)."""

    key: str  # the annotation id: seeds the template choice
    category: str
    box: Box  # clipped, source pixels
    width: int
    height: int
    neighbours: tuple[tuple[str, Box], ...] = ()
    scene: str | None = None
    load_image: Callable[[], Image.Image] | None = None


# --- template captioner ------------------------------------------------------------------------------------------

POSITION_PHRASES: dict[tuple[str, str], tuple[str, ...]] = {
    ("left", "top"): ("in the upper left of the picture", "at the top left of the frame"),
    ("center", "top"): ("at the top of the picture", "near the top edge of the frame"),
    ("right", "top"): ("in the upper right of the picture", "at the top right of the frame"),
    ("left", "middle"): ("on the left side of the picture", "along the left of the frame"),
    ("center", "middle"): ("in the middle of the picture", "at the center of the frame"),
    ("right", "middle"): ("on the right side of the picture", "along the right of the frame"),
    ("left", "bottom"): ("in the lower left of the picture", "at the bottom left of the frame"),
    ("center", "bottom"): ("at the bottom of the picture", "near the bottom edge of the frame"),
    ("right", "bottom"): ("in the lower right of the picture", "at the bottom right of the frame"),
}
SIZE_PHRASES: dict[str, tuple[str, ...]] = {
    "small": ("small and far from the camera", "taking up only a small part of the view"),
    "medium": ("at a moderate size", "filling a fair part of the view"),
    "large": ("close to the camera", "filling much of the view"),
}
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "just left of"),
    "right of": ("to the right of", "just right of"),
    "above": ("above", "higher up than"),
    "below": ("below", "beneath"),
}
# {where}: position, {size}: size, {rel}: relation to the nearest neighbour, {others}: ", with X and Y nearby".
TEMPLATES_WITH_NEIGHBOURS: tuple[str, ...] = (
    "The object is {where}, {rel}{others}.",
    "Find it {where}, {rel}{others}; it is {size}.",
    "An image where the object sits {rel}, {where}{others}.",
    "It is placed {rel}{others}, {where}, {size}.",
)
TEMPLATES_ALONE: tuple[str, ...] = (
    "The object is {where}, {size}, with nothing else marked around it.",
    "An image where it appears on its own {where}, {size}.",
    "It sits alone {where}, {size}.",
)
SCENE_PHRASES: tuple[str, ...] = (" The scene shows {scene}.", " In the background: {scene}.")
MAX_NEIGHBOURS = 3
# Neighbours smaller than this share of the image are left out: too small to be a landmark in a caption.
MIN_NEIGHBOUR_AREA = 0.001

_IRREGULAR = {"person": "people", "man": "men", "woman": "women", "child": "children", "mouse": "mice",
              "sheep": "sheep", "skis": "skis", "scissors": "scissors", "glasses": "glasses", "fish": "fish"}
_NUMBERS = ("zero", "one", "two", "three", "four", "five")


def plural(noun: str) -> str:
    """English plural of a (possibly multi-word) category name; the last word is inflected."""
    head, _, last = noun.rpartition(" ")
    low = last.lower()
    if low in _IRREGULAR:
        p = _IRREGULAR[low]
    elif low.endswith(("s", "x", "z", "ch", "sh")):
        p = last + "es"
    elif low.endswith("y") and len(low) > 1 and low[-2] not in "aeiou":
        p = last[:-1] + "ies"
    else:
        p = last + "s"
    return f"{head} {p}" if head else p


def with_article(noun: str) -> str:
    """'a dog', 'an apple' (by the first letter; good enough for category names)."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def counted(noun: str, n: int, same_as_object: bool) -> str:
    """'a dog' / 'two dogs' / 'another person' / 'several cars'."""
    if n == 1:
        return f"another {noun}" if same_as_object else with_article(noun)
    word = _NUMBERS[n] if n < len(_NUMBERS) else "several"
    return f"{word} other {plural(noun)}" if same_as_object else f"{word} {plural(noun)}"


def join_words(items: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")])


def nearby(request: CaptionRequest) -> list[tuple[str, int, Box]]:
    """The neighbours to mention: (category, count, box of its nearest member), nearest category first, at most
    `MAX_NEIGHBOURS` categories; ties in distance go to the larger box, then the name (deterministic)."""
    area = request.width * request.height
    ranked = sorted(
        ((box_gap(request.box, b), -(b[2] - b[0]) * (b[3] - b[1]), c, b) for c, b in request.neighbours
         if (b[2] - b[0]) * (b[3] - b[1]) >= MIN_NEIGHBOUR_AREA * area),
        key=lambda t: (t[0], t[1], t[2], t[3]))
    out: dict[str, list] = {}
    for _, _, cat, box in ranked:
        if cat in out:
            out[cat][0] += 1
        elif len(out) < MAX_NEIGHBOURS:
            out[cat] = [1, box]
    return [(c, n, b) for c, (n, b) in out.items()]


class TemplateCaptioner:
    """Offline location captions from box geometry and neighbouring objects; see the module docstring."""

    name = "template"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def caption(self, request: CaptionRequest) -> str:
        """One caption; a pure function of (request, seed)."""
        rng = _rng(self.seed, request.key)
        pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
        where = pick(POSITION_PHRASES[position_key(request.box, request.width, request.height)])
        size = pick(SIZE_PHRASES[size_key(request.box, request.width, request.height)])
        near = nearby(request)
        if near:
            (cat0, n0, box0), rest = near[0], near[1:]
            rel = f"{pick(RELATION_PHRASES[relation(request.box, box0)])} {counted(cat0, n0, cat0 == request.category)}"
            others = ""
            if rest:
                others = f", with {join_words([counted(c, n, c == request.category) for c, n, _ in rest])} nearby"
            text = pick(TEMPLATES_WITH_NEIGHBOURS).format(where=where, size=size, rel=rel, others=others)
        else:
            text = pick(TEMPLATES_ALONE).format(where=where, size=size)
        if request.scene:
            text += pick(SCENE_PHRASES).format(scene=request.scene)
        return text[0].upper() + text[1:]


# --- MLLM captioner ---------------------------------------------------------------------------------------------

DEFAULT_PROMPT = (
    "The object inside the green box is the target. In one sentence, describe where this object is in the image "
    "and what surrounds it: the scene, the nearby objects and where they are relative to it. Do not describe the "
    "object itself (no colour, shape or type).")
MARK_COLOUR = (0, 255, 0)


def draw_marker(image: Image.Image, box: Box, colour: tuple[int, int, int] = MARK_COLOUR) -> Image.Image:
    """A copy of ``image`` (RGB) with a box outline drawn around ``box``: about 0.6% of the longer side thick
    (at least 2 px), drawn outside the box where there is room so the object's own pixels stay visible."""
    out = image.convert("RGB").copy()
    w, h = out.size
    t = max(2, round(0.006 * max(w, h)))
    x1, y1 = max(0, int(box[0]) - t), max(0, int(box[1]) - t)
    x2, y2 = min(w - 1, int(np.ceil(box[2])) + t - 1), min(h - 1, int(np.ceil(box[3])) + t - 1)
    ImageDraw.Draw(out).rectangle([x1, y1, x2, y2], outline=colour, width=t)
    return out


def clean_caption(text: str) -> str:
    """One line, trimmed, without wrapping quotes; '' when nothing is left (the planner counts it as a skip)."""
    text = re.sub(r"\s+", " ", text or "").strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


class MllmCaptioner:
    """Captions by a multimodal LLM shown the full image with the instance in a green box.

    ``generate(image_with_box, prompt) -> str`` is any callable (a local model, a server client); ``name``
    identifies the model in the records and the caption cache, so two models never share cached captions."""

    def __init__(self, generate: Callable[[Image.Image, str], str], name: str = "mllm",
                 prompt: str = DEFAULT_PROMPT):
        self.generate, self.prompt = generate, prompt
        self.name = name if name.startswith("mllm") else f"mllm:{name}"

    def caption(self, request: CaptionRequest) -> str:
        if request.load_image is None:
            raise ValueError("MllmCaptioner needs the image (CaptionRequest.load_image)")
        marked = draw_marker(request.load_image(), request.box)
        return clean_caption(self.generate(marked, self.prompt))


LLAVA_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"  # LLaVA-1.5's conversation format


class LlavaGenerate:
    """``generate(image_with_box, prompt) -> str`` over the project's LLaVA port (`idmr_jax.models.llava`).

    ``checkpoint``: a transformers ``LlavaForConditionalGeneration`` folder (config, safetensors) holding its
    tokenizer files, converted strictly by `idmr_jax.weights.llava.load_hf_llava`. The image is
    preprocessed like CLIPImageProcessor (mean/std from ``preprocessor_config.json`` when present); the prompt is
    ``template`` with ``<image>`` replaced by as many image-token ids as the vision tower yields features, so no
    tokenizer needs to know the image token. Decoding is greedy (deterministic captions), up to
    ``max_new_tokens`` or EOS."""

    def __init__(self, checkpoint: str, *, max_new_tokens: int = 64, template: str = LLAVA_TEMPLATE):
        import json
        import os

        from transformers import AutoTokenizer

        from idmr_jax.models.vision import vision_grid
        from idmr_jax.weights.llava import load_hf_llava

        if template.count("<image>") != 1:
            raise ValueError(f"template must hold '<image>' once: {template!r}")
        self.model, self.cfg = load_hf_llava(checkpoint)
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
        self.max_new_tokens, self.template = max_new_tokens, template
        self.image_size = self.cfg.vision.image_size
        self.num_image_tokens = self.cfg.image_tokens(vision_grid(self.cfg.vision, self.image_size))
        proc = os.path.join(checkpoint, "preprocessor_config.json")
        pp = json.load(open(proc)) if os.path.isfile(proc) else {}
        self.mean, self.std = pp.get("image_mean"), pp.get("image_std")
        self.name = f"mllm:llava:{os.path.basename(str(checkpoint).rstrip('/'))}"

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of the templated prompt with the image tokens in place."""
        before, after = self.template.format(prompt=prompt).split("<image>")
        ids = self.tokenizer(before, add_special_tokens=True)["input_ids"]
        return ids + [self.cfg.image_token_id] * self.num_image_tokens + self.tokenizer(
            after, add_special_tokens=False)["input_ids"]

    def pixels(self, image: Image.Image) -> np.ndarray:
        from idmr_jax.tasks.idmr.synth.clip_filter import clip_pixels

        x = clip_pixels([image], self.image_size)
        if self.mean is not None and self.std is not None:  # undo CLIP's normalisation, apply the checkpoint's
            from idmr_jax.data.image_ops import CLIP_MEAN, CLIP_STD

            x = (x * np.float32(CLIP_STD) + np.float32(CLIP_MEAN) - np.float32(self.mean)) / np.float32(self.std)
        return x.astype(np.float32)

    def __call__(self, image: Image.Image, prompt: str) -> str:
        import jax.numpy as jnp

        ids = np.asarray([self.prompt_ids(prompt)], np.int32)
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        new = np.asarray(self.model.generate_greedy(jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids)),
                                                    jnp.asarray(self.pixels(image)),
                                                    max_new_tokens=self.max_new_tokens, eos_token_id=eos,
                                                    pad_token_id=pad))[0].tolist()
        if eos is not None and eos in new:
            new = new[: new.index(eos)]
        return self.tokenizer.decode(new, skip_special_tokens=True)


def llava_generate(checkpoint: str, **kw) -> tuple[LlavaGenerate, str]:
    """(`LlavaGenerate` over ``checkpoint``, its captioner name) for `MllmCaptioner`."""
    gen = LlavaGenerate(checkpoint, **kw)
    return gen, gen.name
