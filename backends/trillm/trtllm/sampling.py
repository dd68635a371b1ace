"""Our SamplingParams as TensorRT-LLM's ``SamplingParams`` (LLM API names).

| ours | TensorRT-LLM | why |
|---|---|---|
| temperature 0 or top_k 1 (greedy) | top_k=1, top_p/temperature unset | top_k 1 with top_p unset is greedy |
| temperature t > 0 | temperature=t | |
| top_k 0 (off) / k | top_k unset / k | |
| top_p 1.0 (off) / p | top_p=p | top_p=1.0 (whole distribution) is what makes it sample at all when top_k is off |
| repetition_penalty 1.0 / r | unset / repetition_penalty=r | unset keeps the runtime's penalty kernels off; both engines count prompt and output |
| presence_penalty, frequency_penalty 0.0 / x | unset / x, prompt_ignore_length=len(prompt) | TensorRT-LLM counts the prompt unless told to skip it; we count the output only (before 1.2, which has no prompt_ignore_length, a non-zero value is refused) |
| min_tokens m | min_tokens=m (0 too) | unset means 1 there: end_id could never be the first token |
| seed None / s | seed=<fresh random> / seed=s mod 2^64 | TensorRT-LLM's default seed is the same (0) for every request; its seeds are uint64 |
| end_id None / e | ignore_eos=True / end_id=e (pad_id=e) | |
| extra_end_ids (a model's other EOS ids) | stop_token_ids, and a logits processor masking them before min_tokens | the engine drops a final stop token, included or not; its min_tokens holds back end_id only |
| bad_token_seqs | bad_token_ids (one-token sequences) + token-id bad words | |
| max_tokens | max_tokens | |
| return_log_probs | logprobs=1 | the chosen token's log-prob is always among them |
| (one sequence per request) | n=1, detokenize=False | the host detokenises and fans out num_return_sequences |
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from typing import Any

from trillm.engine.types import SamplingParams
from trillm.triton.errors import InputError

# Any valid token id: with ignore_eos the runtime receives end_id -1 and never stops on it.
_NO_END_ID = 0
_SEED_MODULUS = 2**64


@dataclass(frozen=True)
class HoldBackEndIds:
    """A TensorRT-LLM logits processor: the extra end ids cannot be chosen before ``min_tokens`` tokens.

    TensorRT-LLM's own min_tokens masks end_id only; the stop_token_ids that
    carry a model's other EOS ids would still end the request early. The
    runtime calls this before sampling each token, with the request's tokens
    so far (prompt included) and its CUDA stream. A module-level class, so
    that the request pickles to an executor worker process.
    """

    token_ids: tuple[int, ...]
    prompt_len: int
    min_tokens: int

    def __call__(self, req_id: int, logits: Any, token_ids: list[list[int]], stream_ptr: int | None,
                 client_id: int | None) -> None:
        if len(token_ids[0]) - self.prompt_len >= self.min_tokens:
            return
        import torch  # only the runtime's process calls this, where torch is there

        stream = contextlib.nullcontext() if stream_ptr is None else torch.cuda.stream(
            torch.cuda.ExternalStream(stream_ptr))
        with stream:
            logits[..., list(self.token_ids)] = float("-inf")


def sampling_kwargs(params: SamplingParams, prompt_len: int, fallback_seed: int,
                    penalties_skip_prompt: bool) -> dict[str, Any]:
    """Keyword arguments of ``tensorrt_llm.SamplingParams`` for one request.

    ``fallback_seed`` seeds a request that brought none, so that unseeded
    samples differ. ``penalties_skip_prompt``: whether this TensorRT-LLM has
    ``prompt_ignore_length`` (without it, non-zero presence and frequency
    penalties are refused with InputError). Multi-token bad sequences are not
    here: see :func:`make_sampling_params`.
    """
    kwargs: dict[str, Any] = {
        "max_tokens": params.max_tokens,
        "n": 1,
        "detokenize": False,
        "seed": (params.seed if params.seed is not None else fallback_seed) % _SEED_MODULUS,
        "min_tokens": params.min_tokens,
    }
    if params.greedy:
        kwargs["top_k"] = 1
    else:
        kwargs["temperature"] = params.temperature
        kwargs["top_p"] = params.top_p
        if params.top_k > 0:
            kwargs["top_k"] = params.top_k
    if params.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = params.repetition_penalty
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(params, name)
        if value == 0.0:
            continue
        if not penalties_skip_prompt:
            raise InputError(name, (
                "must be 0 on this server: its TensorRT-LLM (before 1.2, without prompt_ignore_length) counts "
                "the prompt's tokens in presence and frequency penalties, where trillm counts generated tokens "
                "only; send 0, or serve with TensorRT-LLM 1.2 or engine_kind 'torch'"
            ))
        kwargs[name] = value
        kwargs["prompt_ignore_length"] = prompt_len
    if params.end_id is None:
        kwargs.update(end_id=_NO_END_ID, pad_id=_NO_END_ID, ignore_eos=True)
    else:
        kwargs.update(end_id=params.end_id, pad_id=params.end_id)
    if params.extra_end_ids:
        kwargs["stop_token_ids"] = list(params.extra_end_ids)
        if params.min_tokens > 0:
            kwargs["logits_processor"] = HoldBackEndIds(tuple(params.extra_end_ids), prompt_len, params.min_tokens)
    single = [seq[0] for seq in params.bad_token_seqs if len(seq) == 1]
    if single:
        kwargs["bad_token_ids"] = single
    if params.return_log_probs:
        kwargs["logprobs"] = 1
    return kwargs


@functools.lru_cache(maxsize=None)
def skips_prompt_in_penalties(sampling_params_cls: Any) -> bool:
    """Whether this TensorRT-LLM's SamplingParams takes ``prompt_ignore_length`` (1.2 and newer)."""
    return "prompt_ignore_length" in inspect.signature(sampling_params_cls).parameters


def make_sampling_params(sampling_params_cls: Any, params: SamplingParams, prompt_len: int,
                         fallback_seed: int) -> Any:
    """A ``tensorrt_llm.SamplingParams`` for one request of ``prompt_len`` prompt tokens.

    Raises ValueError (InputError for a parameter this TensorRT-LLM cannot honour) when it is refused.
    """
    kwargs = sampling_kwargs(params, prompt_len, fallback_seed, skips_prompt_in_penalties(sampling_params_cls))
    trt_params = sampling_params_cls(**kwargs)
    multi = [list(seq) for seq in params.bad_token_seqs if len(seq) > 1]
    if multi:
        _ban_sequences(trt_params, multi)
    return trt_params


def _ban_sequences(trt_params: Any, sequences: list[list[int]]) -> None:
    """Ban multi-token sequences given as token ids.

    The public API takes multi-token bad words only as strings (``bad``),
    which TensorRT-LLM re-tokenises with its own tokenizer; our host has
    already tokenised them (with and without a leading space). So we fill the
    token-id list that ``bad`` is tokenised into, ``_bad_word_ids``, which
    ``_get_bad_words()`` hands to the runtime; ``bad=[]`` marks it as set.
    ``_setup`` (which would overwrite it) runs only when end_id is None, and
    we always set end_id.
    """
    try:
        trt_params.bad = []
        trt_params._bad_word_ids = sequences
    except AttributeError as exc:
        raise ValueError(
            "this TensorRT-LLM version offers no way to ban a multi-token sequence by token ids "
            f"(SamplingParams._bad_word_ids: {exc}); send single-token bad_words or use engine_kind 'torch'"
        ) from exc
