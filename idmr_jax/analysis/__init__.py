"""Analyses of trained models as commands: ``python -m idmr_jax.analysis <study> ...`` (see `__main__`)."""
