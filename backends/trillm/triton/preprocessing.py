"""``preprocessing``: text (or a chat) and word lists in, token ids out (INTERFACE.md).

It checks every user-facing input it carries, required ones included (the
configs declare them optional so that a missing one gets our message, on
every transport; see trillm.triton.tensors.PRE_USER_NAMES).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import triton_python_backend_utils as pb_utils

from trillm.chat_template import ChatError, parse_messages, render_prompt
from trillm.tokenizer import load_tokenizer
from trillm.triton import io
from trillm.triton.lifecycle import watch_parent
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
    min_tokens: int
    prompt_input: str = T.TEXT_INPUT  # the input the prompt came from: text_input or messages

    def validate(self, max_input_len: int, max_model_len: int, vocab_size: int) -> None:
        if not self.input_ids:
            raise InputError(self.prompt_input, "must not be empty")
        if len(self.input_ids) > max_input_len:
            raise InputError(
                self.prompt_input,
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

    def prompt_ids(self, text: str | None, messages: str | None) -> tuple[list[int], str]:
        """The prompt's token ids and the input they came from (exactly one of the two is given)."""
        if text is None and messages is None:
            raise InputError(T.TEXT_INPUT, f"is required: give {T.TEXT_INPUT} (a prompt) or {T.MESSAGES} (a chat)")
        if text is not None and messages is not None:
            raise InputError(T.MESSAGES, f"give either {T.TEXT_INPUT} or {T.MESSAGES}, not both")
        if text is not None:
            if text == "":
                raise InputError(T.TEXT_INPUT, "must not be empty")
            return self.tokenizer.encode(text, add_special_tokens=self.params.add_special_tokens), T.TEXT_INPUT
        try:
            prompt = render_prompt(self.tokenizer, parse_messages(messages))
        except ChatError as exc:
            raise InputError(T.MESSAGES, str(exc)) from None
        # The template writes the special tokens it wants (trillm.chat_template).
        return self.tokenizer.encode(prompt, add_special_tokens=False), T.MESSAGES

    def process(
        self,
        text: str | None,
        messages: str | None,
        output_len: int | None,
        bad_words: list[str],
        stop_words: list[str],
        end_id: int | None,
        pad_id: int | None,
        min_tokens: int | None = None,
        min_length: int | None = None,
    ) -> PreprocessedRequest:
        input_ids, prompt_input = self.prompt_ids(text, messages)
        if output_len is None:
            raise InputError(T.MAX_TOKENS, "is required (the number of tokens to generate, > 0)")
        request = PreprocessedRequest(
            input_ids=input_ids,
            output_len=int(output_len),
            bad_words=self.word_ids(bad_words, with_space_variant=True),
            # Stop words are matched on text by the engine host; ids carry the string.
            stop_words=self.word_ids(stop_words, with_space_variant=False),
            end_id=self.tokenizer.eos_id if end_id is None else int(end_id),
            pad_id=self.tokenizer.pad_id if pad_id is None else int(pad_id),
            min_tokens=reconcile_min_tokens(min_tokens, min_length),
            prompt_input=prompt_input,
        )
        request.validate(self.max_input_len, self.params.max_model_len, self.tokenizer.vocab_size)
        return request


def reconcile_min_tokens(min_tokens: int | None, min_length: int | None) -> int:
    """min_tokens, given under its own name or its older one, min_length (0 when neither)."""
    for name, value in ((T.MIN_TOKENS, min_tokens), (T.MIN_LENGTH, min_length)):
        if value is not None and value < 0:
            raise InputError(name, f"must be >= 0, got {value}")
    if min_tokens is not None and min_length is not None and min_tokens != min_length:
        raise InputError(
            T.MIN_LENGTH,
            f"is the older name of {T.MIN_TOKENS}; both were given, with different values "
            f"({T.MIN_TOKENS}={min_tokens}, {T.MIN_LENGTH}={min_length})",
        )
    return next((v for v in (min_tokens, min_length) if v is not None), 0)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        watch_parent()
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
                pb_utils.Tensor(T.PRE_OUT_MIN_TOKENS, column([r.min_tokens for r in rows])),
            ]
        )

    def _rows(self, request) -> list[PreprocessedRequest]:
        inputs = {user: io.optional_input(request, pre) for pre, user in T.PRE_USER_NAMES.items()}
        prompts = [inputs[T.TEXT_INPUT], inputs[T.MESSAGES]]
        # No prompt input at all: one row, which process() rejects naming it.
        batch = next((a.shape[0] for a in prompts if a is not None), 1)

        def text(name: str, row: int) -> str | None:
            raw = io.row_scalar(inputs[name], row, name)
            return None if raw is None else io.decode_utf8(raw, name)

        scalar = lambda name, row: io.row_scalar(inputs[name], row, name)  # noqa: E731
        return [
            self.pre.process(
                text=text(T.TEXT_INPUT, i),
                messages=text(T.MESSAGES, i),
                output_len=scalar(T.MAX_TOKENS, i),
                bad_words=io.string_list(inputs[T.BAD_WORDS], i, T.BAD_WORDS),
                stop_words=io.string_list(inputs[T.STOP_WORDS], i, T.STOP_WORDS),
                end_id=scalar(T.END_ID, i),
                pad_id=scalar(T.PAD_ID, i),
                min_tokens=scalar(T.MIN_TOKENS, i),
                min_length=scalar(T.MIN_LENGTH, i),
            )
            for i in range(batch)
        ]
