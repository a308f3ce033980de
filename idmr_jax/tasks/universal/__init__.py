"""The universal any-modality retrieval task (issue 16): queries and candidates of text, image or both."""
