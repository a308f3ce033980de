"""Dataset converters: released datasets -> sharded ArrayRecord files with a manifest (see `data_prep.oacirr`)."""
