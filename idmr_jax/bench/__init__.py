"""Benchmarks: ``python -m idmr_jax.bench SUITE [--config=NAME] [--out=FILE.json]``.

Suites (one module each): ``train_step`` (examples/s of one jitted AdaFocal update, optionally side by side with a
PyTorch/transformers baseline), ``mfu`` (model FLOPs utilisation against a measured matmul peak), ``retrieval``
(chunked max-over-tokens top-k against NumPy), ``input`` (Grain pipeline examples/s against the train step's
consumption), ``loss_memory`` (per-device memory of the dense and the chunked global InfoNCE) and ``mbeir_memory``
(host memory per candidate of the M-BEIR evaluation). Every timing suite times several repetitions after warm-up
and compilation, reports the median and spread and writes JSON.
Results and commands are in ``BENCHMARKS.md``.
"""
