"""``preprocessing``: text and word lists in, token ids out (INTERFACE.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import triton_python_backend_utils as pb_utils

from trillm.tokenizer import load_tokenizer
from trillm.triton import io
from trillm.triton import tensors as T
from trillm.triton.errors import ConfigError, InputError
from trillm.triton.params import model_parameters


@dataclass
class PreprocessingParams:
    tokenizer_dir: str
    add_special_tokens: bool = True
    # Longest prompt in tokens; 0 = max_model_len - 1.
    max_input_len: int = 0
    # Prompt + generated tokens; must match the engine's limit.
    max_model_len: int = 2048

    def validate(self) -> None:
        if self.max_model_len < 2:
            raise ConfigError("parameter 'max_model_len': must be >= 2")
        if self.max_input_len < 0 or self.max_input_len >= self.max_model_len:
            raise ConfigError("parameter 'max_input_len': must be in [0, max_model_len)")


@dataclass
class PreprocessedRequest:
    """One prompt of a batch, tokenised and checked against the limits."""

    input_ids: list[int]
    output_len: int
    bad_words: list[list[int]]
    stop_words: list[list[int]]
    end_id: int
    pad_id: int

    def validate(self, max_input_len: int, max_model_len: int, vocab_size: int) -> None:
        if not self.input_ids:
            raise InputError(T.TEXT_INPUT, "must not be empty")
        if len(self.input_ids) > max_input_len:
            raise InputError(
                T.TEXT_INPUT,
                f"prompt is {len(self.input_ids)} tokens, more than the maximum input length {max_input_len}",
            )
        if self.output_len <= 0:
            raise InputError(T.MAX_TOKENS, f"must be > 0, got {self.output_len}")
        if len(self.input_ids) + self.output_len > max_model_len:
            raise InputError(
                T.MAX_TOKENS,
                f"prompt ({len(self.input_ids)} tokens) + max_tokens ({self.output_len}) exceeds "
                f"the context window of {max_model_len} tokens",
            )
        for name, value in ((T.END_ID, self.end_id), (T.PAD_ID, self.pad_id)):
            if not 0 <= value < vocab_size:
                raise InputError(name, f"must be a token id in [0, {vocab_size}), got {value}")


class Preprocessor:
    """Tokenisation and validation, independent of Triton."""

    def __init__(self, params: PreprocessingParams) -> None:
        self.params = params
        self.tokenizer = load_tokenizer(params.tokenizer_dir)
        self.max_input_len = params.max_input_len or params.max_model_len - 1

    def word_ids(self, words: list[str], with_space_variant: bool) -> list[list[int]]:
        """Token sequences of ``words``. A word inside a sentence usually carries
        its leading space in the same token (" world" != "world"), so bad words
        get both spellings to be banned wherever they occur."""
        out: list[list[int]] = []
        for word in words:
            spellings = [word]
            if with_space_variant and not word[:1].isspace():
                spellings.append(" " + word)
            for spelling in spellings:
                ids = self.tokenizer.encode(spelling, add_special_tokens=False)
                if ids and ids not in out:
                    out.append(ids)
        return out

    def process(
        self,
        query: str,
        output_len: int,
        bad_words: list[str],
        stop_words: list[str],
        end_id: int | None,
        pad_id: int | None,
    ) -> PreprocessedRequest:
        if query == "":
            raise InputError(T.TEXT_INPUT, "must not be empty")
        request = PreprocessedRequest(
            input_ids=self.tokenizer.encode(query, add_special_tokens=self.params.add_special_tokens),
            output_len=int(output_len),
            bad_words=self.word_ids(bad_words, with_space_variant=True),
            # Stop words are matched on text by the engine host; ids carry the string.
            stop_words=self.word_ids(stop_words, with_space_variant=False),
            end_id=self.tokenizer.eos_id if end_id is None else int(end_id),
            pad_id=self.tokenizer.pad_id if pad_id is None else int(pad_id),
        )
        request.validate(self.max_input_len, self.params.max_model_len, self.tokenizer.vocab_size)
        return request


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        params = model_parameters(args, PreprocessingParams)
        self.pre = Preprocessor(params)

    def execute(self, requests: list) -> list:
        return [self._execute_one(request) for request in requests]

    def _execute_one(self, request):
        try:
            rows = self._rows(request)
        except InputError as exc:
            return io.error_response(exc)
        ids = np.zeros((len(rows), max(len(r.input_ids) for r in rows)), dtype=np.int32)
        for i, r in enumerate(rows):
            ids[i, : len(r.input_ids)] = r.input_ids
        column = lambda values: np.asarray(values, dtype=np.int32).reshape(-1, 1)  # noqa: E731
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor(T.PRE_OUT_INPUT_ID, ids),
                pb_utils.Tensor(T.PRE_OUT_INPUT_LEN, column([len(r.input_ids) for r in rows])),
                pb_utils.Tensor(T.PRE_OUTPUT_LEN, column([r.output_len for r in rows])),
                pb_utils.Tensor(T.PRE_OUT_BAD_WORDS, io.stack_word_lists([io.to_word_list(r.bad_words) for r in rows])),
                pb_utils.Tensor(T.PRE_OUT_STOP_WORDS, io.stack_word_lists([io.to_word_list(r.stop_words) for r in rows])),
                pb_utils.Tensor(T.PRE_OUT_END_ID, column([r.end_id for r in rows])),
                pb_utils.Tensor(T.PRE_OUT_PAD_ID, column([r.pad_id for r in rows])),
            ]
        )

    def _rows(self, request) -> list[PreprocessedRequest]:
        names = T.PRE_USER_NAMES
        query = io.required_input(request, T.PRE_QUERY, names[T.PRE_QUERY])
        output_len = io.required_input(request, T.PRE_OUTPUT_LEN, names[T.PRE_OUTPUT_LEN])
        bad = io.optional_input(request, T.PRE_BAD_WORDS)
        stop = io.optional_input(request, T.PRE_STOP_WORDS)
        end_id = io.optional_input(request, T.PRE_END_ID)
        pad_id = io.optional_input(request, T.PRE_PAD_ID)
        return [
            self.pre.process(
                query=io.decode_utf8(io.row_scalar(query, i, T.TEXT_INPUT), T.TEXT_INPUT),
                output_len=io.row_scalar(output_len, i, T.MAX_TOKENS),
                bad_words=io.string_list(bad, i, T.BAD_WORDS),
                stop_words=io.string_list(stop, i, T.STOP_WORDS),
                end_id=io.row_scalar(end_id, i, T.END_ID),
                pad_id=io.row_scalar(pad_id, i, T.PAD_ID),
            )
            for i in range(query.shape[0])
        ]
