"""LamRA-style rerankers: pointwise P("Yes") and listwise index scores of the retriever's top-K, from the same MLLM."""
