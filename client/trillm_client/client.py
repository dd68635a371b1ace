"""The blocking client: :class:`Client` and its :class:`TextStream`."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

from tqdm import tqdm
from tritonclient.utils import InferenceServerException

from trillm_client.completion import Completion, CompletionBuilder, ModelInfo, StreamProgress
from trillm_client.errors import (
    InvalidInputError,
    ModelNotFoundError,
    ModelNotReadyError,
    RequestTimeoutError,
    TrillmError,
    UnavailableError,
    classify,
)
from trillm_client.params import Prompt, Request, build_request
from trillm_client.transport import GrpcTransport, HttpTransport

PROTOCOLS = ("grpc", "http")
DEFAULT_URLS = {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000"}
T = TypeVar("T")


def check_target(protocol: str, model: str, version: str | int | None) -> str:
    """Validates the constructor arguments shared by Client and AsyncClient; returns the version as str."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if not model:
        raise ValueError("model must be a non-empty model name")
    version = "" if version is None else str(version)
    if version and not version.isdigit():
        raise ValueError(f"version must be a positive integer, got {version!r}")
    return version


def stream_request(prompt: Prompt, max_tokens: int, sampling: dict[str, Any], validate: bool) -> Request:
    """The request of ``stream()``: server streaming on unless the caller says otherwise."""
    request = build_request(prompt, max_tokens, sampling, stream=True, validate=validate)
    if request.num_return_sequences > 1:
        raise InvalidInputError(
            "stream() yields the text of one sequence; use generate() for num_return_sequences > 1"
        )
    return request


def control_error(exc: BaseException) -> TrillmError:
    """A failure of a health / metadata / repository call as a typed error."""
    if isinstance(exc, TrillmError):
        return exc
    if isinstance(exc, InferenceServerException):
        status, message = str(exc.status() or ""), exc.message() or str(exc)
        if status.isdigit():
            return classify(message, http_status=int(status))
        return classify(message, grpc_code=status or None)
    if isinstance(exc, TimeoutError) or "timeout" in type(exc).__name__.lower():
        return RequestTimeoutError(f"the server did not answer in time: {exc!r}")
    if isinstance(exc, OSError):
        return UnavailableError(f"cannot reach the server: {exc!r}")
    return TrillmError(f"unexpected failure talking to the server: {exc!r}")


def model_infos(index: Any) -> list[ModelInfo]:
    """The repository index of either protocol (gRPC JSON or HTTP list) as ModelInfo objects."""
    entries = index.get("models", []) if isinstance(index, dict) else index
    return [
        ModelInfo(
            name=str(entry.get("name", "")),
            version=str(entry.get("version", "")),
            state=str(entry.get("state", "")),
            reason=str(entry.get("reason", "")),
        )
        for entry in entries
    ]


def not_ready_error(model: str, version: str, waited: float, infos: list[ModelInfo]) -> TrillmError:
    """Why ``model`` is not ready after ``waited`` seconds, from the repository index."""
    label = f"model '{model}'" + (f" version {version}" if version else "")
    mine = [i for i in infos if i.name == model and (not version or i.version == version)]
    if not mine:
        return ModelNotFoundError(f"{label} is not in the server's model repository")
    states = "; ".join(f"version {i.version or '?'}: {i.state or 'unknown'} {i.reason}".strip() for i in mine)
    return ModelNotReadyError(f"{label} not ready after {waited:.1f}s ({states})")


