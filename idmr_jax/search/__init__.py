"""Index a candidate pool with a trained embedder and search it (``python -m idmr_jax.search index|query``)."""
