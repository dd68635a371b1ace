"""The OpenAI request bodies we accept, checked, and turned into pipeline requests.

Each body is a pydantic model (types, ranges) with a ``validate()`` for the
rules between fields; every failure is an :class:`APIError` whose ``param``
names the field, as OpenAI's own API does. Fields OpenAI defines that would
change the answer in a way the pipeline cannot honour (tools, response
formats, logit_bias...) are refused by name rather than silently ignored;
unknown fields are refused like OpenAI refuses them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

# How many sequences one request may ask for (n, times the prompts of a completions batch).
MAX_N = 16
MAX_CHOICES = 128
UINT64 = 2**64
# OpenAI's documented default for /v1/completions.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


class APIError(Exception):
    """An error answer: HTTP status and OpenAI's ``{"error": {message, type, param, code}}``."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        kind = self.TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad_request(param: str | None, rule: str, code: str = "invalid_value") -> APIError:
    return APIError(400, f"{param}: {rule}" if param else rule, param=param, code=code)


def _is_union_tag(part: int | str) -> bool:
    """pydantic puts the union member it tried in the location (``'str'``, ``'list[str]'``)."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def field_path(loc: tuple[int | str, ...]) -> str:
    """pydantic's error location as the field OpenAI would name: ``messages[0].content``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _is_union_tag(part):
            path += ("." if path else "") + str(part)
    return path


def parse(model: type[Any], body: Any, default_max_tokens: int | None = None) -> Any:
    """The validated request, or the APIError naming the first bad field.

    ``default_max_tokens``: the server's, for a chat request that does not say.
    """
    if not isinstance(body, dict):
        raise bad_request(None, "the request body must be a JSON object")
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        param = field_path(tuple(first["loc"]))
        if first["type"] == "extra_forbidden":
            raise bad_request(param, f"unrecognized request argument supplied: {param}",
                              code="unknown_parameter") from None
        if first["type"] == "missing":
            raise bad_request(param, "is required", code="missing_required_parameter") from None
        tags = [str(part) for e in errors if field_path(tuple(e["loc"])) == param
                for part in e["loc"] if _is_union_tag(part)]
        if len(tags) > 1:
            rule = f"must be one of {', '.join(dict.fromkeys(tags))}"
        else:
            rule = first["msg"][0].lower() + first["msg"][1:]
        raise bad_request(param, f"{rule}, got {first.get('input')!r}") from None
    if default_max_tokens is not None:
        request._default_max_tokens = default_max_tokens
    request.validate()
    return request


class Strict(BaseModel):
    # strict: "0.5" is not a number and 1.0 is not an integer, as in OpenAI's API.
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # a newer OpenAI client option; we send no padding anyway


