"""Weight import/export between PyTorch checkpoints (transformers, LAVIS) and the Flax ports."""
