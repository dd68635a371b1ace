"""Sampling: the sampler's maths against transformers' processors, and its behaviour in the engine."""

from __future__ import annotations

import math

import pytest
import torch

from engine_helpers import greedy, load_hf, prompts, requests, run, run_alone, torch_threads
from trillm.engine.sampler import banned_tokens, process_logits, sample
from trillm.engine.sequence import Sequence
from trillm.engine.types import GenerationRequest, SamplingParams

pytestmark = pytest.mark.engine

VOCAB = 8192


def _seq(prompt, output=(), **params) -> Sequence:
    seq = Sequence.create(GenerationRequest("s", list(prompt), SamplingParams(max_tokens=100, **params)), print)
    for token in output:
        seq.append_token(token, None)
    return seq


# ---- the sampler on its own --------------------------------------------------------------


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 3
    seq = _seq([1, 2, 3, 3], [7, 2, 40], repetition_penalty=1.7)
    ids = torch.tensor([seq.token_ids])
    expected = RepetitionPenaltyLogitsProcessor(1.7)(ids, logits[None].clone())[0]
    assert torch.equal(process_logits(logits, seq), expected)


def test_presence_and_frequency_penalties_count_output_only():
    logits = torch.zeros(10)
    seq = _seq([5, 5, 5], [1, 1, 1, 2], presence_penalty=0.5, frequency_penalty=0.25)
    out = process_logits(logits, seq)
    assert out[1].item() == pytest.approx(-(0.5 + 3 * 0.25))
    assert out[2].item() == pytest.approx(-(0.5 + 0.25))
    assert out[5].item() == 0.0  # in the prompt only: not penalised
    assert out[0].item() == 0.0


def test_min_tokens_masks_end_id_until_reached():
    assert banned_tokens(_seq([1], [4, 4], end_id=9, min_tokens=3)) == [9]
    assert banned_tokens(_seq([1], [4, 4, 4], end_id=9, min_tokens=3)) == []
    assert banned_tokens(_seq([1], [], min_tokens=3)) == []  # no end_id: nothing to mask


def test_min_tokens_masks_every_end_id():
    assert sorted(banned_tokens(_seq([1], [4], end_id=9, extra_end_ids=(11, 12), min_tokens=3))) == [9, 11, 12]
    assert banned_tokens(_seq([1], [4, 4, 4], end_id=9, extra_end_ids=(11,), min_tokens=3)) == []


def test_bad_token_sequences_ban_their_last_token_after_the_prefix():
    bad = [[7], [3, 4], [1, 2, 5]]
    assert sorted(banned_tokens(_seq([0], [9, 3], bad_token_seqs=bad))) == [4, 7]
    assert sorted(banned_tokens(_seq([0], [1, 2], bad_token_seqs=bad))) == [5, 7]
    assert banned_tokens(_seq([0], [2, 1], bad_token_seqs=bad)) == [7]
    assert banned_tokens(_seq([3], [], bad_token_seqs=[[3, 4]])) == []  # the prompt does not count


def test_top_k_and_top_p_keep_the_tokens_transformers_keeps():
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(200, generator=torch.Generator().manual_seed(1)) * 2
    seq = _seq([1], top_k=20, top_p=0.8, temperature=0.7, seed=5)
    expected = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(20)(None, logits[None] / 0.7))[0]
    kept = torch.isfinite(expected)
    draws = {sample(logits[None], [seq])[0][0] for _ in range(300)}
    assert draws <= set(torch.nonzero(kept)[:, 0].tolist())
    assert len(draws) > 1
    token, log_prob = sample(logits[None], [seq])[0]
    assert log_prob == pytest.approx(torch.log_softmax(expected, -1)[token].item(), abs=1e-5)


def test_greedy_log_prob_is_the_model_softmax():
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(2))
    results = sample(logits, [_seq([1]), _seq([1]), _seq([1])])
    for row, (token, log_prob) in zip(logits, results):
        assert token == int(row.argmax())
        assert log_prob == pytest.approx(torch.log_softmax(row, -1)[token].item(), abs=1e-6)


def test_bad_values_fail_their_row_only():
    logits = torch.randn(3, 100)
    logits[1, 5] = float("nan")
    results = sample(logits, [_seq([1], temperature=float("nan"), seed=1), _seq([1]), _seq([1])])
    assert isinstance(results[0], Exception)
    assert isinstance(results[1], Exception)  # NaN logits
    assert results[2][0] == int(logits[2].argmax())
    # No finite logit fails its row; a +inf among finite ones is a usable row (its token wins).
    logits = torch.randn(3, 100)
    logits[0] = float("-inf")
    logits[1, 7] = float("inf")
    results = sample(logits, [_seq([1]), _seq([1]), _seq([1])])
    assert isinstance(results[0], Exception) and results[1][0] == 7 and results[2][0] == int(logits[2].argmax())


