"""Prompt templates of the MLLM embedders on the CIR benchmarks, one set per benchmark.

The query prompt holds the reference image (``<image>``) and the modification text (``{text}``); the candidate
prompt the gallery image. The candidate prompt is the one IDMR and VLM2Vec use for images. The query instructions
name what each benchmark's text describes (a change to a scene, a change to a garment, a condition on an object or
attribute), in the instruction style of the embedders' released CIR prompts.
``config.cir.prompts`` picks the set: "default" (per benchmark, below) or "generic" (one instruction for all).
"""

from __future__ import annotations

CANDIDATE = "<image>\n Represent the given image."
GENERIC_QUERY = "<image>\n Find an image that matches this image with the following change: {text}"

QUERY = {
    "cirr": "<image>\n Given this image and the modification \"{text}\", find the modified image.",
    "circo": "<image>\n Given this image and the modification \"{text}\", find images showing the change.",
    "fashioniq": "<image>\n Given this garment and the requested change \"{text}\", find the described garment.",
    "genecis": "<image>\n Find an image similar to this one with respect to: {text}",
}

SETS = ("default", "generic")


def query_template(benchmark: str, prompt_set: str = "default") -> str:
    """The query template of `benchmark` in `prompt_set`; ValueError for an unknown set."""
    if prompt_set not in SETS:
        raise ValueError(f"unknown config.cir.prompts {prompt_set!r}; choose from {SETS}")
    return QUERY.get(benchmark, GENERIC_QUERY) if prompt_set == "default" else GENERIC_QUERY
