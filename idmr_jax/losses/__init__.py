"""Contrastive losses over the global batch: dense reference, gathered and chunked (ring) shard_map forms;
GradCache for encoders whose global batch does not fit in memory at once."""

from idmr_jax.losses.contrastive import global_infonce, infonce_dense, infonce_gspmd
from idmr_jax.losses.similarity import BATCH_AXES, similarity
from idmr_jax.losses.gradcache import gradcache_encoder, nnx_cached_encode
from idmr_jax.losses.memory import loss_memory_profile
from idmr_jax.losses.ring import ring_infonce

__all__ = [
    "BATCH_AXES",
    "global_infonce",
    "gradcache_encoder",
    "infonce_dense",
    "infonce_gspmd",
    "loss_memory_profile",
    "nnx_cached_encode",
    "ring_infonce",
    "similarity",
]
