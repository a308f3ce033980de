"""Weight import/export between PyTorch checkpoints (transformers, LAVIS, PEFT) and the Flax ports.

One module per model family owns its name maps, transformers config translation, import, export and verify:
``vit``, ``blip2/`` (names, convert, verify), ``adafocal``, ``clip``, ``decoder_lm``, ``llava`` (+ ``llava_verify``),
``efficientnet``, ``peft``. ``mapping`` is the one name-map mechanism; ``torch_io`` reads and writes PyTorch
files, ``io`` idmr_jax's saved-model directories; ``formats`` names the formats of ``python -m idmr_jax.convert``
and ``conversion`` holds what their functions share.
"""
