"""The CLIP-score filter of the IDMR synthesis: keep a crop when the cosine similarity of its CLIP image features
with the text "a photo of a {category}" exceeds a threshold (0.2 in the IDMR paper).

The filter talks to a `Scorer` (``name`` plus ``score(crops, texts) -> cosine similarities``), so any model, or
a test double with known scores, can stand in. `ClipScorer` is the real one: a transformers CLIPModel folder
loaded into the project's Flax port (`idmr_jax.models.clip`), the tokenizer read from the same folder (offline),
and CLIPImageProcessor's preprocessing (shorter side to the model's image size, bicubic; centre crop; CLIP
mean/std).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from idmr_jax.data import image_ops

PROMPT = "a photo of a {category}"
DEFAULT_THRESHOLD = 0.2


@runtime_checkable
class Scorer(Protocol):
    """Scores crops against texts pairwise. ``name`` identifies the model (it keys the score cache)."""

    name: str

    def score(self, crops: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        """Cosine similarity of crop i with text i, float array [len(crops)]."""
        ...


def clip_pixels(crops: Sequence[Image.Image], size: int) -> np.ndarray:
    """CLIPImageProcessor's preprocessing as NHWC float32: shorter side -> ``size`` (bicubic), centre crop with
    the processor's offsets ``(len - size) // 2``, ``x/255`` normalised by the CLIP mean/std."""
    out = []
    for crop in crops:
        arr = image_ops.resize_shorter(np.asarray(crop.convert("RGB")), size)
        h, w = arr.shape[:2]
        top, left = (h - size) // 2, (w - size) // 2
        out.append(image_ops.normalize(arr[top : top + size, left : left + size]))
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.float32)


def _folder_digest(folder: str) -> str:
    """A short digest of the weight files, so the score cache notices a different checkpoint in the same folder."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith((".safetensors", ".bin", ".json")):
            st = os.stat(os.path.join(folder, name))
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


class ClipScorer:
    """CLIP image-text cosine similarity with a transformers CLIPModel checkpoint (see the module docstring)."""

    def __init__(self, folder: str, *, batch_size: int = 32):
        import jax
        from flax import nnx
        from transformers import CLIPTokenizer

        from idmr_jax.models.clip import clip_score
        from idmr_jax.weights.clip import load_hf_clip

        self.folder, self.batch_size = str(folder), batch_size
        self.model, self.config = load_hf_clip(self.folder)
        self.tokenizer = CLIPTokenizer.from_pretrained(self.folder, local_files_only=True)
        self.image_size = self.config.vision.image_size
        self.max_length = self.config.text.max_positions
        self.name = f"clip:{os.path.basename(self.folder.rstrip('/'))}:{_folder_digest(self.folder)}"
        # Weights go in as an argument, not as closure constants: a real CLIP-L would otherwise be baked into
        # the compiled program.
        graphdef, self._state = nnx.split(self.model)
        self._score = jax.jit(lambda state, p, i, m: clip_score(nnx.merge(graphdef, state), p, i, m))

    def score(self, crops: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        if len(crops) != len(texts):
            raise ValueError(f"{len(crops)} crops but {len(texts)} texts")
        out = []
        for s in range(0, len(crops), self.batch_size):
            pixels = clip_pixels(crops[s : s + self.batch_size], self.image_size)
            tok = self.tokenizer(list(texts[s : s + self.batch_size]), padding="max_length", truncation=True,
                                 max_length=self.max_length, return_tensors="np")
            n = len(pixels)
            if n < self.batch_size:  # one compiled shape for every batch
                pad = self.batch_size - n
                pixels = np.concatenate([pixels, np.zeros((pad, *pixels.shape[1:]), pixels.dtype)])
                ids = np.concatenate([tok["input_ids"], np.repeat(tok["input_ids"][:1], pad, 0)])
                mask = np.concatenate([tok["attention_mask"], np.repeat(tok["attention_mask"][:1], pad, 0)])
            else:
                ids, mask = tok["input_ids"], tok["attention_mask"]
            out.append(np.asarray(self._score(self._state, pixels, ids, mask), np.float32)[:n])
        return np.concatenate(out) if out else np.zeros((0,), np.float32)
