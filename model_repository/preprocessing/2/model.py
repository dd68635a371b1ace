"""Triton model `preprocessing`: a thin shim; the logic lives in trillm.triton.preprocessing."""

from trillm.triton.preprocessing import TritonPythonModel  # noqa: F401
