"""trillm: an LLM serving stack built as a Triton Inference Server model repository."""

__version__ = "0.1.0"
