"""Reranking prompts (LamRA): pointwise (query, candidate) -> "Yes" / "No", listwise (query, K numbered
candidates) -> the number of the matching one. The wording is data: a JSON prompt set (``prompt_sets/default.json``,
keys ``side``, ``pointwise``, ``listwise``, ``answers``; see its ``description``).

A prompt is a sequence of parts: fixed instruction text, a side's own text (`SideText`) and image placeholders
(None), with the images' bytes in placeholder order. `RerankTokenizer` turns one into a fixed-length token row
that ends with the prompt's last token (no EOS is appended), so the logits of the last attended position are the
answer's distribution. When a prompt is too long only the sides' texts are cut (each to the same cap, longest
first), never the instruction nor the question, whose wording the answer depends on.

Listwise training shows the candidates in a random order per example (`listwise_example`), so the index of the
positive carries no position prior; K is drawn from 2 to 5 (`sample_list_size`), as LamRA does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from idmr_jax.tasks.idmr.pipeline import IMAGE_PLACEHOLDER, PromptSpec, PromptTokenizer, assemble
from idmr_jax.tasks.universal.records import MODALITIES, modality_of

DEFAULT = os.path.join(os.path.dirname(__file__), "prompt_sets", "default.json")
MIN_LIST, MAX_LIST = 2, 5  # LamRA's listwise K during training


@dataclasses.dataclass(frozen=True)
class SideText:
    """A query's or candidate's own text inside a prompt: the only part cut when a prompt is too long."""

    text: str


Part = str | SideText | None  # fixed text, a side's text, an image placeholder


@dataclasses.dataclass(frozen=True)
class RerankPrompt:
    """One reranking prompt: its parts and the bytes of its images, one per None part, in order."""

    parts: tuple[Part, ...]
    images: tuple[bytes, ...]

    def render(self) -> str:
        """The prompt as text (images as ``<image>``), for logs and tests."""
        return "".join(IMAGE_PLACEHOLDER if p is None else p.text if isinstance(p, SideText) else p
                       for p in self.parts)


@dataclasses.dataclass(frozen=True)
class RerankPrompts:
    """A loaded prompt set; see the module docstring and ``prompt_sets/default.json``."""

    side: dict[str, str]
    pointwise: str
    list_header: str
    list_item: str
    list_question: str
    yes: str
    no: str
    source: str


@dataclasses.dataclass(frozen=True)
class ListwiseExample:
    """A listwise training prompt: ``order[j]`` is the input index of the candidate shown as number j + 1;
    ``target`` is the 0-based position of the positive in that order (its label is ``str(target + 1)``)."""

    prompt: RerankPrompt
    order: tuple[int, ...]
    target: int

    @property
    def label(self) -> str:
        return str(self.target + 1)


@dataclasses.dataclass(frozen=True)
class AnswerIds:
    """Token ids of the answers: "Yes", "No", and ``index[j]`` for the listwise label ``str(j + 1)``."""

    yes: int
    no: int
    index: tuple[int, ...]


def _require(path: str, entry: str, template: Any, needs: Sequence[str], forbids: Sequence[str] = ()) -> str:
    if not isinstance(template, str) or not template:
        raise ValueError(f"{path}: {entry}: missing template (a non-empty string)")
    for key in needs:
        if template.count(key) != 1:
            raise ValueError(f"{path}: {entry}: {key} must appear exactly once, in {template!r}")
    for key in forbids:
        if key in template:
            raise ValueError(f"{path}: {entry}: {key} may not appear, in {template!r}")
    return template


@functools.lru_cache(maxsize=8)
def load_rerank_prompts(path: str = "") -> RerankPrompts:
    """The prompt set at `path` ("" = the packaged default; a bare name = ``prompt_sets/<name>.json``);
    ValueError naming the file and the entry for a missing or malformed template."""
    path = path or DEFAULT
    if not path.endswith(".json") and os.sep not in path:
        path = os.path.join(os.path.dirname(DEFAULT), f"{path}.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    side_data, listwise, answers = (data.get(k) or {} for k in ("side", "listwise", "answers"))
    side = {}
    for modality, (has_text, has_image) in MODALITIES.items():
        needs = (["{text}"] if has_text else []) + ([IMAGE_PLACEHOLDER] if has_image else [])
        forbids = ([] if has_text else ["{text}"]) + ([] if has_image else [IMAGE_PLACEHOLDER])
        side[modality] = _require(path, f"side.{modality}", side_data.get(modality), needs, forbids)
    # Images enter a prompt only through its sides, so the outer templates hold no placeholder of their own.
    outer = [IMAGE_PLACEHOLDER]
    return RerankPrompts(
        side=side,
        pointwise=_require(path, "pointwise", data.get("pointwise"), ["{query}", "{candidate}"], outer),
        list_header=_require(path, "listwise.header", listwise.get("header"), ["{query}"], outer),
        list_item=_require(path, "listwise.item", listwise.get("item"), ["{index}", "{candidate}"], outer),
        list_question=_require(path, "listwise.question", listwise.get("question"), [], outer),
        yes=_require(path, "answers.yes", answers.get("yes"), []),
        no=_require(path, "answers.no", answers.get("no"), []),
        source=path)


def side_parts(prompts: RerankPrompts, side: Any, *, what: str = "side") -> tuple[list[Part], list[bytes]]:
    """The parts and images of one side (any object with ``text`` and ``image``: a query or candidate record,
    a training pair's `Side`), rendered with its modality's template."""
    text, image = getattr(side, "text", None), getattr(side, "image", None)
    if text is not None and IMAGE_PLACEHOLDER in text:
        raise ValueError(f"{what}: its text holds the image placeholder {IMAGE_PLACEHOLDER!r}")
    template = prompts.side[modality_of(text is not None, image is not None)]
    parts: list[Part] = []
    for piece in re.split(r"(<image>|\{text\})", template):
        if piece == IMAGE_PLACEHOLDER:
            parts.append(None)
        elif piece == "{text}":
            parts.append(SideText(text))
        elif piece:
            parts.append(piece)
    return parts, [image] if image is not None else []


def _fill(template: str, slots: dict[str, tuple[list[Part], list[bytes]]]) -> tuple[list[Part], list[bytes]]:
    """`template` with each ``{name}`` of `slots` replaced by that side's parts (images in order of appearance)."""
    parts: list[Part] = []
    images: list[bytes] = []
    pattern = "(" + "|".join(re.escape("{" + name + "}") for name in slots) + ")"
    for piece in re.split(pattern, template):
        name = piece[1:-1] if piece.startswith("{") and piece[1:-1] in slots else None
        if name is not None:
            parts += slots[name][0]
            images += slots[name][1]
        elif piece:
            parts.append(piece)
    return parts, images


def pointwise_prompt(prompts: RerankPrompts, query: Any, candidate: Any) -> RerankPrompt:
    """The pointwise prompt of (query, candidate); the next token answers "Yes" or "No"."""
    parts, images = _fill(prompts.pointwise, {"query": side_parts(prompts, query, what="query"),
                                              "candidate": side_parts(prompts, candidate, what="candidate")})
    return RerankPrompt(tuple(parts), tuple(images))


def listwise_prompt(prompts: RerankPrompts, query: Any, candidates: Sequence[Any]) -> RerankPrompt:
    """The listwise prompt of a query and its candidates, numbered 1..K in the given order."""
    if not candidates:
        raise ValueError("a listwise prompt needs at least one candidate")
    parts, images = _fill(prompts.list_header, {"query": side_parts(prompts, query, what="query")})
    for j, cand in enumerate(candidates):
        item = prompts.list_item.replace("{index}", str(j + 1))
        p, i = _fill(item, {"candidate": side_parts(prompts, cand, what=f"candidate {j + 1}")})
        parts, images = parts + p, images + i
    parts.append(prompts.list_question)
    return RerankPrompt(tuple(parts), tuple(images))


def sample_list_size(rng: np.random.Generator, low: int = MIN_LIST, high: int = MAX_LIST) -> int:
    """K for one listwise training example, uniform over ``low..high`` inclusive."""
    if not 1 <= low <= high:
        raise ValueError(f"list size range {low}..{high}: need 1 <= low <= high")
    return int(rng.integers(low, high + 1))


def listwise_example(query: Any, candidates: Sequence[Any], positive_index: int, rng: np.random.Generator, *,
                     prompts: RerankPrompts | None = None) -> ListwiseExample:
    """A listwise training example: `candidates` (the positive at `positive_index`, the rest negatives) shown
    in an order drawn from `rng`, and the position the positive landed at (the target)."""
    if not 0 <= positive_index < len(candidates):
        raise ValueError(f"positive_index {positive_index} is outside the {len(candidates)} candidates")
    order = tuple(int(i) for i in rng.permutation(len(candidates)))
    prompt = listwise_prompt(prompts or load_rerank_prompts(), query, [candidates[i] for i in order])
    return ListwiseExample(prompt, order, order.index(positive_index))


def text_cap(lengths: Sequence[int], budget: int) -> int:
    """The largest per-text token cap c with ``sum(min(n, c)) <= budget``: long texts are cut to the same length
    and short ones are kept whole."""
    if sum(lengths) <= budget:
        return max(lengths, default=0)
    lo, hi = 0, max(lengths)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in lengths) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