def test_greedy_rows_with_bans_are_decided_alike_alone_and_together():
    """Greedy rows with banned tokens (min_tokens, bad words) are decided with the plain greedy
    rows, and each gets what process_logits and argmax give it alone, the same bits alone as
    among others (penalised and sampled rows beside it); an out-of-range ban fails its row only."""
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(3))
    top = [int(row.argmax()) for row in logits]
    seqs = [
        _seq([1], end_id=top[0], min_tokens=4),  # its best token is the end id, banned before min_tokens
        _seq([1], output=[7], bad_token_seqs=[[7, top[1]]]),  # bad word completed by its best token
        _seq([1]),
        _seq([1], repetition_penalty=1.3),
        _seq([1], temperature=0.7, seed=5),
    ]
    together = sample(logits, seqs)
    for i in (0, 1, 2):
        expected = process_logits(logits[i], seqs[i])
        token, log_prob = together[i]
        assert token == int(expected.argmax()), i
        assert log_prob == pytest.approx(torch.log_softmax(expected, -1)[token].item(), abs=1e-6)
        assert sample(logits[i:i + 1], [seqs[i]])[0] == together[i], i
    assert together[0][0] != top[0] and together[1][0] != top[1] and together[2][0] == top[2]
    bad = sample(logits[:2], [_seq([1], bad_token_seqs=[[1000]]), _seq([1])])
    assert isinstance(bad[0], Exception) and bad[1][0] == top[1]


# ---- in the engine -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompt_set():
    return prompts(11, [12, 40, 5, 90], VOCAB)


@pytest.fixture(scope="module")
def greedy_reference(demo_engine, prompt_set):
    return run_alone(demo_engine, requests(prompt_set, greedy(16), prefix="g"))


def test_seeded_sampling_repeats_alone_and_in_a_batch(demo_engine, prompt_set):
    params = [SamplingParams(max_tokens=16, temperature=1.3, top_p=0.95, seed=1234 + i, return_log_probs=True)
              for i in range(len(prompt_set))]
    alone = run_alone(demo_engine, requests(prompt_set, params, prefix="a"))
    batch = run(demo_engine, requests(prompt_set, params, prefix="b"))
    for i in range(len(prompt_set)):
        assert alone[f"a{i}"].tokens == batch[f"b{i}"].tokens
        assert all(lp <= 0 and math.isfinite(lp) for lp in alone[f"a{i}"].log_probs)
    other_seed = SamplingParams(max_tokens=16, temperature=1.3, top_p=0.95, seed=99)
    differs = run(demo_engine, requests(prompt_set[:1], other_seed, prefix="c"))["c0"]
    assert differs.tokens != alone["a0"].tokens


def test_end_id_stops_without_returning_it(demo_engine, prompt_set, greedy_reference):
    expected = greedy_reference["g0"].tokens
    end_id = expected[5]
    first = expected.index(end_id)
    result = run(demo_engine, requests(prompt_set[:1], greedy(16, end_id=end_id), prefix="e"))["e0"]
    assert result.reason.value == "end"
    assert result.tokens == expected[:first]
    assert len(result.log_probs) == first


def test_an_extra_end_id_stops_like_end_id(demo_engine, prompt_set, greedy_reference):
    expected = greedy_reference["g0"].tokens
    stop = expected[4]
    first = expected.index(stop)
    never = next(t for t in range(3, 100) if t not in expected)
    params = greedy(16, end_id=never, extra_end_ids=(stop,))
    result = run(demo_engine, requests(prompt_set[:1], params, prefix="x"))["x0"]
    assert result.reason.value == "end"
    assert result.tokens == expected[:first]


def test_min_tokens_suppresses_end_id(demo_engine, prompt_set, greedy_reference):
    end_id = greedy_reference["g0"].tokens[0]  # the very first greedy token
    result = run(demo_engine, requests(prompt_set[:1], greedy(8, end_id=end_id, min_tokens=4), prefix="m"))["m0"]
    assert end_id not in result.tokens[:4]
    assert len(result.tokens) >= 4
    stopped = run(demo_engine, requests(prompt_set[:1], greedy(8, end_id=end_id), prefix="n"))["n0"]
    assert stopped.tokens == [] and stopped.reason.value == "end"


def test_bad_words_are_never_produced(demo_engine, prompt_set, greedy_reference):
    expected = greedy_reference["g1"].tokens
    bad = [expected[3], expected[4]]  # a two-token word the greedy output contains
    result = run(demo_engine, requests(prompt_set[1:2], greedy(16, bad_token_seqs=[bad]), prefix="w"))["w0"]
    assert result.tokens[:4] == expected[:4]
    assert result.tokens[4] != expected[4]
    pairs = list(zip(result.tokens, result.tokens[1:]))
    assert tuple(bad) not in pairs


def test_repetition_penalty_matches_transformers_generate(demo_engine, demo_checkpoint, prompt_set):
    prompt = prompt_set[2]
    result = run(demo_engine, requests([prompt], greedy(16, repetition_penalty=1.5), prefix="p"))["p0"]
    model = load_hf(demo_checkpoint)
    with torch.no_grad(), torch_threads(1):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, repetition_penalty=1.5)
    assert result.tokens == out[0, len(prompt):].tolist()


def test_presence_and_frequency_penalties_stop_repetition(demo_engine, prompt_set):
    """Long greedy runs of the demo model repeat some tokens; large penalties prevent that."""
    params = [greedy(24), greedy(24, presence_penalty=5.0, frequency_penalty=5.0)]
    results = run(demo_engine, requests([prompt_set[2]] * 2, params, prefix="f"))
    base, penalised = results["f0"].tokens, results["f1"].tokens
    assert len(set(base)) < len(base)
    assert len(set(penalised)) == len(penalised)
    assert penalised[0] == base[0]  # nothing to penalise before the first token
