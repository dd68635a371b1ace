"""Our SamplingParams as TensorRT-LLM's ``SamplingParams`` (LLM API names).

| ours | TensorRT-LLM | why |
|---|---|---|
| temperature 0 or top_k 1 (greedy) | top_k=1, top_p/temperature unset | top_k 1 with top_p unset is greedy |
| temperature t > 0 | temperature=t | |
| top_k 0 (off) / k | top_k unset / k | |
| top_p 1.0 (off) / p | top_p=p | top_p=1.0 (whole distribution) is what makes it sample at all when top_k is off |
| repetition_penalty 1.0 / r | unset / repetition_penalty=r | unset keeps the runtime's penalty kernels off |
| presence_penalty, frequency_penalty 0.0 / x | unset / x | |
| min_tokens 0 / m | unset / min_tokens=m | |
| seed None / s | seed=<fresh random> / seed=s | TensorRT-LLM's default seed is the same (0) for every request |
| end_id None / e | ignore_eos=True / end_id=e (pad_id=e) | |
| extra_end_ids (a model's other EOS ids) | stop_token_ids | the engine drops a final stop token, included or not |
| bad_token_seqs | bad_token_ids (one-token sequences) + token-id bad words | |
| max_tokens | max_tokens | |
| return_log_probs | logprobs=1 | the chosen token's log-prob is always among them |
| (one sequence per request) | n=1, detokenize=False | the host detokenises and fans out num_return_sequences |
"""

from __future__ import annotations

from typing import Any

from trillm.engine.types import SamplingParams

# Any valid token id: with ignore_eos the runtime receives end_id -1 and never stops on it.
_NO_END_ID = 0


def sampling_kwargs(params: SamplingParams, fallback_seed: int) -> dict[str, Any]:
    """Keyword arguments of ``tensorrt_llm.SamplingParams`` for one request.

    ``fallback_seed`` seeds a request that brought none, so that unseeded
    samples differ. Multi-token bad sequences are not here: see
    :func:`make_sampling_params`.
    """
    kwargs: dict[str, Any] = {
        "max_tokens": params.max_tokens,
        "n": 1,
        "detokenize": False,
        "seed": params.seed if params.seed is not None else fallback_seed,
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
    if params.presence_penalty != 0.0:
        kwargs["presence_penalty"] = params.presence_penalty
    if params.frequency_penalty != 0.0:
        kwargs["frequency_penalty"] = params.frequency_penalty
    if params.min_tokens > 0:
        kwargs["min_tokens"] = params.min_tokens
    if params.end_id is None:
        kwargs.update(end_id=_NO_END_ID, pad_id=_NO_END_ID, ignore_eos=True)
    else:
        kwargs.update(end_id=params.end_id, pad_id=params.end_id)
    if params.extra_end_ids:
        kwargs["stop_token_ids"] = list(params.extra_end_ids)
    single = [seq[0] for seq in params.bad_token_seqs if len(seq) == 1]
    if single:
        kwargs["bad_token_ids"] = single
    if params.return_log_probs:
        kwargs["logprobs"] = 1
    return kwargs


def make_sampling_params(sampling_params_cls: Any, params: SamplingParams, fallback_seed: int) -> Any:
    """A ``tensorrt_llm.SamplingParams`` for one request (raises ValueError when it is refused)."""
    trt_params = sampling_params_cls(**sampling_kwargs(params, fallback_seed))
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
