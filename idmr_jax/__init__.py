"""idmr_jax: JAX/Flax framework for instance-aware multimodal retrieval (AdaFocal / OACIR, MLLM embedders)."""

import flax

# Variables are created unsharded and placed explicitly: sharded initialisation goes through
# eval_shape + jit(out_shardings=...) in `idmr_jax.sharding`, so a module never needs a mesh to be built.
flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