class RerankTokenizer:
    """`RerankPrompt` -> (ids, mask) rows laid out by `spec` without its EOS: the last attended token is the
    prompt's last one, whose next-token logits hold the answer. `directory`: as for `PromptTokenizer` ("" = the
    bundled BERT WordPiece vocab)."""

    def __init__(self, directory: str, spec: PromptSpec):
        self.directory = directory
        self.spec = dataclasses.replace(spec, eos_id=None)
        # Pieces are tokenised bare (no BOS / EOS, nothing padded away) and assembled here.
        self._pieces = PromptTokenizer(directory, dataclasses.replace(spec, bos_id=None, eos_id=None))

    def tokens(self, text: str) -> list[int]:
        """The token ids of a piece of text (at most ``max_length``), no special tokens."""
        ids, mask = self._pieces.encode(text)
        return [int(t) for t in ids[mask == 1]]

    def encode(self, prompt: RerankPrompt, *, what: str = "prompt") -> tuple[np.ndarray, np.ndarray]:
        """int32 ids and mask ``[max_length]``; ValueError naming `what` when the fixed parts alone (images,
        instructions, BOS) exceed ``max_length``."""
        spec = self.spec
        if sum(p is None for p in prompt.parts) != len(prompt.images):
            raise ValueError(f"{what}: {sum(p is None for p in prompt.parts)} image placeholders but "
                             f"{len(prompt.images)} images")
        tokens = [None if p is None else self.tokens(p.text if isinstance(p, SideText) else p)
                  for p in prompt.parts]
        fixed = (spec.bos_id is not None) + spec.image_tokens * len(prompt.images)
        fixed += sum(len(t) for p, t in zip(prompt.parts, tokens) if isinstance(p, str))
        budget = spec.max_length - fixed
        if budget < 0:
            raise ValueError(f"{what}: its images, instructions and BOS take {fixed} tokens, more than max_length "
                             f"{spec.max_length}")
        cap = text_cap([len(t) for p, t in zip(prompt.parts, tokens) if isinstance(p, SideText)], budget)
        pieces = [t[:cap] if isinstance(p, SideText) else t for p, t in zip(prompt.parts, tokens)]
        return assemble(pieces, spec, what=what)

    def batch(self, prompts: Sequence[RerankPrompt], *, what: str = "prompt") -> tuple[np.ndarray, np.ndarray]:
        """`encode` of each prompt, stacked ``[N, max_length]``."""
        rows = [self.encode(p, what=f"{what} {i}") for i, p in enumerate(prompts)]
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])

    def single_token(self, word: str) -> int:
        """The one token id of an answer word; ValueError naming the word when it is not exactly one token."""
        ids = self.tokens(word)
        if len(ids) != 1:
            raise ValueError(f"answer word {word!r} is {len(ids)} tokens {ids} with the tokenizer "
                             f"{self.directory or '(bundled BERT WordPiece)'}: a reranker answer must be one token")
        return ids[0]


def answer_ids(tokenizer: RerankTokenizer, prompts: RerankPrompts, max_k: int = MAX_LIST) -> AnswerIds:
    """The answer tokens: yes, no and the labels "1".."max_k", each checked to be one token, all distinct."""
    ids = AnswerIds(tokenizer.single_token(prompts.yes), tokenizer.single_token(prompts.no),
                    tuple(tokenizer.single_token(str(j + 1)) for j in range(max_k)))
    if ids.yes == ids.no or len(set(ids.index)) != max_k:
        raise ValueError(f"{prompts.source}: the answers share tokens ({ids}); the reranker could not tell them apart")
    return ids