class TextStream(StreamProgress, Iterator[str]):
    """The text of a streamed request, delta by delta, as it arrives.

    Iterate it for the text deltas (``str``, never empty). Afterwards:
    ``completion`` (the whole :class:`Completion`), ``ttft`` (seconds from
    sending to the first non-empty delta), ``token_times`` (seconds from
    sending to the arrival of each response that carried text) and ``itl``
    (the gaps between them). Closing it before the end (``close()``, leaving a
    ``with`` block, garbage collection) cancels the request on the server.
    """

    def __init__(self, call: Iterator[Any], builder: CompletionBuilder, started: float) -> None:
        super().__init__(builder, started)
        self._call = call

    def __next__(self) -> str:
        while self.completion is None:
            try:
                response = next(self._call)
            except StopIteration:
                tail = self._finish()
                if tail:
                    return tail
                break
            delta = self._take(response)
            if delta:
                return delta
        raise StopIteration

    def text(self) -> str:
        """Reads the rest of the stream; returns the whole text."""
        for _ in self:
            pass
        assert self.completion is not None
        return self.completion.text

    def close(self) -> None:
        """Cancels the request if it is still running (no-op after the end)."""
        self._call.close()  # type: ignore[attr-defined]

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Target:
    """What a client talks to (server, protocol, model, version) and its transport;
    shared by :class:`Client` and :class:`trillm_client.AsyncClient`, which name
    their transport classes (gRPC, HTTP) in ``_transports``."""

    _transports: tuple[type, type]

    def __init__(
        self,
        url: str | None = None,
        protocol: str = "grpc",
        model: str = "ensemble",
        version: str | int | None = None,
        timeout: float | None = 60.0,
        validate: bool = True,
    ) -> None:
        self.version = check_target(protocol, model, version)
        self.protocol = protocol
        self.url = url or DEFAULT_URLS[protocol]
        self.model = model
        self.timeout = timeout
        self.validate = validate
        grpc_transport, http_transport = self._transports
        self._grpc = grpc_transport(self.url, timeout) if protocol == "grpc" else None
        self._http = http_transport(self.url, timeout) if protocol == "http" else None
        self._control_client: Any = None


