"""Reading request tensors and building responses (pure numpy + pb_utils)."""

from __future__ import annotations

from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from trillm.triton.errors import InputError


def optional_input(request: Any, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def required_input(request: Any, name: str, user_name: str | None = None) -> np.ndarray:
    array = optional_input(request, name)
    if array is None:
        raise InputError(user_name or name, "is required")
    return array


def row_scalar(array: np.ndarray | None, row: int, name: str, default: Any = None) -> Any:
    """The single value of batch row ``row`` of a [B, 1] (or [B]) tensor."""
    if array is None:
        return default
    values = np.asarray(array[row]).reshape(-1)
    if values.size != 1:
        raise InputError(name, f"expected exactly one value per request, got {values.size}")
    value = values[0]
    return value.item() if hasattr(value, "item") else value


def decode_utf8(raw: Any, name: str) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            name, f"must be valid UTF-8 (invalid byte 0x{raw[exc.start]:02x} at byte offset {exc.start})"
        ) from None


def string_list(array: np.ndarray | None, row: int, name: str) -> list[str]:
    """All non-empty strings of batch row ``row`` of a [B, -1] string tensor."""
    if array is None:
        return []
    values = np.asarray(array[row]).reshape(-1)
    return [s for s in (decode_utf8(v, name) for v in values) if s]


def error_response(exc: BaseException) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc)))


def tensor(name: str, value: Any, dtype: Any) -> Any:
    return pb_utils.Tensor(name, np.asarray(value, dtype=dtype))


def to_word_list(word_ids: list[list[int]]) -> np.ndarray:
    """[2, L] word-list format: flattened ids, then cumulative end offsets padded with -1."""
    flat = [t for ids in word_ids for t in ids]
    offsets = np.cumsum([len(ids) for ids in word_ids]).tolist()
    width = max(len(flat), 1)
    out = np.zeros((2, width), dtype=np.int32)
    out[1, :] = -1
    out[0, : len(flat)] = flat
    out[1, : len(offsets)] = offsets
    return out


def from_word_list(array: np.ndarray | None) -> list[list[int]]:
    """Inverse of :func:`to_word_list` for one request's [2, L] (or [1, 2, L]) tensor."""
    if array is None:
        return []
    array = np.asarray(array).reshape(2, -1)
    ids, offsets = array[0].tolist(), array[1].tolist()
    words, start = [], 0
    for end in offsets:
        if end < 0:
            break
        if end > start:
            words.append([int(t) for t in ids[start:end]])
        start = end
    return words


def stack_word_lists(lists: list[np.ndarray]) -> np.ndarray:
    """Batch [2, L_i] word lists into [B, 2, max L], padding ids with 0 and offsets with -1."""
    width = max(a.shape[1] for a in lists)
    out = np.zeros((len(lists), 2, width), dtype=np.int32)
    out[:, 1, :] = -1
    for i, a in enumerate(lists):
        out[i, :, : a.shape[1]] = a
    return out
