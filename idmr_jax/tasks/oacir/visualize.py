"""Result grids: each row is a query's reference (box drawn, text below) and its top 5 results.

Frames: green = the target, yellow = the same instance but not the target, red = another instance.
"""

from __future__ import annotations

import textwrap

from etils import epath
from PIL import Image, ImageDraw

from idmr_jax.data import image_ops
from idmr_jax.data.grain_io import decode_image

THUMB = 160
GREEN, YELLOW, RED, BOX = (40, 170, 60), (230, 190, 20), (210, 40, 40), (255, 40, 200)


def thumbnail(image: Image.Image, spec, box=None) -> Image.Image:
    """A THUMB-pixel view of `image` as the model sees it (TargetPad/resize/crop, not normalised), with `box` (in
    that frame) drawn if given."""
    arr = image_ops.center_crop(image_ops.resize_shorter(image_ops.target_pad(image_ops.to_rgb_array(image),
                                                                              spec.pad_ratio), spec.size), spec.size)
    view = Image.fromarray(arr)
    if box is not None:
        ImageDraw.Draw(view).rectangle([float(v) for v in box], outline=BOX, width=3)
    return view.resize((THUMB, THUMB), Image.BICUBIC)


def write_grid(path: epath.Path, queries, rankings, gallery, spec, top: int = 5) -> None:
    """`rankings[i]` are gallery indices of query i (the reference may be among them: it is skipped)."""
    text_h = 48
    cell = THUMB + 8
    canvas = Image.new("RGB", (cell * (top + 1), (cell + text_h) * max(len(queries), 1)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (q, ranking) in enumerate(zip(queries, rankings)):
        y = r * (cell + text_h)
        ref = decode_image(q.reference_image, source=f"query {q.reference_name!r}")
        box = image_ops.transform_box(q.reference_box, ref.size, spec.size, spec.pad_ratio)
        canvas.paste(thumbnail(ref, spec, box), (4, y + 4))
        shown = [j for j in ranking if gallery[j].name != q.reference_name][:top]
        for c, j in enumerate(shown, start=1):
            g = gallery[j]
            color = GREEN if g.name == q.target_name else YELLOW if g.instance == q.target_instance else RED
            x = c * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=color)
            canvas.paste(thumbnail(decode_image(g.image, source=f"gallery {g.name!r}"), spec), (x + 4, y + 4))
        caption = textwrap.shorten(q.modification_text, width=140)
        draw.text((4, y + cell + 2), "\n".join(textwrap.wrap(caption, width=110)[:3]), fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        canvas.save(f, format="PNG")
