"""Triton model `tensorrt_llm`: a thin shim; the logic lives in trillm.triton.engine_host."""

from trillm.triton.engine_host import TritonPythonModel  # noqa: F401
