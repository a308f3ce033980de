"""Data plumbing every task shares: image/box transforms (`image_ops`, `boxes`), text (`text`), the record codec
(`records`; each task's schemas live in ``idmr_jax.tasks.<task>.records``), shard writing (`shards`), image files
read safely (`image_files`), the Grain plumbing of the input pipelines (`grain_io`) and the real-photo demo
benchmark both tasks' demos build on (`demo_bench`).

Task pipelines live with their tasks (``idmr_jax.tasks.<task>.pipeline``). Submodules are imported explicitly
(``from idmr_jax.data import image_ops``) so that Grain worker processes only pull in what they use.
"""
