"""Choosing each sequence's next token from its logits.

Order of processing, as in ``transformers``: repetition penalty (over prompt
and output), presence/frequency penalties (OpenAI semantics, over the
output), banned tokens (bad token sequences, end_id before min_tokens), then
for sampling: temperature, top-k, top-p, and a draw from the request's own
``torch.Generator``. A row's result depends only on its logits and its
sequence, never on the other rows, so seeded sampling repeats exactly.

Greedy rows whose only processing is banned tokens (plain greedy decoding, and
min_tokens) are handled together.
"""

from __future__ import annotations

import torch

from trillm.engine.sequence import Sequence


class SamplingError(Exception):
    """A request's logits or parameters made sampling impossible."""


def _greedy_with_bans_at_most(seq: Sequence) -> bool:
    """Greedy, and nothing to apply to its logits but banned tokens (bad sequences, end ids
    before min_tokens): such rows are decided together (:func:`sample`)."""
    p = seq.params
    return p.greedy and p.repetition_penalty == 1.0 and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0


def banned_tokens(seq: Sequence) -> list[int]:
    """Tokens that must not come next: bad sequences' last tokens, and end ids before min_tokens."""
    p = seq.params
    banned = []
    if seq.num_output_tokens < p.min_tokens:
        banned.extend(p.end_ids)
    output = seq.output_ids
    for bad in p.bad_token_seqs:
        if not bad:
            continue
        prefix = bad[:-1]
        if not prefix or (len(output) >= len(prefix) and output[len(output) - len(prefix):] == prefix):
            banned.append(bad[-1])
    return banned


def process_logits(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """Penalties and bans applied to one row of logits (a new tensor)."""
    p = seq.params
    logits = logits.clone()
    vocab = logits.shape[0]
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.token_ids)))
        score = logits[seen]
        logits[seen] = torch.where(score < 0, score * p.repetition_penalty, score / p.repetition_penalty)
    if (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0) and seq.num_output_tokens:
        counts = torch.bincount(torch.tensor(seq.output_ids), minlength=vocab).to(logits.dtype)
        logits -= counts * p.frequency_penalty + (counts > 0).to(logits.dtype) * p.presence_penalty
    banned = banned_tokens(seq)
    if banned:
        logits[torch.tensor(banned)] = float("-inf")
    return logits


def sample_one(logits: torch.Tensor, seq: Sequence) -> tuple[int, float]:
    """(token, its log-probability) for one sequence from its row of logits."""
    p = seq.params
    logits = process_logits(logits, seq)
    if p.greedy:
        token = int(logits.argmax())
        return token, float(torch.log_softmax(logits, -1)[token])
    logits = logits / p.temperature
    vocab = logits.shape[0]
    if 0 < p.top_k < vocab:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits)
        remove = sorted_logits.softmax(-1).cumsum(-1) <= 1.0 - p.top_p
        remove[-1] = False
        logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    log_probs = torch.log_softmax(logits, -1)
    probs = log_probs.exp()
    if not bool(torch.isfinite(probs).all()):
        raise SamplingError(f"non-finite probabilities (temperature={p.temperature}, top_p={p.top_p})")
    token = int(torch.multinomial(probs, 1, generator=seq.generator))
    return token, float(log_probs[token])


def _usable_rows(logits: torch.Tensor) -> list[bool]:
    """Per row: some logit is finite and none is NaN. A row whose max is finite is such a row
    (max propagates NaN), so only the rare others are looked at in full: the full test on
    every row cost 3 ms of a 32-row step with SmolLM2's 49152-token vocabulary."""
    usable = torch.isfinite(logits.amax(-1)).tolist()
    for i, ok in enumerate(usable):
        if not ok:
            row = logits[i]
            usable[i] = bool(torch.isfinite(row).any()) and not bool(torch.isnan(row).any())
    return usable


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[tuple[int, float] | Exception]:
    """The next token and its log-probability for each row, or the exception that row raised.

    Greedy rows whose only processing is banned tokens (the common case, and every row of
    a request with ``min_tokens``) are decided together: their rows copied, the banned
    entries set to -inf, one argmax and one log-softmax for all. A row alone takes the same
    path as a row among others, so its result does not depend on the batch.
    """
    results: list[tuple[int, float] | Exception | None] = [None] * len(seqs)
    usable = _usable_rows(logits)
    vocab = logits.shape[-1]
    together, banned_rows, banned_ids = [], [], []
    for i, seq in enumerate(seqs):
        if not usable[i]:
            results[i] = SamplingError("the model produced NaN or no finite logits")
            continue
        banned = banned_tokens(seq) if _greedy_with_bans_at_most(seq) else None
        if banned is not None and all(0 <= t < vocab for t in banned):
            banned_rows.extend([len(together)] * len(banned))
            banned_ids.extend(banned)
            together.append(i)
            continue
        try:  # out-of-range bans raise here, for this request alone
            results[i] = sample_one(logits[i], seq)
        except Exception as e:  # noqa: BLE001 - one request's failure must not stop the others
            results[i] = e
    if together:
        # index_select and max(-1): measured 7x and 2x faster than advanced indexing and
        # argmax(-1) on [32, 49152] (torch 2.13, AMD EPYC); max(-1) also returns the first maximum.
        rows = logits.index_select(0, torch.tensor(together))  # a copy
        if banned_rows:
            rows[torch.tensor(banned_rows), torch.tensor(banned_ids)] = float("-inf")
        tokens = rows.max(-1).indices
        log_probs = torch.log_softmax(rows, -1).gather(1, tokens[:, None])[:, 0]
        for i, token, log_prob in zip(together, tokens.tolist(), log_probs.tolist()):
            results[i] = (token, log_prob)
    return results  # type: ignore[return-value]
