"""Embeddings of any-modality query and candidate records with the MLLM embedder, in sharded blocks.

Rows are grouped by whether they hold an image: image rows run the vision tower (`LlavaEmbedder.embed` with pixels),
text-only rows never touch it (the same call without pixels, a program of its own). Each row's prompt is its side's
template for its modality (`idmr_jax.tasks.universal.prompts`), its text filled in.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from idmr_jax.evaluation.blocks import BlockEncoder


class AnyModalityEncoder:
    """Embeds records with ``text`` / ``image`` / ``modality`` fields; `task` is the embedder's task (its prompt
    specs, tokenizer and image size)."""

    def __init__(self, model, task, prompt_set: dict[str, dict[str, str]]):
        from idmr_jax.tasks.idmr import pipeline

        cfg = task.config
        self.pipeline, self.prompts = pipeline, prompt_set
        self.enc = BlockEncoder.from_config(model, cfg)
        self._with_image = self.enc.program(
            lambda m, pixels, ids, mask: m.embed(ids, mask, pixels).astype(jnp.float32))
        self._text_only = self.enc.program(lambda m, ids, mask: m.embed(ids, mask).astype(jnp.float32))
        self.tokenizers = {side: pipeline.PromptTokenizer(cfg.data.tokenizer, task.prompt_spec(side))
                           for side in ("query", "candidate")}
        self.size, self.pad = cfg.data.image_size, cfg.data.pad_ratio

    def embed(self, side: str, records: Sequence, texts: Sequence[str]) -> np.ndarray:
        """[N, D] float32 embeddings of `records` on `side` ("query" | "candidate"); `texts[i]` fills record i's
        template (the instructed text for a query)."""
        rows_with_image = [i for i, r in enumerate(records) if r.image is not None]
        rows_text_only = [i for i, r in enumerate(records) if r.image is None]
        out: np.ndarray | None = None
        for rows, with_image in ((rows_with_image, True), (rows_text_only, False)):
            if not rows:
                continue
            feats = self.enc.run_rows(self._with_image if with_image else self._text_only, len(rows),
                                      lambda block, rows=rows, side=side: self._block(side, records, texts,
                                                                                       [rows[j] for j in block]))
            if out is None:
                out = np.zeros((len(records), feats.shape[1]), np.float32)
            out[rows] = feats
        return out if out is not None else np.zeros((0, 0), np.float32)

    def _block(self, side, records, texts, rows) -> dict[str, np.ndarray]:
        prompts = [self.prompts[side][records[i].modality].format(text=texts[i]) for i in rows]
        ids, mask = self.tokenizers[side].batch(prompts)
        block = {"ids": ids, "mask": mask}
        if records[rows[0]].image is not None:
            block["pixels"] = np.stack([self.pipeline.pixels(records[i].image, self.size, self.pad,
                                                             source=f"{side} record {i} field 'image'")
                                        for i in rows])
        return block
