"""The request inputs of ``ensemble`` / ``tensorrt_llm_bls`` (shared/INTERFACE.md),
in one table, and their client-side validation.

A :class:`Request` holds validated Python values; :meth:`Request.arrays` gives
the exact tensors (with the leading batch dimension of 1) and
:meth:`Request.json_payload` the JSON body of HTTP ``generate``.

A prompt is text (sent as ``text_input``) or a chat: a list of
``{"role", "content"}`` messages, sent as the ``messages`` input (JSON), which
the server renders with the model's own chat template.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trillm_client.errors import InvalidInputError

TEXT_INPUT = "text_input"
MESSAGES = "messages"
MAX_TOKENS = "max_tokens"
STREAM = "stream"
STOP_WORDS = "stop_words"
NUM_RETURN_SEQUENCES = "num_return_sequences"
RETURN_LOG_PROBS = "return_log_probs"
RETURN_NUM_INPUT_TOKENS = "return_num_input_tokens"
RETURN_NUM_OUTPUT_TOKENS = "return_num_output_tokens"

INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1


@dataclass(frozen=True)
class InputSpec:
    """One input: its numpy dtype, its kind and the rule its value must meet."""

    dtype: type
    kind: str  # "bool", "int", "float" or "words"
    rule: str = ""  # human-readable range, "" = any value of the kind
    check: Callable[[Any], bool] | None = None
    low: int = -(2**31)
    high: int = INT32_MAX


def _in_int32(low: int) -> InputSpec:
    return InputSpec(np.int32, "int", f">= {low} (int32)", None, low=low)


# Sampling parameters a caller may pass, in INTERFACE.md order. ``text_input``
# (or ``messages``) and ``max_tokens`` are the prompt and max_tokens arguments themselves.
PARAMETERS: dict[str, InputSpec] = {
    STREAM: InputSpec(np.bool_, "bool"),
    "exclude_input_in_output": InputSpec(np.bool_, "bool"),
    "bad_words": InputSpec(np.object_, "words"),
    STOP_WORDS: InputSpec(np.object_, "words"),
    "end_id": _in_int32(0),
    "pad_id": _in_int32(0),
    "top_k": _in_int32(0),
    "top_p": InputSpec(np.float32, "float", "in (0, 1]", lambda v: 0.0 < v <= 1.0),
    "temperature": InputSpec(np.float32, "float", ">= 0", lambda v: v >= 0.0),
    "length_penalty": InputSpec(np.float32, "float"),
    "repetition_penalty": InputSpec(np.float32, "float", "> 0", lambda v: v > 0.0),
    "presence_penalty": InputSpec(np.float32, "float"),
    "frequency_penalty": InputSpec(np.float32, "float"),
    "min_tokens": _in_int32(0),
    "seed": InputSpec(np.uint64, "int", f"in [0, {UINT64_MAX}]", None, low=0, high=UINT64_MAX),
    "beam_width": _in_int32(1),
    NUM_RETURN_SEQUENCES: _in_int32(1),
    RETURN_LOG_PROBS: InputSpec(np.bool_, "bool"),
    RETURN_NUM_INPUT_TOKENS: InputSpec(np.bool_, "bool"),
    RETURN_NUM_OUTPUT_TOKENS: InputSpec(np.bool_, "bool"),
    "min_length": _in_int32(0),  # the older name of min_tokens
}

# Sent unless the caller says otherwise: Completion counts tokens and infers
# finish_reason from them.
DEFAULTS: dict[str, Any] = {RETURN_NUM_INPUT_TOKENS: True, RETURN_NUM_OUTPUT_TOKENS: True}


def _fail(name: str, rule: str, value: Any) -> InvalidInputError:
    return InvalidInputError(f"parameter '{name}': {rule}, got {value!r}")


def _coerce(name: str, spec: InputSpec, value: Any, validate: bool) -> Any:
    """The value as the Python type of its kind; range-checked when ``validate``."""
    if spec.kind == "words":
        words = [value] if isinstance(value, str) else value
        if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) for w in words):
            raise _fail(name, "must be a string or a list of strings", value)
        if validate and not all(words):
            raise _fail(name, "must not contain empty strings", value)
        return list(words)
    if spec.kind == "bool":
        if not isinstance(value, (bool, np.bool_)):
            raise _fail(name, "must be a bool", value)
        return bool(value)
    if spec.kind == "int":
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise _fail(name, "must be an integer", value)
        value = int(value)
        if validate and not spec.low <= value <= spec.high:
            raise _fail(name, f"must be {spec.rule}", value)
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise _fail(name, "must be a number", value)
    number = float(value)
    if validate and not math.isfinite(number):
        raise _fail(name, "must be finite", value)
    if validate and spec.check is not None and not spec.check(number):
        raise _fail(name, f"must be {spec.rule}", value)
    return number


Prompt = str | Sequence[Mapping[str, str]]


def _prompt(prompt: Any) -> str | list[dict[str, str]]:
    """The prompt as text, or as a chat (a list of {"role", "content"} dicts of strings)."""
    if isinstance(prompt, str):
        return prompt
    rule = 'must be a string (sent as text_input) or a non-empty list of {"role", "content"} messages'
    if not isinstance(prompt, Sequence) or isinstance(prompt, (bytes, bytearray)) or not prompt:
        raise _fail("prompt", rule, prompt)
    chat = []
    for message in prompt:
        if not isinstance(message, Mapping) or not all(isinstance(message.get(k), str) for k in ("role", "content")):
            raise _fail("prompt", f"{rule}, each with string role and content", message)
        chat.append(dict(message))
    return chat


@dataclass
class Request:
    """A validated request: the prompt (text or chat), max_tokens and the sampling inputs to send."""

    prompt: str | list[dict[str, str]]
    max_tokens: int
    inputs: dict[str, Any] = field(default_factory=dict)  # PARAMETERS name -> Python value

    @property
    def stream(self) -> bool:
        return bool(self.inputs.get(STREAM, False))

    @property
    def num_return_sequences(self) -> int:
        return int(self.inputs.get(NUM_RETURN_SEQUENCES, 1))

    @property
    def return_log_probs(self) -> bool:
        return bool(self.inputs.get(RETURN_LOG_PROBS, False))

    @property
    def stop_words(self) -> list[str]:
        return list(self.inputs.get(STOP_WORDS, []))

    def prompt_input(self) -> tuple[str, str]:
        """The prompt's input and value: ``text_input`` and the text, or ``messages`` and the chat as JSON."""
        if isinstance(self.prompt, str):
            return TEXT_INPUT, self.prompt
        return MESSAGES, json.dumps(self.prompt, ensure_ascii=False)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every input as the tensor to send: shape [1, 1], or [1, n] for word lists."""
        name, prompt = self.prompt_input()
        out = {
            name: np.array([[prompt.encode("utf-8")]], dtype=np.object_),
            MAX_TOKENS: np.array([[self.max_tokens]], dtype=np.int32),
        }
        for name, value in self.inputs.items():
            spec = PARAMETERS[name]
            if spec.kind == "words":
                out[name] = np.array([[w.encode("utf-8") for w in value]], dtype=np.object_).reshape(1, -1)
            else:
                out[name] = np.array([[value]], dtype=spec.dtype)
        return out

    def json_payload(self) -> dict[str, Any]:
        """The JSON body of HTTP ``generate`` / ``generate_stream``: inputs as top-level fields
        (a chat as a string of JSON: ``messages`` is one string tensor)."""
        name, prompt = self.prompt_input()
        return {name: prompt, MAX_TOKENS: self.max_tokens, **self.inputs}


def build_request(
    prompt: Prompt,
    max_tokens: int,
    sampling: Mapping[str, Any],
    *,
    stream: bool,
    validate: bool = True,
) -> Request:
    """A :class:`Request` from user arguments.

    ``stream`` is the default of the ``stream`` input when ``sampling`` does
    not set it. Unknown names and values of the wrong type are always
    rejected (they cannot be encoded); ``validate=False`` skips only the range
    checks, so that a server's own validation can be exercised.
    """
    unknown = sorted(set(sampling) - set(PARAMETERS))
    if unknown:
        raise InvalidInputError(
            f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"valid parameters: {', '.join(PARAMETERS)}"
        )
    prompt = _prompt(prompt)
    if isinstance(max_tokens, (bool, np.bool_)) or not isinstance(max_tokens, (int, np.integer)):
        raise _fail(MAX_TOKENS, "must be an integer", max_tokens)
    if validate and not 0 < int(max_tokens) <= INT32_MAX:
        raise _fail(MAX_TOKENS, "must be > 0", max_tokens)
    given = {**DEFAULTS, STREAM: stream, **sampling}
    inputs = {
        name: _coerce(name, spec, given[name], validate)
        for name, spec in PARAMETERS.items()
        if given.get(name) is not None
    }
    return Request(prompt=prompt, max_tokens=int(max_tokens), inputs=inputs)
