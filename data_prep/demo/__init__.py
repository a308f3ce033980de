"""Pieces of the real-photo demo benchmark (`data_prep.demo_bench`): the photo catalog, compositing and texts."""
