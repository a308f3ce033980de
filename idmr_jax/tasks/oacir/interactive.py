"""One query at a time: restore a trained AdaFocal from a workdir, encode a val gallery once, then rank any
(image, box, text) against it and draw the result row. Used by ``notebooks/oacir_quickstart.ipynb``.

    retriever = Retriever.from_workdir("workdir/demo")        # config and weights from the latest checkpoint
    q = retriever.queries[0]
    image = retriever.reference_image(q)
    ranking = retriever.rank(image, q.reference_box, q.modification_text, exclude=[q.reference_name])
    retriever.draw(image, q.reference_box, q.modification_text, ranking, target=q.target_name)

Boxes are ``[x1, y1, x2, y2]`` in the pixels of the image as given (for gallery images: the stored image); they go
through the same TargetPad/resize/crop map as in training, and a box with nothing left inside the crop is no box.
"""

from __future__ import annotations

import dataclasses
import os
import textwrap
from collections.abc import Iterable, Sequence

import ml_collections
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw

from idmr_jax import sharding as shd
from idmr_jax import tasks
from idmr_jax.data import image_ops, text
from idmr_jax.data.boxes import box_to_patch_mask
from idmr_jax.data.grain_io import decode_image
from idmr_jax.tasks.oacir import pipeline, records, visualize
from idmr_jax.tasks.oacir.evaluate import FeatureEncoder
from idmr_jax.train import checkpoint, setup
from idmr_jax.train import workdir as layout

GREY = (150, 150, 150)


@dataclasses.dataclass(frozen=True)
class Ranking:
    """The best gallery items for one query, best first, and the query's beta (CAAM's focus strength)."""

    names: tuple[str, ...]
    indices: tuple[int, ...]
    scores: tuple[float, ...]
    beta: float


def load_config(workdir) -> ml_collections.ConfigDict:
    """The resolved config saved with the latest checkpoint in `workdir` (what the model was trained with)."""
    step_dir, _ = layout.latest_step(workdir)
    return layout.read_config(step_dir)


def restore_model(config: ml_collections.ConfigDict, workdir):
    """(AdaFocal model, AdaFocalConfig, step) from the latest checkpoint in `workdir`.

    Only the model's params are read (Orbax partial restore), not the optimiser state, and nothing is compiled:
    the target tree comes from ``nnx.eval_shape``.
    """
    step_dir, step = layout.latest_step(workdir)
    task = tasks.build(config)
    graphdef, target = setup.abstract_model_state(task, shd.mesh_from_config(config), shd.rules_from_config(config))
    restored = checkpoint.restore_model_state(step_dir, target)
    model = nnx.merge(graphdef, restored["params"], restored["frozen"])
    return model, task.model_config, step


