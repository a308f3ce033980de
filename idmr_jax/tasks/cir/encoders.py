"""Query and candidate features of a CIR benchmark from either model family, on the device mesh.

`QFormerEncoder`: BLIP-2 / AdaFocal (the ``oacir`` task's model). Candidates: the Q-Former's target features
[N, Q, E] (scored by the max over query tokens, as BLIP-2's ITC); queries: the reference image's tokens + the
modification text (BLIP caption cleaning, the OACIR tokenizer). The CIR benchmarks have no boxes, so AdaFocal's box
mask is empty: CAAM sees the whole reference image as context and no anchored region.

`MllmEncoder`: the LLaVA embedder (the ``idmr`` task's model): last-token embeddings of the query prompt (reference
image + instruction with the text, `idmr_jax.tasks.cir.prompts`) and of the candidate prompt.

Both encode in fixed-size blocks sharded over the mesh (`idmr_jax.evaluation.blocks`) and return float32 numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from idmr_jax.data import image_ops, text
from idmr_jax.data.grain_io import decode_image
from idmr_jax.evaluation.blocks import BlockEncoder
from idmr_jax.tasks.cir import prompts
from idmr_jax.tasks.cir.records import ImageRecord, QueryRecord


def _image(rec: ImageRecord) -> object:
    return decode_image(rec.image, source=f"image {rec.key!r} field 'image'")


class QFormerEncoder:
    """BLIP-2 / AdaFocal features for CIR (see the module docstring); `task` is an ``OacirTask``."""

    def __init__(self, model, task):
        from idmr_jax.tasks.oacir.evaluate import FeatureEncoder
        from idmr_jax.tasks.oacir.pipeline import image_spec

        self.enc = FeatureEncoder.from_config(model, task.config)
        self.spec = image_spec(task.model_config)
        d = task.config.data
        self.tokenizer = text.Tokenizer(d.tokenizer, d.max_text_len)
        self.batch_size = self.enc.batch_size

    def _pixels(self, recs: Sequence[ImageRecord]) -> np.ndarray:
        return np.stack([image_ops.preprocess(_image(r), None, self.spec.size, self.spec.pad_ratio)[0] for r in recs])

    def candidates(self, images: Sequence[ImageRecord]) -> np.ndarray:
        """[N, Q, E] target features of `images`."""
        out = [self.enc.vision_and_targets(self._pixels(images[s:s + self.batch_size]))[1]
               for s in range(0, len(images), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, 1, 1), np.float32)

    def queries(self, queries: Sequence[QueryRecord], images: Sequence[ImageRecord]) -> np.ndarray:
        """[Nq, E] query features: the reference image (``images[q.reference_index]``) + the cleaned text."""
        out = []
        n_mask = 1 + self.spec.grid[0] * self.spec.grid[1]
        for s in range(0, len(queries), self.batch_size):
            block = queries[s:s + self.batch_size]
            tokens = self.enc.vision(self._pixels([images[q.reference_index] for q in block]))
            ids, mask = self.tokenizer([text.blip_caption(q.text) for q in block])
            no_box = np.zeros((len(block), n_mask), np.float32)
            out.append(self.enc.queries_from_tokens(tokens, ids, mask, no_box)[0])
        return np.concatenate(out)


class MllmEncoder:
    """LLaVA-embedder features for CIR (see the module docstring); `task` is an ``IdmrTask``."""

    def __init__(self, model, task, benchmark: str, prompt_set: str = "default"):
        from idmr_jax.tasks.idmr import pipeline

        cfg = task.config
        self.pipeline = pipeline
        self.enc = BlockEncoder.from_config(model, cfg)
        self.embed = self.enc.program(lambda m, pixels, ids, mask: m.embed(ids, mask, pixels).astype(jnp.float32))
        self.query_tok = pipeline.PromptTokenizer(cfg.data.tokenizer, task.prompt_spec("query"))
        self.cand_tok = pipeline.PromptTokenizer(cfg.data.tokenizer, task.prompt_spec("candidate"))
        self.template = prompts.query_template(benchmark, prompt_set)
        self.size, self.pad = cfg.data.image_size, cfg.data.pad_ratio

    def _pixels(self, recs: Sequence[ImageRecord]) -> np.ndarray:
        return np.stack([self.pipeline.pixels(r.image, self.size, self.pad, source=f"image {r.key!r} field 'image'")
                         for r in recs])

    def candidates(self, images: Sequence[ImageRecord]) -> np.ndarray:
        """[N, E] candidate embeddings."""

        def block(rows):
            ids, mask = self.cand_tok.batch([prompts.CANDIDATE] * len(rows))
            return {"pixels": self._pixels([images[i] for i in rows]), "ids": ids, "mask": mask}

        return self.enc.run_rows(self.embed, len(images), block)

    def queries(self, queries: Sequence[QueryRecord], images: Sequence[ImageRecord]) -> np.ndarray:
        """[Nq, E] query embeddings: the reference image + the benchmark's instruction with the text."""

        def block(rows):
            ids, mask = self.query_tok.batch([self.template.format(text=queries[i].text) for i in rows])
            return {"pixels": self._pixels([images[queries[i].reference_index] for i in rows]), "ids": ids,
                    "mask": mask}

        return self.enc.run_rows(self.embed, len(queries), block)
