"""IDMR cross-domain data synthesis (`synthesis.synthesize`; CLI ``python -m data_prep.idmr_synth``) and its
pieces: annotation sources, box geometry and instance filters, planning, the CLIP-score filter, the captioners."""
