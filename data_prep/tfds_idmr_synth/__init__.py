"""The synthesised IDMR triplets (`data_prep.idmr_synth`) as a TFDS dataset in the ArrayRecord format.

    import tensorflow_datasets as tfds
    from data_prep.tfds_idmr_synth import IdmrSynth, prepare

    prepare(synth_out="/data/idmr_synth/coco", data_dir="/data/tfds")          # once
    ds = tfds.data_source("idmr_synth", split="train", data_dir="/data/tfds")  # no TensorFlow needed
    ds[0]["caption"], ds[0]["crop"]                                            # decoded crop [h, w, 3] uint8

The builder re-packs an existing synthesis output folder (its manifest and triplet shards, passed as the TFDS
``manual_dir``); the synthesis itself stays in `data_prep.idmr_synth`, where the skip report, caches and resume
live. Splits are the synthesis' ``train`` / ``val``; examples keep the synthesis order (``disable_shuffling``).
Features mirror `idmr_jax.tasks.idmr.records` (``crop`` / ``image``: JPEG `Image` features; ``box`` / ``crop_box``:
float32 pixels of the stored full image; ``clip_score``: NaN when the synthesis ran without the CLIP filter).
"""

from __future__ import annotations

import json
import os

import numpy as np
import tensorflow_datasets as tfds

from idmr_jax.tasks.idmr import records as triplets

_TEXT_FIELDS = ("caption", "category", "instance_id", "annotation_id", "image_id", "source", "captioner")


class IdmrSynth(tfds.core.GeneratorBasedBuilder):
    """IDMR synthetic (crop, location caption, full image) triplets, re-packed from `data_prep.idmr_synth` shards."""

    VERSION = tfds.core.Version(f"{triplets.SCHEMA_VERSION}.0.0")
    RELEASE_NOTES = {f"{triplets.SCHEMA_VERSION}.0.0": "Triplet schema version 1."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Run `python -m data_prep.idmr_synth ... --out DIR` and pass DIR as the manual "
                                    "dir (`prepare(synth_out=DIR, ...)`).")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        """None: this builder ships no checksums or metadata files next to its code. (tfds' lookup of the code path
        of a builder inside a package needs the `importlib_resources` backport, which this project does not
        install; it is only used to find those files.)"""
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        features = {"crop": tfds.features.Image(encoding_format="jpeg"),
                    "image": tfds.features.Image(encoding_format="jpeg"),
                    "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                    "crop_box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                    "image_size": tfds.features.Tensor(shape=(2,), dtype=np.int32),
                    "clip_score": np.float32, "source_index": np.int64}
        features.update({k: tfds.features.Text() for k in _TEXT_FIELDS})
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                     disable_shuffling=True,
                                     description="IDMR cross-domain synthetic triplets (data_prep.idmr_synth).")

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        with open(os.path.join(root, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
        return {split: self._generate_examples([os.path.join(root, s["file"]) for s in shards])
                for split, shards in manifest["shards"].items() if shards}

    def _generate_examples(self, paths):
        for r in triplets.read_shards(paths):
            yield r.annotation_id, {
                "crop": r.crop_jpeg, "image": r.image_jpeg, "box": np.asarray(r.box, np.float32),
                "crop_box": np.asarray(r.crop_box, np.float32), "image_size": np.asarray(r.image_size, np.int32),
                "clip_score": np.float32(np.nan if r.clip_score is None else r.clip_score),
                "source_index": r.source_index, **{k: getattr(r, k) for k in _TEXT_FIELDS}}


def prepare(synth_out: str, data_dir: str) -> tfds.core.DatasetBuilder:
    """Builds the TFDS dataset (ArrayRecord files) under ``data_dir`` from a synthesis output folder."""
    builder = IdmrSynth(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=synth_out))
    return builder
