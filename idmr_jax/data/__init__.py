"""Data: image/box transforms (`image_ops`, `boxes`) and the Grain pipelines built on them.

Submodules are imported explicitly (``from idmr_jax.data import image_ops``) so that Grain worker processes
only pull in what they use.
"""
