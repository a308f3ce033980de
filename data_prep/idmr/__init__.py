"""Pieces of the IDMR data synthesis (`data_prep.idmr_synth`): annotation sources, box geometry and instance
filters, the CLIP-score filter, and the location captioners."""
