"""Every field of our SamplingParams maps to the right TensorRT-LLM SamplingParams argument."""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass

import pytest
import torch

import fake_tensorrt_llm as fake
from trillm.engine.types import SamplingParams
from trillm.triton.errors import InputError
from trillm.trtllm.sampling import HoldBackEndIds, make_sampling_params

pytestmark = pytest.mark.unit

SEED = 1234  # the fallback seed the engine would draw
PROMPT_LEN = 6


def trt(params: SamplingParams, cls=fake.SamplingParams) -> fake.SamplingParams:
    return make_sampling_params(cls, params, PROMPT_LEN, SEED)


def snapshot(trt_params: fake.SamplingParams) -> dict:
    values = {f.name: getattr(trt_params, f.name) for f in dataclasses.fields(trt_params)}
    values["bad_words"] = trt_params._get_bad_words()
    return values


def test_greedy_is_top_k_1_without_temperature_or_top_p():
    p = trt(SamplingParams(max_tokens=5, end_id=2))
    assert (p.top_k, p.top_p, p.temperature) == (1, None, None)
    assert (p.max_tokens, p.n, p.end_id, p.pad_id, p.ignore_eos, p.detokenize) == (5, 1, 2, 2, False, False)
    assert p.seed == SEED
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty, p.prompt_ignore_length) == (None,) * 4
    assert p.logprobs is None and p._get_bad_words() == [] and p.logits_processor is None


def test_min_tokens_0_is_sent_since_unset_means_1_there():
    # TensorRT-LLM's default min_tokens is 1: end_id could never be the first token, as it can on the torch engine.
    assert trt(SamplingParams(max_tokens=5, end_id=2)).min_tokens == 0


def test_top_k_1_is_greedy_even_with_a_temperature():
    p = trt(SamplingParams(max_tokens=5, temperature=0.7, top_k=1))
    assert (p.top_k, p.top_p, p.temperature) == (1, None, None)


def test_every_sampling_field_is_passed():
    p = trt(SamplingParams(
        max_tokens=7, temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.2, presence_penalty=0.5,
        frequency_penalty=0.25, min_tokens=3, seed=42, end_id=2, bad_token_seqs=[[7], [8, 9]],
        return_log_probs=True,
    ))
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p) == (7, 0.7, 40, 0.9)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.2, 0.5, 0.25)
    assert (p.min_tokens, p.seed, p.end_id, p.pad_id, p.ignore_eos) == (3, 42, 2, 2, False)
    assert p.bad_token_ids == [7]
    assert p._get_bad_words() == [[7], [8, 9]]  # what the runtime is given
    assert p.logprobs == 1
    assert (p.n, p.use_beam_search, p.detokenize) == (1, False, False)
    p._check_sampling_config()  # and the runtime takes it


def test_sampling_without_top_k_or_top_p_samples_the_whole_distribution():
    # TensorRT-LLM decodes greedily when neither top_k nor top_p is set; top_p=1.0 keeps it sampling.
    p = trt(SamplingParams(max_tokens=5, temperature=1.0))
    assert (p.top_k, p.top_p, p.temperature) == (None, 1.0, 1.0)


def test_no_end_id_never_stops_on_a_token():
    p = trt(SamplingParams(max_tokens=5, end_id=None))
    assert p.ignore_eos is True
    assert p.end_id is not None  # the LLM API needs one when it has no tokenizer


def test_extra_end_ids_become_stop_token_ids():
    assert trt(SamplingParams(max_tokens=5, end_id=2, extra_end_ids=(7, 9))).stop_token_ids == [7, 9]
    assert trt(SamplingParams(max_tokens=5, end_id=2)).stop_token_ids is None


def test_seeds_are_kept_as_uint64():
    assert trt(SamplingParams(max_tokens=5, temperature=1.0, seed=0)).seed == 0
    # Sequence i of a request is seeded seed + i, which may pass the runtime's uint64.
    assert trt(SamplingParams(max_tokens=5, temperature=1.0, seed=2**64 + 3)).seed == 3


