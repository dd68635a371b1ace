"""Runs the OpenAI-compatible server: ``trillm openai`` / ``python -m trillm.openai``.

On SIGTERM or SIGINT it drains: new requests get a 503 (and ``/health`` too)
while those in flight finish, for up to ``--drain-timeout`` seconds; then
uvicorn stops, cancelling what is left (which cancels its pipeline
requests). A second signal stops it at once.
"""

from __future__ import annotations

import argparse
import os
import time
from types import FrameType

import uvicorn

from trillm.openai.app import Gate, Settings, create_app
from trillm.openai.options import API_KEY_ENV, add_arguments


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first signal closes the gate and waits for the requests in flight."""

    def __init__(self, config: uvicorn.Config, gate: Gate, drain_timeout: float) -> None:
        super().__init__(config)
        self.gate = gate
        self.drain_timeout = drain_timeout
        self._deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._deadline is None:
            self.gate.draining = True
            self._deadline = time.monotonic() + self.drain_timeout
        else:
            self.should_exit = self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self._deadline is not None and (self.gate.in_flight == 0 or time.monotonic() >= self._deadline):
            self.should_exit = True
        return await super().on_tick(counter)


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(triton_url=args.triton, model=args.model, api_key=os.environ.get(API_KEY_ENV) or None,
                    default_max_tokens=args.default_max_tokens, request_timeout=args.request_timeout)


def run(args: argparse.Namespace) -> int:
    gate = Gate()
    config = uvicorn.Config(create_app(settings_from(args), gate), host=args.host, port=args.port,
                            log_level=args.log_level, timeout_graceful_shutdown=1, lifespan="on")
    server = DrainingServer(config, gate, args.drain_timeout)
    server.run()
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trillm.openai", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
