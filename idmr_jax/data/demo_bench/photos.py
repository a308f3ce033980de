"""The photo catalog of the demo benchmark: which real photographs it uses, where its instances are cut from, and
which regions serve as (hand-described) contexts.

Every photo ships inside a package this project already installs (scikit-image's bundled ``skimage.data`` files,
scikit-learn's two sample images, which arrive with sentence-transformers); nothing is downloaded. Only
``skimage.data`` loaders whose files are in the wheel are used (``skimage.data.download_all`` is never needed).

Boxes are hand-set ``(x1, y1, x2, y2)`` pixel boxes in the original photo, x2/y2 exclusive.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]

# photo key -> where it comes from (reported in build_info.json and the README of a build).
PHOTO_SOURCES: dict[str, str] = {
    "astronaut": "scikit-image skimage.data.astronaut (NASA, public domain)",
    "chelsea": "scikit-image skimage.data.chelsea (Stefan van der Walt, CC0)",
    "coffee": "scikit-image skimage.data.coffee (Rachel Michetti, CC0)",
    "rocket": "scikit-image skimage.data.rocket (SpaceX, CC0)",
    "motorcycle_left": "scikit-image skimage.data.stereo_motorcycle, left view (Middlebury 2014)",
    "motorcycle_right": "scikit-image skimage.data.stereo_motorcycle, right view (Middlebury 2014)",
    "camera": "scikit-image skimage.data.camera (cameraman, CC0)",
    "coins": "scikit-image skimage.data.coins (Greek coins, Walters Art Museum, CC0)",
    "horse": "scikit-image skimage.data.horse (silhouette, CC0)",
    "brick": "scikit-image skimage.data.brick",
    "grass": "scikit-image skimage.data.grass",
    "gravel": "scikit-image skimage.data.gravel",
    "moon": "scikit-image skimage.data.moon",
    "hubble": "scikit-image skimage.data.hubble_deep_field (NASA, public domain)",
    "retina": "scikit-image skimage.data.retina (Hafner, CC0)",
    "ihc": "scikit-image skimage.data.immunohistochemistry",
    "cell": "scikit-image skimage.data.cell",
    "china": "scikit-learn sklearn/datasets/images/china.jpg",
    "flower": "scikit-learn sklearn/datasets/images/flower.jpg",
}


@dataclasses.dataclass(frozen=True)
class Instance:
    """One specific object cut out of a photo. ``views`` lists (photo key, box) pairs showing this same object
    (the motorcycle has a second, stereo view); ``scene`` names the photo it belongs to, so the instance is never
    pasted back into a context cut from that photo; ``mask`` picks the alpha shape (see `render.cut_alpha`)."""

    id: str
    scene: str
    category: str
    views: tuple[tuple[str, Box], ...]
    mask: str = "rect"  # "rect" | "ellipse" | "dark" (dark pixels on a light ground, e.g. a silhouette)


@dataclasses.dataclass(frozen=True)
class Context:
    """A background: a region of one photo and a short hand-written description of what it shows."""

    id: str
    scene: str
    photo: str
    box: Box | None  # None: the whole photo
    description: str


def _inst(id_: str, scene: str, category: str, photo: str, box: Box, mask: str = "rect", **more: Box) -> Instance:
    views = ((photo, box),) + tuple(more.items())
    return Instance(id_, scene, category, views, mask)


def _shift(box: Box, dx: int) -> Box:
    return (box[0] + dx, box[1], box[2] + dx, box[3])


# The right stereo view sees the motorcycle ~45 px further left (median disparity over the bike, from the
# bundled disparity map); reusing the box shifted by that amount gives a second real view of the same object.
_MOTO = {"motorcycle": (90, 95, 690, 450), "headlight": (500, 115, 570, 195),
         "front_wheel": (500, 260, 690, 455), "engine": (345, 235, 480, 370)}

INSTANCES: tuple[Instance, ...] = (
    _inst("astronaut_face", "astronaut", "face", "astronaut", (150, 15, 305, 195), "ellipse"),
    _inst("astronaut_patch", "astronaut", "mission patch", "astronaut", (130, 345, 215, 425), "ellipse"),
    _inst("astronaut_helmet", "astronaut", "space helmet", "astronaut", (275, 340, 512, 512)),
    _inst("astronaut_shuttle", "astronaut", "space shuttle model", "astronaut", (355, 0, 470, 280)),
    _inst("chelsea_cat", "chelsea", "cat", "chelsea", (40, 0, 400, 300), "ellipse"),
    _inst("chelsea_eye", "chelsea", "cat eye", "chelsea", (130, 80, 215, 150), "ellipse"),
    _inst("chelsea_nose", "chelsea", "cat nose", "chelsea", (220, 200, 305, 270)),
    _inst("coffee_cup", "coffee", "coffee cup", "coffee", (170, 15, 420, 250)),
    _inst("coffee_saucer", "coffee", "cup and saucer", "coffee", (75, 15, 480, 390), "ellipse"),
    _inst("coffee_spoon", "coffee", "spoon", "coffee", (322, 240, 408, 328), "ellipse"),
    _inst("rocket", "rocket", "rocket", "rocket", (295, 125, 352, 410)),
    _inst("rocket_tower", "rocket", "lightning tower", "rocket", (165, 120, 212, 415)),
    *(_inst(f"moto_{k}", "motorcycle", k.replace("_", " "), "motorcycle_left", b,
            motorcycle_right=_shift(b, -45)) for k, b in _MOTO.items()),
    _inst("camera_head", "camera", "man's head", "camera", (150, 65, 275, 210)),
    _inst("camera_tripod", "camera", "camera on a tripod", "camera", (235, 135, 340, 500)),
    # Eight distinct ancient coins (boxes from a thresholded segmentation of skimage.data.coins, then fixed here).
    *(_inst(f"coin_{i:02d}", "coins", "coin", "coins", b, "ellipse") for i, b in enumerate((
        (305, 16, 365, 72), (125, 28, 179, 74), (245, 96, 296, 144), (315, 156, 380, 218),
        (189, 170, 237, 216), (18, 233, 75, 288), (144, 236, 201, 288), (276, 240, 326, 288)))),
    _inst("china_pagoda", "china", "pagoda", "china", (60, 25, 355, 395)),
    _inst("china_tree", "china", "tree", "china", (545, 135, 640, 427)),
    _inst("flower_dahlia", "flower", "dahlia", "flower", (165, 85, 450, 360), "ellipse"),
    _inst("galaxy_spiral", "hubble", "spiral galaxy", "hubble", (95, 370, 150, 430), "ellipse"),
    _inst("galaxy_bright", "hubble", "bright galaxy", "hubble", (695, 440, 760, 505), "ellipse"),
    _inst("galaxy_red", "hubble", "red galaxy", "hubble", (265, 85, 315, 130), "ellipse"),
    _inst("galaxy_blue", "hubble", "blue galaxy", "hubble", (375, 50, 430, 95), "ellipse"),
    _inst("horse", "horse", "horse silhouette", "horse", (15, 5, 392, 315), "dark"),
)

CONTEXTS: tuple[Context, ...] = (
    Context("brick_wall", "brick", "brick", None, "a grey brick wall"),
    Context("grass", "grass", "grass", None, "a close-up of grass blades"),
    Context("gravel", "gravel", "gravel", None, "a bed of gravel"),
    Context("moon", "moon", "moon", None, "the cratered surface of the moon"),
    Context("deep_field", "hubble", "hubble", (0, 0, 440, 440), "a deep-space field full of galaxies"),
    Context("star_field", "hubble", "hubble", (520, 560, 1000, 872), "a dark sky of faint, distant galaxies"),
    Context("hazy_sky", "china", "china", (360, 0, 560, 130), "a hazy pale-blue sky"),
    Context("lake", "china", "china", (360, 195, 545, 300), "a lake dotted with small boats"),
    Context("treetops", "china", "china", (380, 290, 560, 427), "leafy green treetops"),
    Context("pagoda_scene", "china", "china", None, "a Chinese pagoda above a lake"),
    Context("leaves", "flower", "flower", (0, 0, 165, 290), "a dark blur of blue-green leaves"),
    Context("garden", "flower", "flower", None, "an orange dahlia in a dark garden"),
    Context("evening_sky", "rocket", "rocket", (215, 0, 430, 118), "a deep blue evening sky"),
    Context("launch_pad", "rocket", "rocket", None, "a rocket launch pad at dusk"),
    Context("wooden_table", "coffee", "coffee", (430, 200, 600, 400), "a scratched wooden table top"),
    Context("cafe_table", "coffee", "coffee", None, "an espresso cup on a wooden table"),
    Context("garage", "motorcycle", "motorcycle_left", None, "a garage with a red motorcycle"),
    Context("field", "camera", "camera", None, "a man filming on a grass field"),
    Context("pale_sky", "camera", "camera", (320, 0, 512, 120), "a pale grey sky above a campus"),
    Context("astronaut_portrait", "astronaut", "astronaut", None, "an astronaut posing in front of a flag"),
    Context("cat_closeup", "chelsea", "chelsea", None, "a close-up of a tabby cat"),
    Context("tissue", "ihc", "ihc", None, "a stained tissue sample under a microscope"),
    Context("retina", "retina", "retina", None, "a photograph of the back of an eye"),
    Context("cells", "cell", "cell", None, "a grey microscope image of a single cell"),
)


def _sklearn_image(name: str) -> np.ndarray:
    # Located without importing scikit-learn (its import costs seconds); it is a dependency of
    # sentence-transformers, which the project installs.
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{name}: scikit-learn is not installed (the demo benchmark uses its sample photos)")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "images", name)
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@functools.lru_cache(maxsize=None)
def load_photo(key: str) -> np.ndarray:
    """The photo as a read-only uint8 [H, W, 3] array (grey photos repeated over the channels)."""
    import skimage.data as sk  # imported here: only builds need it

    loaders = {
        "astronaut": sk.astronaut, "chelsea": sk.chelsea, "coffee": sk.coffee, "rocket": sk.rocket,
        "motorcycle_left": lambda: sk.stereo_motorcycle()[0], "motorcycle_right": lambda: sk.stereo_motorcycle()[1],
        "camera": sk.camera, "coins": sk.coins, "brick": sk.brick, "grass": sk.grass, "gravel": sk.gravel,
        "moon": sk.moon, "hubble": sk.hubble_deep_field, "retina": sk.retina, "ihc": sk.immunohistochemistry,
        "cell": sk.cell,
        # The silhouette is a boolean mask (True = background): drawn black on white.
        "horse": lambda: np.where(sk.horse(), 255, 0).astype(np.uint8),
        "china": lambda: _sklearn_image("china.jpg"), "flower": lambda: _sklearn_image("flower.jpg"),
    }
    if key not in loaders:
        raise KeyError(f"unknown photo {key!r}; known: {sorted(loaders)}")
    img = np.asarray(loaders[key]())
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    img = np.ascontiguousarray(img[..., :3].astype(np.uint8))
    img.setflags(write=False)
    return img


def boxes_overlap(a: Box, b: Box) -> bool:
    """True when two boxes share pixels."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def context_box(ctx: Context) -> Box:
    """The context's region in its photo (the whole photo when its box is None)."""
    if ctx.box is not None:
        return ctx.box
    h, w = load_photo(ctx.photo).shape[:2]
    return (0, 0, w, h)


def context_shows(ctx: Context, inst: Instance) -> bool:
    """True when the context's region shows pixels of the instance (so it would leak it across splits)."""
    return any(photo == ctx.photo and boxes_overlap(box, context_box(ctx)) for photo, box in inst.views)
