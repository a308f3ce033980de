"""Planning the demo benchmark: which instances go to train and val, which contexts each instance is pasted
into, and every random choice of every image and quadruple, all as a function of (seed, size).

Each stage draws from its own stream (`rng_stream`), so changing one stage does not reshuffle the others.
Nothing is rendered here except by `render_image`, which turns one planned image into pixels.

Two kinds of benchmark (`KINDS`) share the instances, contexts and images:

- ``standard``: one image per (instance, context); every quadruple moves the instance to another of its contexts,
  so the text always names a new context and the reference's context never helps.
- ``context``: half as many contexts per instance (`context_kind_contexts`), each with two shots (another crop of
  the context, another placement of the object). Every reference gets two targets: the other shot in its own
  context (the text says "the same scene" and does not name it) and an image in another context (the text names
  it). A query must then read the reference's context exactly when the text keeps it: a fixed strong focus on the
  box cannot be right for both.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import numpy as np

from idmr_jax.data.demo_bench import photos, render

SPLITS = ("train", "val")
KINDS = ("standard", "context")
# Part of the context benchmark's recipe digest: bump it when `_context_pairs` changes what it picks.
CONTEXT_PAIRING = "half the contexts, two shots, keep + change per reference, v3"


@dataclasses.dataclass(frozen=True)
class SizeSpec:
    """How big a build is. ``max_instances`` 0 keeps the whole catalog (otherwise one instance from each of that
    many randomly chosen overlap groups)."""

    long_side: int
    contexts_per_instance: tuple[int, int]
    targets_per_reference: int
    max_instances: int
    val_fraction: float = 0.3
    jpeg_quality: int = 92


SIZES: dict[str, SizeSpec] = {
    "small": SizeSpec(long_side=320, contexts_per_instance=(4, 8), targets_per_reference=2, max_instances=0),
    "tiny": SizeSpec(long_side=128, contexts_per_instance=(3, 3), targets_per_reference=2, max_instances=8),
}


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """Everything needed to render one image; see `render_image`."""

    name: str
    split: str
    instance: str
    view: int
    context: str
    crop: render.CanvasCrop
    place: render.Placement


@dataclasses.dataclass(frozen=True)
class Plan:
    """A benchmark before rendering: images (grouped by split, then instance) and (split, reference, target)."""

    images: tuple[ImageSpec, ...]
    pairs: tuple[tuple[str, str, str], ...]


_INSTANCES = {i.id: i for i in photos.INSTANCES}
_CONTEXTS = {c.id: c for c in photos.CONTEXTS}


def rng_stream(seed: int, stage: int, *more: int) -> np.random.Generator:
    """The random stream of one stage (and item): a change in one stage does not reshuffle the others."""
    return np.random.default_rng([seed, stage, *more])


def overlap_groups(instances: Sequence[photos.Instance]) -> list[list[photos.Instance]]:
    """Instances linked by overlapping source boxes in the same photo (connected components), in catalog order.
    A group never straddles train and val: a wheel cut from the motorcycle would otherwise leak it."""
    parent = list(range(len(instances)))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, a in enumerate(instances):
        for j in range(i):
            b = instances[j]
            if any(pa == pb and photos.boxes_overlap(ba, bb) for pa, ba in a.views for pb, bb in b.views):
                parent[find(i)] = find(j)
    groups: dict[int, list[photos.Instance]] = {}
    for i, inst in enumerate(instances):
        groups.setdefault(find(i), []).append(inst)
    return list(groups.values())


def _split(seed: int, spec: SizeSpec) -> dict[str, list[photos.Instance]]:
    """Whole overlap groups, in seeded random order, fill val up to ``val_fraction``; the rest is train."""
    rng = rng_stream(seed, 0)
    groups = overlap_groups(photos.INSTANCES)
    order = [groups[i] for i in rng.permutation(len(groups))]
    if spec.max_instances:
        # One instance per group: small builds still spread over many photos and split cleanly.
        order = [[g[int(rng.integers(len(g)))]] for g in order[:spec.max_instances]]
    n_all = sum(len(g) for g in order)
    n_val = max(2, int(round(spec.val_fraction * n_all)))
    split: dict[str, list[photos.Instance]] = {"train": [], "val": []}
    for g in order:
        side = "val" if len(split["val"]) + len(g) <= n_val else "train"
        split[side].extend(g)
    for side in SPLITS:  # catalog order inside a split keeps the files easy to read
        split[side].sort(key=lambda i: photos.INSTANCES.index(i))
    if len(split["val"]) < 2 or len(split["train"]) < 2:
        raise RuntimeError(f"cannot split {n_all} instances into train and val of >= 2 each")
    return split


def _assign_contexts(rng: np.random.Generator, members: list[photos.Instance], usable: list[photos.Context],
                     k_range: tuple[int, int], attempts: int = 20) -> dict[str, list[str]]:
    """Contexts per instance, spread so every context used in the split holds >= 2 instances (hard negatives).

    Contexts come from a pool of about half the number of placements, least-used first; a context left with a
    single instance afterwards is traded for a shared one. When the scene exclusions leave no trade (possible in
    tiny builds), the draw is repeated from the same stream, so the result stays a function of the seed."""
    ks = {i.id: int(rng.integers(k_range[0], k_range[1] + 1)) for i in members}
    allowed = {i.id: [c.id for c in usable if c.scene != i.scene] for i in members}
    for i in members:
        if len(allowed[i.id]) < ks[i.id]:
            raise RuntimeError(f"{i.id}: only {len(allowed[i.id])} usable contexts, {ks[i.id]} wanted")
    for _ in range(attempts):
        chosen, lonely = _draw_contexts(rng, members, usable, ks, allowed)
        if not lonely:
            break
    else:
        logging.warning("contexts %s hold a single instance (no hard negative there)", lonely)
    return chosen


def _draw_contexts(rng: np.random.Generator, members: list[photos.Instance], usable: list[photos.Context],
                   ks: dict[str, int], allowed: dict[str, list[str]]) -> tuple[dict[str, list[str]], list[str]]:
    """One attempt of `_assign_contexts` -> (contexts per instance, contexts left with a single instance)."""
    order = [usable[j].id for j in rng.permutation(len(usable))]
    pool = set(order[:max(max(ks.values()), sum(ks.values()) // 2)])
    use = {c: 0 for c in order}
    tie = {c: n for n, c in enumerate(order)}
    chosen: dict[str, list[str]] = {}
    for inst in (members[j] for j in rng.permutation(len(members))):
        cands = sorted(allowed[inst.id], key=lambda c: (c not in pool, use[c], tie[c]))
        chosen[inst.id] = cands[:ks[inst.id]]
        for c in chosen[inst.id]:
            use[c] += 1
    for _ in range(len(order) * len(members)):  # bounded repair loop
        lonely = [c for c in order if use[c] == 1]
        if not lonely:
            break
        moved = False
        for c in lonely:
            owner = next(i for i in chosen if c in chosen[i])
            spare = sorted((x for x in allowed[owner] if use[x] >= 1 and x not in chosen[owner]),
                           key=lambda x: (use[x], tie[x]))
            if spare:
                chosen[owner][chosen[owner].index(c)] = spare[0]
                use[c], use[spare[0]] = 0, use[spare[0]] + 1
                moved = True
                break
        if not moved:
            break
    return {i.id: chosen[i.id] for i in members}, [c for c in order if use[c] == 1]


def _shot_spec(seed: int, side: str, inst: photos.Instance, ctx_id: str, shot: int) -> ImageSpec:
    """Shot 0 (every kind) or 1 (the context kind's second shot) of `inst` pasted into context `ctx_id`."""
    more = (shot,) if shot else ()  # shot 0 keeps the stream it always had: the standard images are unchanged
    r = rng_stream(seed, 2, photos.INSTANCES.index(inst), photos.CONTEXTS.index(_CONTEXTS[ctx_id]), *more)
    crop = render.CanvasCrop(side=float(r.uniform(0.8, 1.0)), fx=float(r.random()),
                             fy=float(r.random()), flip=bool(r.random() < 0.5))
    # Log-uniform area: as many small objects as large ones.
    place = render.Placement(
        area=float(math.exp(r.uniform(math.log(0.03), math.log(0.4)))),
        cell=(int(r.integers(3)), int(r.integers(3))),
        offset=(float(r.uniform(-0.3, 0.3)), float(r.uniform(-0.3, 0.3))),
        flip=bool(r.random() < 0.5),
        jitter=(float(r.uniform(0.75, 1.25)), float(r.uniform(0.75, 1.25)), float(r.uniform(0.6, 1.4))))
    name = f"{inst.id}-{ctx_id}" + (f"-shot{shot + 1}" if shot else "")
    return ImageSpec(name, side, inst.id, int(r.integers(len(inst.views))), ctx_id, crop, place)


def _standard_pairs(r: np.random.Generator, side: str, names: list[str], per_reference: int):
    for ref in names:
        others = [n for n in names if n != ref]
        for t in r.choice(len(others), size=min(per_reference, len(others)), replace=False):
            yield side, ref, others[int(t)]


def _context_pairs(r: np.random.Generator, side: str, shots: dict[str, list[str]]):
    """Per reference: its other shot in the same context (keep), then a random image of the instance in another
    context (change)."""
    for ctx, names in shots.items():
        elsewhere = [n for c, ns in shots.items() if c != ctx for n in ns]
        for i, ref in enumerate(names):
            yield side, ref, names[1 - i]
            yield side, ref, elsewhere[int(r.integers(len(elsewhere)))]


def context_kind_contexts(spec: SizeSpec) -> tuple[int, int]:
    """Contexts per instance in the context benchmark: half the standard range (at least 2), so that with two shots
    per context it has about as many images, and with two targets per reference as many quadruples, as the
    standard benchmark (a larger set learned far more slowly in the demo's 120 steps)."""
    return max(2, spec.contexts_per_instance[0] // 2), max(2, spec.contexts_per_instance[1] // 2)


def plan_benchmark(seed: int = 0, size: str = "small", kind: str = "standard") -> Plan:
    """Decide every image and quadruple (all random choices) without rendering anything."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if kind not in KINDS:
        raise ValueError(f"unknown demo benchmark kind {kind!r}; choose from {KINDS}")
    spec = SIZES[size]
    split = _split(seed, spec)
    # No context may show a val object: train would see it, and a val image would hold two val instances.
    usable = [c for c in photos.CONTEXTS if not any(photos.context_shows(c, i) for i in split["val"])]
    images: list[ImageSpec] = []
    pairs: list[tuple[str, str, str]] = []
    for s_idx, side in enumerate(SPLITS):
        k_range = context_kind_contexts(spec) if kind == "context" else spec.contexts_per_instance
        chosen = _assign_contexts(rng_stream(seed, 1, s_idx), split[side], usable, k_range)
        for inst in split[side]:
            shots: dict[str, list[str]] = {}
            for ctx_id in chosen[inst.id]:
                for shot in range(2 if kind == "context" else 1):
                    images.append(_shot_spec(seed, side, inst, ctx_id, shot))
                    shots.setdefault(ctx_id, []).append(images[-1].name)
            r = rng_stream(seed, 3, photos.INSTANCES.index(inst))
            if kind == "context":
                pairs.extend(_context_pairs(r, side, shots))
            else:
                pairs.extend(_standard_pairs(r, side, [ns[0] for ns in shots.values()], spec.targets_per_reference))
    return Plan(tuple(images), tuple(pairs))


def render_image(spec: ImageSpec, size: str = "small") -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """-> (image, the context canvas without the paste, box of the pasted instance)."""
    canvas = render.make_canvas(_CONTEXTS[spec.context], spec.crop, SIZES[size].long_side)
    image, box = render.paste(canvas, _INSTANCES[spec.instance], spec.view, spec.place)
    return image, canvas, box