# -- presence and frequency penalties: output tokens only, as on the torch engine ---------------------------------
@pytest.mark.parametrize("name", ["presence_penalty", "frequency_penalty"])
def test_penalties_skip_the_prompt(name):
    p = trt(SamplingParams(max_tokens=5, temperature=1.0, **{name: 0.5}))
    assert (getattr(p, name), p.prompt_ignore_length) == (0.5, PROMPT_LEN)


@pytest.mark.parametrize("name", ["presence_penalty", "frequency_penalty"])
def test_before_1_2_a_penalty_that_would_count_the_prompt_is_refused_naming_it(name):
    params = SamplingParams(max_tokens=5, temperature=1.0, **{name: -0.25})
    with pytest.raises(InputError, match="counts the prompt's tokens") as info:
        trt(params, cls=fake.SamplingParamsBefore12)
    assert info.value.input_name == name and "TensorRT-LLM 1.2" in info.value.rule


def test_before_1_2_requests_without_those_penalties_are_unchanged():
    params = SamplingParams(max_tokens=5, temperature=1.0, repetition_penalty=1.3, end_id=2)
    old, new = trt(params, cls=fake.SamplingParamsBefore12), trt(params)
    assert snapshot(old) == {k: v for k, v in snapshot(new).items() if k != "prompt_ignore_length"}


# -- min_tokens holds back every end id -------------------------------------------------------------------------
def test_min_tokens_with_extra_end_ids_installs_a_logits_processor():
    p = trt(SamplingParams(max_tokens=5, end_id=2, extra_end_ids=(7, 9), min_tokens=3))
    assert p.logits_processor == HoldBackEndIds((7, 9), PROMPT_LEN, 3)
    assert pickle.loads(pickle.dumps(p)).logits_processor == p.logits_processor  # it travels to a worker process
    assert trt(SamplingParams(max_tokens=5, end_id=2, extra_end_ids=(7, 9))).logits_processor is None
    assert trt(SamplingParams(max_tokens=5, end_id=2, min_tokens=3)).logits_processor is None  # min_tokens does it


@pytest.mark.parametrize("generated,masked", [(0, True), (2, True), (3, False), (10, False)])
def test_the_logits_processor_masks_the_extra_end_ids_until_min_tokens(generated, masked):
    hold = HoldBackEndIds((7, 9), prompt_len=4, min_tokens=3)
    logits = torch.zeros(1, 1, 16)
    hold(1, logits, [[5] * (4 + generated)], None, 1)
    assert torch.isinf(logits[..., [7, 9]]).all().item() is masked
    logits[..., [7, 9]] = 0.0
    assert not torch.isinf(logits).any()  # nothing else is touched


# One non-default value per field of our SamplingParams. A field added to the
# contract without a mapping makes this table (and the test) fail.
CHANGED = {
    "max_tokens": 9,
    "temperature": 0.8,
    "top_k": 5,
    "top_p": 0.5,
    "repetition_penalty": 1.3,
    "presence_penalty": 0.4,
    "frequency_penalty": 0.3,
    "min_tokens": 2,
    "seed": 11,
    "end_id": 3,
    "extra_end_ids": (7,),
    "bad_token_seqs": [[4, 5]],
    "return_log_probs": True,
}


def test_the_table_covers_every_field():
    assert set(CHANGED) == {f.name for f in dataclasses.fields(SamplingParams)}


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_each_field_changes_what_tensorrt_llm_gets(name):
    base = SamplingParams(max_tokens=4, temperature=1.0)  # sampling, so top_k/top_p/temperature matter
    changed = dataclasses.replace(base, **{name: CHANGED[name]})
    assert snapshot(trt(changed)) != snapshot(trt(base))


def test_multi_token_bad_words_need_token_id_bad_words():
    @dataclass(slots=True, kw_only=True)
    class WithoutTokenIdBadWords:
        max_tokens: int = 32
        n: int = 1
        detokenize: bool = True
        seed: int | None = None
        min_tokens: int | None = None
        top_k: int | None = None
        end_id: int | None = None
        pad_id: int | None = None
        ignore_eos: bool = False
        bad: object = None

    params = SamplingParams(max_tokens=4, bad_token_seqs=[[1, 2]])
    with pytest.raises(ValueError, match="multi-token sequence"):
        make_sampling_params(WithoutTokenIdBadWords, params, PROMPT_LEN, SEED)
