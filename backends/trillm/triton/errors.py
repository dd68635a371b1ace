"""Errors that go back to the client as a Triton error on the response."""

from __future__ import annotations


class InputError(ValueError):
    """A request input broke a rule. The message names the input and the rule."""

    def __init__(self, name: str, rule: str) -> None:
        super().__init__(f"input '{name}': {rule}")
        self.input_name = name
        self.rule = rule


class ConfigError(ValueError):
    """A model's config.pbtxt parameters are wrong; raised at load time."""


class ServerUnavailable(RuntimeError):
    """The server cannot take or finish the request (shutting down, engine failed): a
    server fault, reported as UNAVAILABLE (HTTP 503), never as a bad input."""
