"""The CIR benchmarks (CIRR, CIRCO, FashionIQ, GeneCIS) as TFDS datasets in the ArrayRecord file format.

    import tensorflow_datasets as tfds
    from data_prep.tfds_cir import prepare

    prepare("cirr", release_dir="/data/CIRR", data_dir="/data/tfds")                      # once per benchmark
    queries = tfds.data_source("cirr/queries", split="val", data_dir="/data/tfds")      # no TensorFlow needed
    gallery = tfds.data_source("cirr/gallery", split="val", data_dir="/data/tfds")
    queries[0]["query_id"], queries[0]["reference"], gallery[0]["image"]                 # decoded [h, w, 3] uint8

The builders read the *release* (the TFDS ``manual_dir``) with the same reader per benchmark as
``python -m data_prep.cir`` (`idmr_jax.tasks.cir.benchmarks`) and keep the same images and queries (the image-file
checks of `idmr_jax.tasks.cir.convert.usable_release`); entries that cannot be used are logged, not written. Two
configs per benchmark: ``queries`` (one example per query, the reference and targets as image keys) and
``gallery`` (one example per image: its key, the benchmark's image id, its gallery group and the image; GeneCIS
crops come cut and padded as the converter stores them). Examples keep the release order (``disable_shuffling``).
Splits: the benchmark's (``val``, ``test``; GeneCIS ``val``).
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import tensorflow_datasets as tfds

from idmr_jax.data import image_files
from idmr_jax.tasks.cir import benchmarks
from idmr_jax.tasks.cir.convert import crop_to_square, usable_release

_CONFIGS = [tfds.core.BuilderConfig(name="queries", description="one example per composed query"),
            tfds.core.BuilderConfig(name="gallery", description="one example per image of the release")]


class _CirBuilder(tfds.core.GeneratorBasedBuilder):
    """One CIR benchmark read from its release folder (the manual dir); subclasses set `name`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version: queries and gallery of the released splits."}
    BUILDER_CONFIGS = _CONFIGS
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Download the release (README 'Benchmarks') and pass its folder as the manual dir."

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        """None: no checksums or metadata files ship next to this code (see data_prep.tfds_idmr_synth)."""
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        if self.builder_config.name == "gallery":
            features = {"key": tfds.features.Text(), "image_id": tfds.features.Text(),
                        "group": tfds.features.Text(), "image": tfds.features.Image(),
                        "crop": tfds.features.Tensor(shape=(4,), dtype=np.float32)}
        else:
            features = {"query_id": tfds.features.Text(), "text": tfds.features.Text(),
                        "reference": tfds.features.Text(), "group": tfds.features.Text(),
                        "targets": tfds.features.Sequence(tfds.features.Text()),
                        "candidates": tfds.features.Sequence(tfds.features.Text()),
                        "subset": tfds.features.Sequence(tfds.features.Text()),
                        "extra": tfds.features.Text()}
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                     disable_shuffling=True, description=f"{self.name}: {self.builder_config.name}")

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        return {split: self._generate_examples(root, split) for split in benchmarks.get(self.name).SPLITS}

    def _generate_examples(self, root: str, split: str):
        release = benchmarks.get(self.name).read_release(root, split)
        images, queries, skips, _ = usable_release(release, root, image_files.ReadRules())
        for s in list(release.skips) + skips:
            logging.warning("%s/%s skipped: %s", self.name, split, s.describe())
        if self.builder_config.name == "gallery":
            for img in images:
                data, _ = image_files.read_image_file(img.path, root)
                crop = np.full(4, np.nan, np.float32)
                if img.crop is not None:
                    data, box = crop_to_square(data, img.crop)
                    crop = np.asarray(box, np.float32)
                yield img.key, {"key": img.key, "image_id": img.image_id, "group": img.group, "image": data,
                                "crop": crop}
            return
        for q in queries:
            yield q.query_id, {"query_id": q.query_id, "text": q.text, "reference": q.reference, "group": q.group,
                               "targets": list(q.targets), "candidates": list(q.candidates or ()),
                               "subset": list(q.subset), "extra": json.dumps(dict(q.extra), sort_keys=True)}


def _builder_class(name: str) -> type:
    """The builder of benchmark `name` (one per module of `idmr_jax.tasks.cir.benchmarks`: a new benchmark file
    gets its TFDS dataset too)."""
    return type("".join(part.title() for part in name.split("_")), (_CirBuilder,),
                {"name": name, "__module__": __name__, "__doc__": f"The {name} benchmark, read from its release."})


BUILDERS = {name: _builder_class(name) for name in benchmarks.names()}


def prepare(benchmark: str, release_dir: str, data_dir: str) -> dict[str, tfds.core.DatasetBuilder]:
    """Builds both configs of `benchmark` (ArrayRecord files) under `data_dir` from its release folder."""
    out = {}
    for config in ("queries", "gallery"):
        builder = BUILDERS[benchmark](config=config, data_dir=data_dir, file_format="array_record")
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=release_dir))
        out[config] = builder
    return out
