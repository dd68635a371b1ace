"""Triton model `tensorrt_llm_bls`: a thin shim; the logic lives in trillm.triton.bls."""

from trillm.triton.bls import TritonPythonModel  # noqa: F401
