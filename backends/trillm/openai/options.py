"""The OpenAI server's command line, shared by ``trillm openai`` and ``python -m trillm.openai``
(argparse only, so that ``trillm`` starts without importing the web stack)."""

from __future__ import annotations

import argparse

API_KEY_ENV = "TRILLM_API_KEY"  # when set, /v1/* needs "Authorization: Bearer <key>"
DEFAULT_PORT = 9000
DEFAULT_MAX_TOKENS = 256  # chat requests that give none (OpenAI documents no default for chat)
REQUEST_TIMEOUT_S = 600.0
DRAIN_TIMEOUT_S = 20.0  # as trillm serve's --drain-timeout
MODELS = ("ensemble", "tensorrt_llm_bls")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--triton", required=True, metavar="HOST:PORT",
                        help="gRPC address of the Triton server (trillm, or NVIDIA's TensorRT-LLM backend)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--model", default=MODELS[0], choices=MODELS,
                        help="the pipeline model requests go to; clients name it, or '<model>:<N>' for version N")
    parser.add_argument("--default-max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help=f"max_tokens of a chat request that gives none (default {DEFAULT_MAX_TOKENS}; "
                        "completions: 16, as OpenAI)")
    parser.add_argument("--request-timeout", type=float, default=REQUEST_TIMEOUT_S,
                        help="seconds to wait for each pipeline response")
    parser.add_argument("--drain-timeout", type=float, default=DRAIN_TIMEOUT_S,
                        help=f"on SIGTERM, seconds to let requests in flight finish (default {DRAIN_TIMEOUT_S:.0f})")
    parser.add_argument("--log-level", default="warning", help="uvicorn's log level")
