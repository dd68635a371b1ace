"""Triton model `postprocessing`: a thin shim; the logic lives in trillm.triton.postprocessing."""

from trillm.triton.postprocessing import TritonPythonModel  # noqa: F401
