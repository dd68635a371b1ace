"""One typed parser for the ``parameters`` of a model's config.pbtxt.

Each model declares a dataclass of its parameters; :func:`parse_parameters`
builds it once in ``initialize``. An unknown key, a malformed value or a
missing required parameter fails the model load with a message naming it.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, TypeVar

from trillm.triton.errors import ConfigError

T = TypeVar("T")

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


def parse_parameters(model_config: dict | str, cls: type[T]) -> T:
    """Build ``cls`` (a dataclass) from a Triton model config's parameters."""
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
