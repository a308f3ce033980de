"""Embeddings of any-modality query and candidate records with the MLLM embedder, in sharded blocks.

Rows are grouped by whether they hold an image: image rows run the vision tower (`LlavaEmbedder.embed` with pixels),
text-only rows never touch it (the same call without pixels, a program of its own). Each row's prompt is its side's
template for its modality (`idmr_jax.tasks.universal.prompts`), its text filled in. `embed_fetched` reads the
records block by block (M-BEIR's candidates, by key from their shards), so a pool of millions is never in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from idmr_jax.evaluation.blocks import BlockEncoder

# rows -> (the records at those rows, the texts that fill their templates)
Fetch = Callable[[list[int]], tuple[Sequence, Sequence[str]]]


class AnyModalityEncoder:
    """Embeds records with ``text`` / ``image`` / ``modality`` fields; `task` is the embedder's task (its prompt
    specs, tokenizer and image size)."""

    def __init__(self, model, task, prompt_set: dict[str, dict[str, tuple[str, ...]]]):
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
        return self.embed_fetched(side, [r.image is not None for r in records],
                                  lambda rows: ([records[i] for i in rows], [texts[i] for i in rows]))

    def embed_fetched(self, side: str, with_image: Sequence[bool], fetch: Fetch) -> np.ndarray:
        """[N, D] float32 embeddings of N records that are read block by block: ``fetch(rows)`` returns the records
        at `rows` (indices into `with_image`, at most one block of ``eval.batch_size``) and the texts that fill
        their templates. A block's records live only while its arrays are built, so at most one block of images
        is held at a time; the [N, D] result is allocated once and filled block by block."""
        flags = np.asarray(with_image, bool)
        out: np.ndarray | None = None
        for rows, image in ((np.flatnonzero(flags), True), (np.flatnonzero(~flags), False)):
            program = self._with_image if image else self._text_only
            for block in self.enc.row_blocks(len(rows)):
                keys = [int(i) for i in rows[block.start:block.stop]]
                feats = self.enc.run(program, self._block(side, keys, fetch, image))
                if out is None:
                    out = np.zeros((len(flags), feats.shape[1]), np.float32)
                out[keys] = feats
        return out if out is not None else np.zeros((0, 0), np.float32)

    def _block(self, side, rows: list[int], fetch: Fetch, image: bool) -> dict[str, np.ndarray]:
        # The records are locals of this call: they (and their image bytes) are freed when the arrays are built.
        records, texts = fetch(rows)
        for i, r in zip(rows, records):
            if (r.image is not None) != image:
                raise ValueError(f"{side} record {i}: {'has no' if image else 'has an'} image now, unlike when it "
                                 "was indexed (were the shards rewritten during the evaluation?)")
        # The first template of each entry: evaluation never draws at random.
        prompts = [self.prompts[side][r.modality][0].format(text=t) for r, t in zip(records, texts)]
        ids, mask = self.tokenizers[side].batch(prompts)
        block = {"ids": ids, "mask": mask}
        if image:
            block["pixels"] = np.stack([self.pipeline.pixels(r.image, self.size, self.pad,
                                                             source=f"{side} record {i} field 'image'")
                                        for i, r in zip(rows, records)])
        return block