class Retriever:
    """A trained AdaFocal plus the target features of one val gallery, encoded once."""

    def __init__(self, model, model_config, config: ml_collections.ConfigDict, val_folder: str, *,
                 batch_size: int = 8):
        """`batch_size`: rows per encoder call. A single query is padded to it, so it stays small (interactive
        latency on a CPU); the gallery is encoded in blocks of it. Meant for demo-sized galleries: every val
        record (with its image bytes) is held in memory."""
        self.config, self.model_config = config, model_config
        self.spec = pipeline.image_spec(model_config)
        self.gallery: list[records.GalleryRecord] = records.read_shards(
            os.path.join(val_folder, pipeline.GALLERY_GLOB))
        self.queries: list[records.QueryRecord] = records.read_shards(
            os.path.join(val_folder, pipeline.QUERY_GLOB))
        self._by_name = {g.name: i for i, g in enumerate(self.gallery)}
        self.encoder = FeatureEncoder(model, batch_size, shd.mesh_from_config(config), shd.rules_from_config(config))
        self.tokenizer = text.Tokenizer(config.data.tokenizer, config.data.max_text_len)
        feats = []
        for start in range(0, len(self.gallery), self.encoder.batch_size):
            block = self.gallery[start:start + self.encoder.batch_size]
            pixels = np.stack([image_ops.preprocess(self._decode(g), None, self.spec.size, self.spec.pad_ratio)[0]
                               for g in block])
            feats.append(self.encoder.vision_and_targets(pixels)[1])
        self.features = np.concatenate(feats)  # [N, num_query_tokens, embed_dim], L2-normalised per token

    @classmethod
    def from_workdir(cls, workdir, config: ml_collections.ConfigDict | None = None,
                     val_folder: str | None = None, *, batch_size: int = 8) -> Retriever:
        """Restores the latest checkpoint of `workdir` (with the config saved there unless `config` is given) and
        encodes `val_folder`, by default the first folder of ``config.data.val_dir``."""
        config = config if config is not None else load_config(workdir)
        folders = [f for f in (val_folder or config.data.val_dir or "").split(",") if f]
        if not folders:
            raise ValueError("no val folder: pass val_folder or set config.data.val_dir")
        model, model_config, _ = restore_model(config, workdir)
        return cls(model, model_config, config, folders[0], batch_size=batch_size)

    @staticmethod
    def _decode(g: records.GalleryRecord) -> Image.Image:
        return decode_image(g.image, source=f"gallery {g.name!r} field 'image'")

    def gallery_image(self, name: str) -> Image.Image:
        """A gallery image by name, as stored (the frame that boxes of gallery images refer to)."""
        if name not in self._by_name:
            raise KeyError(f"{name!r} is not in the gallery ({len(self.gallery)} images)")
        return self._decode(self.gallery[self._by_name[name]])

    def reference_image(self, query: records.QueryRecord) -> Image.Image:
        return decode_image(query.reference_image, source=f"query {query.reference_name!r} field 'reference_image'")

    def rank(self, image: Image.Image, box: Sequence[float] | None, query_text: str, *, top: int = 5,
             exclude: Iterable[str] = ()) -> Ranking:
        """The `top` gallery items for (image, box, text) by AdaFocal's max-over-query-tokens score.

        `exclude` names gallery images to leave out (the protocol drops the reference image itself). The text is
        cleaned as in training (BLIP caption processing); with ``data.roi_crop`` the image is cropped to the box.
        """
        if box is not None:
            x1, y1, x2, y2 = (float(v) for v in box)
            if not (0 <= x1 < x2 and 0 <= y1 < y2):
                raise ValueError(f"box {list(box)} is not [x1, y1, x2, y2] with 0 <= x1 < x2 and 0 <= y1 < y2")
        if self.config.data.roi_crop and box is not None:
            x1, y1, x2, y2 = (int(round(v)) for v in box)
            image, box = image.crop((x1, y1, max(x2, x1 + 1), max(y2, y1 + 1))), None
        pixels, final_box = image_ops.preprocess(image, box, self.spec.size, self.spec.pad_ratio)
        mask = box_to_patch_mask(final_box, self.spec.grid, (self.spec.size, self.spec.size), patch=self.spec.patch)
        ids, att = self.tokenizer([text.blip_caption(query_text)])
        q, beta = self.encoder.queries(pixels[None], ids, att, mask[None])
        scores = np.einsum("nqe,e->nq", self.features, q[0]).max(-1)
        skip = set(exclude)
        order = [int(j) for j in np.argsort(-scores, kind="stable") if self.gallery[j].name not in skip][:top]
        return Ranking(names=tuple(self.gallery[j].name for j in order), indices=tuple(order),
                       scores=tuple(float(scores[j]) for j in order), beta=float(np.mean(beta)))

    def draw(self, image: Image.Image, box: Sequence[float] | None, query_text: str, ranking: Ranking, *,
             target: str | None = None) -> Image.Image:
        """One result row: the reference as the model sees it (box drawn), the text, then the ranking.

        Frames: green = `target`, yellow = another image of the target's instance, red = another instance
        (grey everywhere when no target is given). Each result is labelled with its rank, name and score.
        """
        size = visualize.THUMB
        cell, text_h, label_h = size + 8, 40, 28
        top = len(ranking.names)
        canvas = Image.new("RGB", (cell * (top + 1), cell + label_h + text_h), "white")
        draw = ImageDraw.Draw(canvas)
        shown_box = image_ops.transform_box(box, image.size, self.spec.size, self.spec.pad_ratio)
        canvas.paste(visualize.thumbnail(image, self.spec, shown_box), (4, 4))
        draw.text((4, cell + 2), f"query (beta {ranking.beta:.2f})", fill="black")
        target_instance = self.gallery[self._by_name[target]].instance if target in self._by_name else None
        for c, (j, name, score) in enumerate(zip(ranking.indices, ranking.names, ranking.scores), start=1):
            g = self.gallery[j]
            color = GREY if target is None else _frame_color(name == target, g.instance == target_instance)
            x = c * cell
            draw.rectangle([x, 0, x + cell - 1, cell - 1], fill=color)
            canvas.paste(visualize.thumbnail(self._decode(g), self.spec), (x + 4, 4))
            draw.text((x + 4, cell + 2), f"{c}. {textwrap.shorten(name, 22, placeholder='..')}\n{score:.3f}",
                      fill="black")
        lines = textwrap.wrap(textwrap.shorten(query_text, width=220), width=cell * (top + 1) // 6)[:3]
        draw.text((4, cell + label_h + 2), "\n".join(lines), fill="black")
        return canvas


def _frame_color(is_target: bool, same_instance: bool) -> tuple[int, int, int]:
    # The colours of the evaluation's result grids, so both read the same way.
    return visualize.GREEN if is_target else visualize.YELLOW if same_instance else visualize.RED
