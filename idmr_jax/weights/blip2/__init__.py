"""BLIP-2's PyTorch-facing code: :mod:`.names` (name maps and transformers config translation for BLIP-2, its
Q-Former and BERT), :mod:`.convert` (the ``hf_blip2`` / ``lavis_blip2`` / ``hf_bert`` import and export) and
:mod:`.verify` (numerical parity against transformers)."""
