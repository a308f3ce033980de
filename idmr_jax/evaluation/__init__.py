"""Evaluation: OACIR metrics (`metrics`) and chunked / sharded gallery top-k retrieval (`retrieval`)."""
