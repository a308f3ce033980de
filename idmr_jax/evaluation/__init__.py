"""Evaluation plumbing every task shares: the padded, sharded block encoder (`blocks`), chunked / sharded gallery
top-k (`retrieval`) and rankings with one tie rule (`ranking`), and the result writers (`outputs`). Task-specific
protocols and metrics live with their tasks (``idmr_jax.tasks.<task>.evaluate``)."""
