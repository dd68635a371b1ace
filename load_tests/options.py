"""The suite's own options, declared once: the locustfile adds them to Locust's
parser (so they work with plain ``locust``, in the web UI and in ``run.py``)
and ``run.py`` forwards them to the Locust it starts.

Numbers that mean "no limit" are 0, so that every option has a typed
default the web UI can show and parse back.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
from dataclasses import dataclass
from typing import Any

from trillm_client.params import build_request

from load_tests.prompts import LengthDist

SHAPES = ("constant", "step", "rate")
ARRIVALS = ("poisson", "uniform")
# Locust user class of each transport (locustfile.py).
TRANSPORTS = {"grpc-stream": "GrpcStreamUser", "http-sse": "HttpStreamUser", "http-generate": "HttpGenerateUser",
              "openai-sse": "OpenAIStreamUser"}


def default_grpc_url() -> str:
    """The Docker load image passes GRPC_PORT (docker/locust-entrypoint.sh)."""
    return f"127.0.0.1:{os.environ.get('GRPC_PORT') or 8001}"


def default_openai_url() -> str:
    return f"http://127.0.0.1:{os.environ.get('OPENAI_PORT') or 9000}/v1"


@dataclass(frozen=True)
class Option:
    flag: str
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    in_web_ui: bool = True

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


OPTIONS: tuple[Option, ...] = (
    Option("--grpc-url", default_grpc_url(), "gRPC host:port of the server (--host is its HTTP URL)"),
    Option("--openai-url", default_openai_url(), "base URL of the OpenAI-compatible API (openai-sse users)"),
    Option("--model", "ensemble", "model to load: ensemble or tensorrt_llm_bls"),
    Option("--input-tokens", "uniform:32:128", "prompt length in tokens: N, uniform:LO:HI or normal:MEAN:STD"),
    Option("--output-tokens", "uniform:16:64", "max_tokens per request: N, uniform:LO:HI or normal:MEAN:STD"),
    Option("--num-prompts", 256, "size of the prompt pool, drawn in order and reused"),
    Option("--prompt-seed", 0, "seed of the prompt pool (and of Poisson arrivals)"),
    Option("--tokenizer", "build/demo-model", "checkpoint dir whose tokenizer sizes prompts exactly; '' = approximate"),
    Option("--sampling", "", "sampling inputs, e.g. temperature=0.8,top_p=0.95,seed=7 (trillm_client.PARAMETERS)"),
    Option("--allow-eos", False, "let the model stop before max_tokens (default: min_tokens=max_tokens)"),
    Option("--shape", "constant", "load shape: constant users, step ramp, or constant request rate", SHAPES),
    Option("--step-users", 1, "step shape: users added each step"),
    Option("--step-time", 10.0, "step shape: seconds between steps"),
    Option("--request-rate", 0.0, "rate shape: requests/s over all users (the users are the pool)"),
    Option("--arrival", "poisson", "rate shape: arrival process", ARRIVALS),
    Option("--request-timeout", 120.0, "seconds to wait for each response before the request fails"),
    Option("--max-error-ratio", 0.01, "fail the run above this failed/all requests ratio"),
    Option("--max-ttft-p99-ms", 0.0, "fail the run above this TTFT p99 (0 = no limit)"),
    Option("--max-itl-p99-ms", 0.0, "fail the run above this ITL p99 (0 = no limit)"),
    Option("--allow-remote", False, "allow a server that is not on a loopback address"),
    Option("--report-dir", "", "write requests.jsonl and summary.json here when a test stops", in_web_ui=False),
)


def add_options(parser: Any, *, for_locust: bool, exclude: tuple[str, ...] = ()) -> None:
    """Adds OPTIONS (but the flags in ``exclude``) to an argparse (or Locust's configargparse) parser."""
    for option in OPTIONS:
        if option.flag in exclude:
            continue
        kwargs: dict[str, Any] = {"default": option.default, "help": option.help}
        if for_locust:
            kwargs["include_in_web_ui"] = option.in_web_ui
        if isinstance(option.default, bool):
            parser.add_argument(option.flag, action="store_true", **kwargs)
            continue
        kwargs["type"] = type(option.default)
        if option.choices:
            kwargs["choices"] = option.choices
        parser.add_argument(option.flag, **kwargs)


def check_options(o: argparse.Namespace) -> None:
    """Raises ValueError (or trillm_client's InvalidInputError) for suite options that cannot work."""
    LengthDist.parse(o.input_tokens)
    LengthDist.parse(o.output_tokens)
    build_request("x", 1, parse_sampling(o.sampling), stream=True)
    if o.shape == "rate" and o.request_rate <= 0:
        raise ValueError("--shape rate needs --request-rate > 0")
    if o.step_users < 1 or o.step_time <= 0:
        raise ValueError("--step-users must be >= 1 and --step-time > 0")
    if o.num_prompts < 1 or o.request_timeout <= 0:
        raise ValueError("--num-prompts must be >= 1 and --request-timeout > 0")
    if not 0 <= o.max_error_ratio <= 1:
        raise ValueError("--max-error-ratio must be in [0, 1]")


def forward(args: argparse.Namespace) -> list[str]:
    """The command-line flags that give a Locust the suite options of ``args``."""
    flags: list[str] = []
    for option in OPTIONS:
        value = getattr(args, option.dest)
        if isinstance(option.default, bool):
            if value:
                flags.append(option.flag)
        else:
            flags += [option.flag, str(value)]
    return flags


def parse_sampling(spec: str) -> dict[str, Any]:
    """``"temperature=0.8,top_k=40,stop_words=END"`` as a dict; values are JSON
    (numbers, true/false) or else strings. Names are checked by trillm_client."""
    sampling: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"sampling {item!r}: expected name=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        sampling[name.strip()] = value
    return sampling


def host_port(url: str) -> str:
    """``"http://127.0.0.1:8000/"`` as ``"127.0.0.1:8000"``: what trillm_client and --host take apart."""
    return url.strip().split("://", 1)[-1].split("/", 1)[0]


def is_loopback(url: str) -> bool:
    """Whether ``url`` ("host:port", with or without http://) names this machine's loopback."""
    host = url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