class Sampling(Strict):
    """The fields chat and completions share (OpenAI's, then vLLM's extensions)."""

    model: str
    max_tokens: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=UINT64)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's sampling extensions.
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = None
    top_k: int | None = Field(default=None, ge=-1)
    repetition_penalty: float | None = Field(default=None, gt=0.0)

    def limit(self) -> int:
        """max_tokens as sent (the default when the body does not say)."""
        raise NotImplementedError

    def limit_field(self) -> str:
        return "max_tokens"

    def validate(self) -> None:
        if isinstance(self.stop, list) and len(self.stop) > MAX_N:
            raise bad_request("stop", f"at most {MAX_N} stop sequences, got {len(self.stop)}")
        for word in self.stop_words():
            if not word:
                raise bad_request("stop", "stop sequences must not be empty strings")
        if self.logit_bias:
            raise bad_request("logit_bias", "is not supported by this server (the engine cannot bias logits)")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options", "is only allowed when stream is true")
        if self.min_tokens is not None and self.min_tokens > self.limit():
            raise bad_request("min_tokens", f"must be <= {self.limit_field()} ({self.limit()}), got {self.min_tokens}")

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def stop_words(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling(self) -> dict[str, Any]:
        """The pipeline's sampling inputs (trillm_client.PARAMETERS names); seeds are set per choice."""
        out: dict[str, Any] = {
            # OpenAI samples at temperature 1 unless told; the pipeline's own default is greedy.
            "temperature": 1.0 if self.temperature is None else self.temperature,
        }
        for name in ("top_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.top_k is not None and self.top_k > 0:  # vLLM's -1 and 0 both mean off
            out["top_k"] = self.top_k
        if self.ignore_eos:
            out["min_tokens"] = self.limit()  # the end token is suppressed for every token asked for
        if self.stop is not None:
            out["stop_words"] = self.stop_words()
        return out

    def seed_of(self, choice: int) -> int | None:
        """Choice i is seeded seed + i (the engine's own rule for num_return_sequences)."""
        return None if self.seed is None else (self.seed + choice) % UINT64


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # OpenAI fields that cannot change what this server does; accepted and ignored.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # OpenAI fields the pipeline cannot honour: refused unless they ask for nothing.
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None

    # The server's --default-max-tokens (parse() sets it): chat has no documented default.
    _default_max_tokens: int = PrivateAttr(default=256)

    def limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or self._default_max_tokens

    def limit_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def validate(self) -> None:
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise bad_request("max_completion_tokens", f"differs from max_tokens ({self.max_tokens}); send one of them")
        refused = {
            "tools": bool(self.tools),
            "tool_choice": self.tool_choice not in (None, "none", "auto"),
            "functions": bool(self.functions),
            "function_call": self.function_call not in (None, "none", "auto"),
            "response_format": self.response_format not in (None, {"type": "text"}),
            "audio": self.audio is not None,
            "modalities": self.modalities not in (None, ["text"]),
            "prediction": self.prediction is not None,
            "web_search_options": self.web_search_options is not None,
        }
        for name, asked in refused.items():
            if asked:
                raise bad_request(name, "is not supported by this server (it generates plain text)",
                                  code="unsupported_parameter")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs", "needs logprobs to be true")
        if self.top_logprobs:
            raise bad_request("top_logprobs", "must be 0: the engine returns the log probability of the chosen "
                              "token only, not of alternatives", code="unsupported_value")
        super().validate()

    @property
    def wants_logprobs(self) -> bool:
        return bool(self.logprobs)

    def conversation(self) -> list[dict[str, str]]:
        """The ``messages`` input: roles and text ("developer" is OpenAI's newer name for "system")."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)

    def limit(self) -> int:
        return self.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)  # type: ignore[arg-type]

    def validate(self) -> None:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not prompts:
            raise bad_request("prompt", "must not be an empty list")
        if not all(isinstance(p, str) for p in prompts):
            raise bad_request("prompt", "token ids are not supported: the pipeline takes text; send strings",
                              code="unsupported_value")
        if len(prompts) * self.choices_per_prompt > MAX_CHOICES:
            raise bad_request("prompt", f"{len(prompts)} prompts x n={self.choices_per_prompt} is more than "
                              f"{MAX_CHOICES} sequences in one request")
        if self.suffix:
            raise bad_request("suffix", "is not supported by this server (no fill-in-the-middle)",
                              code="unsupported_parameter")
        if self.best_of is not None and self.best_of != self.choices_per_prompt:
            raise bad_request("best_of", f"must equal n ({self.choices_per_prompt}): the server returns every "
                              "sequence it generates", code="unsupported_value")
        if self.logprobs is not None and self.echo:
            raise bad_request("logprobs", "cannot be combined with echo: the engine gives no log probabilities "
                              "for the prompt", code="unsupported_value")
        if self.logprobs:
            raise bad_request("logprobs", "must be 0: the engine returns the log probability of the chosen "
                              "token only, not of alternatives", code="unsupported_value")
        super().validate()

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None


@dataclass(frozen=True)
class Target:
    """Which pipeline model and version a request's ``model`` names."""

    model: str
    version: str  # "" = unpinned: the highest version loaded

    @property
    def id(self) -> str:
        return f"{self.model}:{self.version}" if self.version else self.model


def resolve_model(name: str, served: str) -> Target:
    """``served`` (unpinned) or ``served:N`` (version N); anything else is a 404."""
    model, sep, version = name.partition(":")
    if model == served and (not sep or (version.isdigit() and int(version) > 0)):
        return Target(served, str(int(version)) if sep else "")
    raise APIError(404, f"The model '{name}' does not exist: this server serves '{served}' and its versions "
                   f"as '{served}:N' (GET /v1/models lists them)", param="model", code="model_not_found")
