"""trillm_client: a Python client and CLI for trillm (and any TensorRT-LLM backend) Triton servers.

>>> from trillm_client import Client
>>> with Client() as client:                       # gRPC on 127.0.0.1:8001, model "ensemble"
...     print(client.generate("The capital of France is", max_tokens=16).text)
"""

from trillm_client.ab import TrafficSplit, VersionStats
from trillm_client.admin import AdminKey, ModelControl
from trillm_client.aio import AsyncClient, AsyncTextStream
from trillm_client.client import Client, TextStream
from trillm_client.completion import Completion, ModelInfo, Sequence
from trillm_client.errors import (
    AdminKeyError,
    InvalidInputError,
    ModelNotFoundError,
    ModelNotReadyError,
    RequestCancelledError,
    RequestTimeoutError,
    TrillmError,
    UnavailableError,
)
from trillm_client.params import PARAMETERS

__version__ = "0.1.0"

__all__ = [
    "AdminKey",
    "AdminKeyError",
    "AsyncClient",
    "AsyncTextStream",
    "Client",
    "Completion",
    "InvalidInputError",
    "ModelControl",
    "ModelInfo",
    "ModelNotFoundError",
    "ModelNotReadyError",
    "PARAMETERS",
    "RequestCancelledError",
    "RequestTimeoutError",
    "Sequence",
    "TextStream",
    "TrafficSplit",
    "TrillmError",
    "UnavailableError",
    "VersionStats",
]
