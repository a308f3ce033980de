"""Flax NNX model ports."""