class Client(_Target):
    """A blocking client of a trillm (or TensorRT-LLM backend) Triton server.

    ``url`` is ``host:port`` (default ``127.0.0.1:8001`` for gRPC,
    ``127.0.0.1:8000`` for HTTP); ``version`` pins a model version (default:
    the server's choice); ``timeout`` is the longest wait, in seconds, for
    each response (for a non-streamed request, the whole generation; ``None``
    waits forever). ``validate=False`` skips the client-side range checks of
    inputs (types are still checked), so the server's own checks can be
    exercised. Safe to share between threads. Use as a context manager, or
    call :meth:`close`.

    A prompt is text (sent as ``text_input``) or a chat: a list of
    ``{"role": ..., "content": ...}`` messages, sent as the ``messages`` input
    and rendered by the server with the model's own chat template
    (:class:`trillm_client.chat.Conversation` keeps one).

    Sampling keyword arguments are the input names of the TensorRT-LLM
    backend (``trillm_client.params.PARAMETERS``): ``temperature``, ``top_k``,
    ``top_p``, ``seed``, ``stop_words``, ``return_log_probs``... A ``None``
    value means "not sent" (the server's default applies).
    """

    _transports = (GrpcTransport, HttpTransport)

    # -- generation ----------------------------------------------------------
    def _open(self, request: Request) -> Iterator[Any]:
        if self._grpc is not None:
            return self._grpc.open(self.model, self.version, request)
        assert self._http is not None
        # HTTP generate takes exactly one response: several sequences need generate_stream.
        sse = request.stream or request.num_return_sequences > 1
        return self._http.open(self.model, self.version, request, sse=sse)

    def generate(self, prompt: Prompt, max_tokens: int, **sampling: Any) -> Completion:
        """Generates up to ``max_tokens`` tokens after ``prompt`` (text or a chat); returns the
        whole :class:`Completion`.

        Raises :class:`InvalidInputError` for a bad argument (before sending)
        or an input the server rejects, and the other :mod:`trillm_client.errors`.
        """
        request = build_request(prompt, max_tokens, sampling, stream=False, validate=self.validate)
        started = time.perf_counter()
        call = self._open(request)
        builder = CompletionBuilder(request)
        try:
            for response in call:
                builder.add(response)
        finally:
            call.close()  # type: ignore[attr-defined]
        return builder.build(latency=time.perf_counter() - started)

    def stream(self, prompt: Prompt, max_tokens: int, **sampling: Any) -> TextStream:
        """Sends the request now (server streaming on) and returns its :class:`TextStream`.

        ``with client.stream(...) as s: for delta in s: ...`` cancels the
        request if the block is left early.
        """
        request = stream_request(prompt, max_tokens, sampling, self.validate)
        started = time.perf_counter()
        return TextStream(self._open(request), CompletionBuilder(request), started)

    def generate_many(
        self,
        prompts: Sequence[Prompt],
        max_tokens: int,
        concurrency: int = 8,
        progress: bool = False,
        return_exceptions: bool = False,
        **sampling: Any,
    ) -> list[Any]:
        """:meth:`generate` for every prompt, ``concurrency`` at a time (threads).

        Returns the completions in the order of ``prompts``. Errors: with
        ``return_exceptions=False`` (default) the first :class:`TrillmError`
        is raised once the requests already running have finished, and
        prompts not yet started are not sent; with ``return_exceptions=True``
        a failed prompt's slot holds its :class:`TrillmError` instead of a
        :class:`Completion`. ``progress=True`` shows a tqdm progress bar.
        """
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        # Bad sampling arguments fail every prompt: say so once, before sending anything.
        build_request("", max_tokens, sampling, stream=False, validate=self.validate)
        return _run_all(
            [functools.partial(self.generate, prompt, max_tokens, **sampling) for prompt in prompts],
            concurrency,
            progress,
            return_exceptions,
        )

    # -- server state --------------------------------------------------------
    def _control(self) -> Any:
        if self._control_client is None:
            if self.protocol == "grpc":
                import tritonclient.grpc as triton
            else:
                import tritonclient.http as triton  # type: ignore[no-redef]
            seconds = self.timeout or 60.0
            kwargs = {} if self.protocol == "grpc" else {"connection_timeout": seconds, "network_timeout": seconds}
            self._control_client = triton.InferenceServerClient(self.url, **kwargs)
        return self._control_client

    def _ask(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self.protocol == "grpc" and self.timeout is not None:
            kwargs["client_timeout"] = self.timeout
        try:
            return getattr(self._control(), method)(*args, **kwargs)
        except BaseException as exc:  # tritonclient's own errors, socket errors, gevent's Timeout
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise control_error(exc) from exc

    def health(self) -> dict[str, Any]:
        """``{"live", "ready", "model", "model_ready"}`` of the server and this client's model.

        Raises :class:`UnavailableError` when the server cannot be reached.
        """
        return {
            "live": bool(self._ask("is_server_live")),
            "ready": bool(self._ask("is_server_ready")),
            "model": self.model,
            "model_ready": bool(self._ask("is_model_ready", self.model, self.version)),
        }

    def models(self) -> list[ModelInfo]:
        """The server's model repository index: every model version and its state."""
        kwargs = {"as_json": True} if self.protocol == "grpc" else {}
        return model_infos(self._ask("get_model_repository_index", **kwargs))

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.25) -> None:
        """Polls until this client's model (and version) is ready.

        Raises :class:`UnavailableError` if the server was never reachable,
        :class:`ModelNotFoundError` if the model is not in its repository, or
        :class:`ModelNotReadyError` if it did not become ready in ``timeout`` seconds.
        """
        started = time.monotonic()
        deadline = started + timeout
        while True:
            try:
                if self._ask("is_model_ready", self.model, self.version):
                    return
            except UnavailableError:
                if time.monotonic() >= deadline:
                    raise
            if time.monotonic() >= deadline:
                break
            time.sleep(interval)
        raise not_ready_error(self.model, self.version, time.monotonic() - started, self.models())

    # -- lifetime ------------------------------------------------------------
    def close(self) -> None:
        """Closes connections; requests still running are cancelled."""
        if self._grpc is not None:
            self._grpc.close()
        if self._control_client is not None:
            self._control_client.close()
            self._control_client = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _run_all(tasks: list[Callable[[], T]], concurrency: int, progress: bool, return_exceptions: bool) -> list[Any]:
    results: list[Any] = [None] * len(tasks)
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="trillm-client")
    try:
        with tqdm(total=len(tasks), disable=not progress, unit="req") as bar:
            futures: dict[Future, int] = {pool.submit(task): i for i, task in enumerate(tasks)}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    bar.update(1)
                    exc = future.exception()
                    if exc is None:
                        results[futures[future]] = future.result()
                    elif return_exceptions and isinstance(exc, TrillmError):
                        results[futures[future]] = exc
                    else:
                        for other in pending:
                            other.cancel()
                        raise exc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results
