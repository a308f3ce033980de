"""Data plumbing every task shares: image/box transforms (`image_ops`, `boxes`), text (`text`), the record codec
(`records`; each task's schemas live in ``idmr_jax.tasks.<task>.records``), shard writing (`shards`), the Grain
plumbing of the input pipelines (`grain_io`) and their throughput measurement (`throughput`).

Task pipelines live with their tasks (``idmr_jax.tasks.<task>.pipeline``). Submodules are imported explicitly
(``from idmr_jax.data import image_ops``) so that Grain worker processes only pull in what they use.
"""
