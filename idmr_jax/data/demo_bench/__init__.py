"""The real-photo demo benchmark shared by both tasks' laptop demos: the photo catalog (`photos`), compositing
(`render`), planning (`plan`), texts (`texts`) and the builder that writes it in the OACIRR layout (`builder`)."""
