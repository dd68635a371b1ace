"""One typed parser for the ``parameters`` of a model's config.pbtxt.

Each model declares a dataclass of its parameters; :func:`model_parameters`
builds it once in ``initialize``. An unknown key, a malformed value or a
missing required parameter fails the model load with a message naming it.

``config.pbtxt`` is shared by every version of a model, so what differs
between versions (a checkpoint, a tokenizer, engine limits) lives in the
version directory: ``<model>/<version>/parameters.json``, a JSON object of
parameter names to values, overrides the config's parameters for that
version only. It obeys the same rules.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from trillm.triton.errors import ConfigError

T = TypeVar("T")

VERSION_PARAMETERS = "parameters.json"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(name: str, raw: str, kind: Any) -> Any:
    if kind is bool:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"parameter '{name}': expected a boolean, got {raw!r}")
    if kind in (int, float):
        try:
            return kind(raw.strip())
        except ValueError:
            raise ConfigError(f"parameter '{name}': expected {kind.__name__}, got {raw!r}") from None
    if kind is Path:
        return Path(raw)
    return raw


def version_dir(args: Mapping[str, Any]) -> Path | None:
    """The version directory Triton is loading, from ``initialize``'s args (None outside a server)."""
    if "model_repository" not in args:
        return None
    return Path(args["model_repository"]) / str(args.get("model_version", "1"))


def version_overrides(directory: Path | None) -> dict[str, str]:
    """The parameters a version directory's parameters.json sets ({} without one)."""
    if directory is None:
        return {}
    path = Path(directory) / VERSION_PARAMETERS
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a JSON object of parameter names to values")
    values = {}
    for name, value in raw.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (int, float)):
            value = str(value)
        elif not isinstance(value, str):
            raise ConfigError(f"{path}: parameter '{name}' must be a string, number or boolean, got {value!r}")
        values[name] = value
    return values


def model_parameters(args: Mapping[str, Any], cls: type[T]) -> T:
    """``cls`` from the config's parameters and the loading version's parameters.json."""
    directory = version_dir(args)
    overrides = version_overrides(directory)
    source = os.fspath(directory / VERSION_PARAMETERS) if overrides and directory else ""
    return parse_parameters(args["model_config"], cls, overrides, source)


def parse_parameters(
    model_config: dict | str, cls: type[T], overrides: Mapping[str, str] | None = None, source: str = ""
) -> T:
    """Build ``cls`` (a dataclass) from a Triton model config's parameters.

    ``overrides`` (from ``source``, a version's parameters.json) win over the config's.
    """
    if isinstance(model_config, str):
        model_config = json.loads(model_config)
    raw = {k: v.get("string_value", "") for k, v in (model_config.get("parameters") or {}).items()}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown parameter(s) {unknown} in config.pbtxt of model "
            f"'{model_config.get('name', '?')}'; known: {sorted(fields)}"
        )
    unknown = sorted(set(overrides or {}) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown parameter(s) {unknown} in {source or 'the version overrides'}; known: {sorted(fields)}"
        )
    raw.update(overrides or {})
    values = {}
    for name, field in fields.items():
        if name in raw:
            kind = hints[name]
            if typing.get_origin(kind) is typing.Union:  # Optional[X]
                kind = next(a for a in typing.get_args(kind) if a is not type(None))
            values[name] = _convert(name, raw[name], kind)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(
                f"missing required parameter '{name}' in config.pbtxt of model "
                f"'{model_config.get('name', '?')}'"
            )
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj
