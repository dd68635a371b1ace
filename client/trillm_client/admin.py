"""Model control behind the admin key: repository index, model config, load, unload.

trillm locks model control with tritonserver's restricted APIs
(``--http-restricted-api`` / ``--grpc-restricted-protocol``): the
model-repository endpoints answer only requests that carry the admin key in a
header, ``admin-key`` over HTTP and ``triton-grpc-protocol-admin-key`` over
gRPC (Triton prefixes the gRPC one). Inference stays open.

The key comes from ``TRILLM_ADMIN_KEY`` or from the file that
``TRILLM_ADMIN_KEY_FILE`` names. :class:`AdminKey` never shows it: its
``str()`` and ``repr()`` say where it came from, and no error message here
contains it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trillm_client.client import DEFAULT_URLS, PROTOCOLS, control_error, model_infos
from trillm_client.completion import ModelInfo
from trillm_client.errors import AdminKeyError, TrillmError

ADMIN_KEY_ENV = "TRILLM_ADMIN_KEY"
ADMIN_KEY_FILE_ENV = "TRILLM_ADMIN_KEY_FILE"
HTTP_HEADER = "admin-key"
GRPC_HEADER = "triton-grpc-protocol-" + HTTP_HEADER
MIN_KEY_LENGTH = 16
# Visible ASCII without spaces: safe in a header and in a tritonserver flag.
_KEY_CHARS = re.compile(r"[\x21-\x7e]+")
# What tritonserver answers on a restricted endpoint without the right key,
# and to load/unload when model control is off (--model-control-mode none).
_REFUSED = re.compile(r"is restricted, expecting header", re.IGNORECASE)
_CONTROL_OFF = re.compile(r"load / unload is not allowed", re.IGNORECASE)


class AdminKey:
    """The admin key; ``str()``/``repr()`` name its source, never its value."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str) -> None:
        if not _KEY_CHARS.fullmatch(value or ""):
            raise ValueError(f"the admin key ({source}) must be visible ASCII characters without spaces")
        if len(value) < MIN_KEY_LENGTH:
            raise ValueError(
                f"the admin key ({source}) is shorter than {MIN_KEY_LENGTH} characters; "
                "make one with: python3 -c 'import secrets; print(secrets.token_hex(16))'"
            )
        self._value = value
        self.source = source

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> AdminKey:
        """The key in a file (surrounding whitespace ignored)."""
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ValueError(f"cannot read the admin key file {path}: {exc.strerror or exc}") from None
        return cls(text.strip(), f"file {path}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AdminKey | None:
        """The key from ``TRILLM_ADMIN_KEY`` or ``TRILLM_ADMIN_KEY_FILE``; None when neither is set."""
        env = os.environ if environ is None else environ
        value, path = env.get(ADMIN_KEY_ENV, ""), env.get(ADMIN_KEY_FILE_ENV, "")
        if value and path:
            raise ValueError(f"set {ADMIN_KEY_ENV} or {ADMIN_KEY_FILE_ENV}, not both")
        if path:
            return cls.from_file(path)
        return cls(value, ADMIN_KEY_ENV) if value else None

    def reveal(self) -> str:
        """The key itself: only for a header or tritonserver's command line."""
        return self._value

    def headers(self, protocol: str) -> dict[str, str]:
        return {(GRPC_HEADER if protocol == "grpc" else HTTP_HEADER): self._value}

    def __repr__(self) -> str:
        return f"AdminKey(from {self.source})"

    __str__ = __repr__


def refused_error(message: str, key: AdminKey | None) -> AdminKeyError:
    if key is None:
        hint = f"no admin key was sent: set {ADMIN_KEY_ENV} or {ADMIN_KEY_FILE_ENV}"
    else:
        hint = f"the admin key from {key.source} is not the server's"
    return AdminKeyError(f"model control refused ({hint}); the server said: {message}")


class ModelControl:
    """Triton's model-repository API on one server, every call carrying ``admin_key``.

    ``url`` is ``host:port`` (default ``127.0.0.1:8001`` for gRPC,
    ``127.0.0.1:8000`` for HTTP). Model configs are Triton's JSON form (field
    names as in model_config.proto). Raises :class:`AdminKeyError` when the
    server refuses the key (or its absence), and the other
    :mod:`trillm_client.errors` for the rest.
    """

    def __init__(
        self,
        url: str | None = None,
        protocol: str = "grpc",
        admin_key: AdminKey | None = None,
        timeout: float | None = 120.0,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        self.protocol = protocol
        self.url = url or DEFAULT_URLS[protocol]
        self.admin_key = admin_key
        self.timeout = timeout
        if protocol == "grpc":
            import tritonclient.grpc as triton
        else:
            import tritonclient.http as triton  # type: ignore[no-redef]
        seconds = timeout or 600.0
        kwargs = {} if protocol == "grpc" else {"connection_timeout": seconds, "network_timeout": seconds}
        self._client: Any = triton.InferenceServerClient(self.url, **kwargs)

    def __repr__(self) -> str:
        return f"ModelControl({self.url!r}, protocol={self.protocol!r}, admin_key={self.admin_key!r})"

    def _call(self, method: str, *args: Any, admin: bool = True, **kwargs: Any) -> Any:
        if admin and self.admin_key is not None:
            kwargs["headers"] = self.admin_key.headers(self.protocol)
        if self.protocol == "grpc" and self.timeout is not None:
            kwargs["client_timeout"] = self.timeout
        try:
            return getattr(self._client, method)(*args, **kwargs)
        except BaseException as exc:  # tritonclient's errors, socket errors, gevent's Timeout
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            error = control_error(exc)
            if _REFUSED.search(error.message):
                raise refused_error(error.message, self.admin_key) from None
            if _CONTROL_OFF.search(error.message):
                raise TrillmError(
                    f"model control is off on this server ({error.message}); start it with "
                    "`trillm serve --model-control explicit` (docs/versions.md)", status=error.status,
                ) from None
            raise error from None

    def index(self) -> list[ModelInfo]:
        """Every model and version the server knows, with its state (restricted)."""
        kwargs = {"as_json": True} if self.protocol == "grpc" else {}
        return model_infos(self._call("get_model_repository_index", **kwargs))

    def config(self, model: str) -> dict[str, Any]:
        """The model's configuration as the server holds it (not restricted)."""
        if self.protocol == "grpc":
            return self._call("get_model_config", model, as_json=True, admin=False)["config"]
        return self._call("get_model_config", model, admin=False)

    def load(
        self, model: str, config: Mapping[str, Any] | None = None, files: Mapping[str, bytes] | None = None
    ) -> None:
        """Loads (or reloads) ``model``; ``config`` replaces its config.pbtxt, ``files`` its directory.

        A reload swaps the model without losing availability: the old versions
        serve until the new ones are ready, and finish what they are doing.
        """
        self._call(
            "load_model", model,
            config=None if config is None else json.dumps(config),
            files=None if files is None else dict(files),
        )

    def unload(self, model: str) -> None:
        """Unloads every version of ``model`` once its requests in flight are done (restricted)."""
        self._call("unload_model", model)

    def is_ready(self, model: str, version: int | str = "") -> bool:
        """Whether ``model`` (``version``) is ready for inference (not restricted)."""
        try:
            return bool(self._call("is_model_ready", model, str(version), admin=False))
        except TrillmError:
            return False

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ModelControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
