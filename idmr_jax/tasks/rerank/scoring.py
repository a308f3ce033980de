"""Reranker scores from the MLLM's next-token logits at the last prompt position (LamRA).

    pointwise:  P("Yes") = softmax([logit(Yes), logit(No)])[0]             one prompt per (query, candidate)
    listwise:   P(j)     = softmax([logit("1"), ..., logit("K")])[j]        one prompt per query and its K candidates

Both normalise over the answer tokens only (not the whole vocabulary), so an untrained LM that spreads its mass
elsewhere still gives a score in [0, 1]. The model call is `LlavaEmbedder.hidden_states`; only the last attended
position of each row (`idmr_jax.models.pooling.pool_positions`, right or left padding alike) goes through the
LM head, so the [B, T, V] logits are never formed. `RerankScorer` runs prompts in padded, batch-sharded blocks
(`idmr_jax.evaluation.blocks.BlockEncoder`); rows are grouped by their number of images, so a block's pixels are
exactly its prompts' images (a text-only group never runs the vision tower) and the row-major splice of
`splice_image_features` puts each image at its own placeholder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from idmr_jax import sharding as shd
from idmr_jax.evaluation.blocks import BlockEncoder
from idmr_jax.models import pooling
from idmr_jax.tasks.idmr.pipeline import pixels
from idmr_jax.tasks.rerank.prompts import (RerankPrompt, RerankPrompts, RerankTokenizer, answer_ids,
                                           load_rerank_prompts)


def pointwise_scores(logits_last: jax.Array, yes_id: int, no_id: int) -> jax.Array:
    """P("Yes") [B] float32: the softmax over the "Yes" and "No" logits of ``logits_last [B, V]``."""
    pair = jnp.stack([logits_last[:, yes_id], logits_last[:, no_id]], axis=-1).astype(jnp.float32)
    return jax.nn.softmax(pair, axis=-1)[:, 0]


def listwise_scores(logits_last: jax.Array, index_ids: Sequence[int]) -> jax.Array:
    """[B, K] float32: the softmax over the logits of the K index tokens (labels "1".."K")."""
    picked = jnp.take(logits_last, jnp.asarray(index_ids, jnp.int32), axis=-1).astype(jnp.float32)
    return jax.nn.softmax(picked, axis=-1)


def last_logits(model, ids: jax.Array, mask: jax.Array, pixels: jax.Array | None = None,
                image_valid: jax.Array | None = None, *, deterministic: bool = True) -> jax.Array:
    """Next-token logits [B, V] float32 at each row's last attended position (``model.logits(...)[b, last_b]``).

    `pixels` [B_img, S, S, 3] are the images of all rows, row-major (`LlavaEmbedder.input_embeddings`);
    ``deterministic=False`` applies the LoRA dropout (training)."""
    hidden = model.hidden_states(ids, mask, pixels, image_valid=image_valid, deterministic=deterministic)
    position, _ = pooling.pool_positions(mask, ids, method="last")
    last = jnp.take_along_axis(hidden, position[:, None, None], axis=1)[:, 0]
    return model.lm.logits(last).astype(jnp.float32)


def image_rows(prompts: Sequence[RerankPrompt], size: int, pad_ratio: float, *, what: str = "prompt") -> np.ndarray:
    """float32 ``[N, M, size, size, 3]`` pixels of N prompts with M images each (in placeholder order)."""
    return np.stack([np.stack([pixels(image, size, pad_ratio, source=f"{what} {i} image {j}")
                               for j, image in enumerate(p.images)]) for i, p in enumerate(prompts)])


class RerankScorer:
    """Scores reranking prompts with an MLLM; `task_like` gives the config (``data.tokenizer``, ``image_size``,
    ``pad_ratio``, ``eval.batch_size``, the mesh) and ``prompt_spec("query")`` (ids of image / BOS / pad tokens,
    image tokens per image, and ``max_length`` unless `max_length` is given)."""

    def __init__(self, model, task_like, *, prompts: RerankPrompts | None = None, max_length: int | None = None):
        cfg = task_like.config
        spec = task_like.prompt_spec("query")
        if max_length:
            spec = dataclasses.replace(spec, max_length=int(max_length))
        self.config = cfg
        self.prompts = prompts or load_rerank_prompts()
        self.tokenizer = RerankTokenizer(cfg.data.tokenizer, spec)
        self.answers = answer_ids(self.tokenizer, self.prompts)
        self.encoder = BlockEncoder.from_config(model, cfg)
        self.size, self.pad_ratio = cfg.data.image_size, cfg.data.pad_ratio
        self._programs: dict[tuple[str, int], object] = {}

    def _program(self, kind: str, k: int):
        if (kind, k) not in self._programs:
            yes, no, index = self.answers.yes, self.answers.no, self.answers.index[:k]

            def score(m, ids, mask, pixels=None):
                if pixels is not None:  # [B, M, S, S, 3] -> the row-major image list the splice expects
                    pixels = pixels.reshape(-1, *pixels.shape[2:])
                logits = last_logits(m, ids, mask, pixels)
                return pointwise_scores(logits, yes, no) if kind == "pointwise" else listwise_scores(logits, index)

            self._programs[(kind, k)] = self.encoder.program(score)
        return self._programs[(kind, k)]

    def _run(self, kind: str, k: int, prompts: Sequence[RerankPrompt], rows: list[int]) -> np.ndarray:
        program = self._program(kind, k)
        outs = []
        for block in self.encoder.row_blocks(len(rows)):
            chosen = [prompts[rows[i]] for i in block]
            ids, mask = self.tokenizer.batch(chosen, what=f"{kind} prompt")
            arrays = {"ids": ids, "mask": mask}
            if chosen[0].images:
                arrays["pixels"] = image_rows(chosen, self.size, self.pad_ratio, what=f"{kind} prompt")
            outs.append(self.encoder.run(program, arrays))
        return np.concatenate(outs)

    def _grouped(self, kind: str, prompts: Sequence[RerankPrompt], sizes: Sequence[int]) -> list[np.ndarray]:
        """Scores of each prompt, run in groups of equal (list size, image count)."""
        out: list[np.ndarray | None] = [None] * len(prompts)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (p, k) in enumerate(zip(prompts, sizes)):
            groups.setdefault((k, len(p.images)), []).append(i)
        with shd.axis_rules(shd.mesh_from_config(self.config), shd.rules_from_config(self.config)):
            for (k, _), rows in sorted(groups.items()):
                for i, s in zip(rows, self._run(kind, k, prompts, rows)):
                    out[i] = s
        return out

    def pointwise(self, prompts: Sequence[RerankPrompt]) -> np.ndarray:
        """P("Yes") [N] float32 of N pointwise prompts."""
        if not prompts:
            return np.zeros(0, np.float32)
        return np.asarray(self._grouped("pointwise", prompts, [1] * len(prompts)), np.float32)

    def listwise(self, prompts: Sequence[RerankPrompt], sizes: Sequence[int]) -> list[np.ndarray]:
        """[K_i] float32 index probabilities of each listwise prompt (`sizes[i]` = its number of candidates)."""
        if len(prompts) != len(sizes):
            raise ValueError(f"{len(prompts)} listwise prompts but {len(sizes)} list sizes")
        for i, k in enumerate(sizes):
            if not 1 <= k <= len(self.answers.index):
                raise ValueError(f"listwise prompt {i}: {k} candidates; the index tokens cover 1.."
                                 f"{len(self.answers.index)}")
        return [np.asarray(s, np.float32) for s in self._grouped("listwise", prompts, sizes)]
