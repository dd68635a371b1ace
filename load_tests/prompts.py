"""Prompts of controlled token lengths, generated locally from a fixed seed.

A prompt is random words. With the served model's tokenizer the words are
vocabulary entries that are one token each (" the", " value"...), so a
prompt of ``n`` tokens is exact: the count is checked by encoding, the way
the server's preprocessing counts it (special tokens such as BOS included).
Without a tokenizer (the Docker load image has none) a built-in word list
stands in at one word per token, an approximation; the server's own
``num_input_tokens`` in ``summary.json`` is the ground truth either way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

# Enough one-token words for varied prompts; scanning a 128k vocabulary stops here.
MAX_WORDS = 2000
_WORD = re.compile(r"^ [A-Za-z]{2,}$")
# Used without a tokenizer: common English words, most of them one token in any modern BPE.
FALLBACK_WORDS = tuple(
    " " + w
    for w in (
        "the of and to in is was for on that with as by at from his it an were are which this be or "
        "has had not first one their its new after but who they have her she two been other when there "
        "all time during into school also year out more can only about world over most city some such "
        "state then where team between what while three under would film before these used same water "
        "system part work may number well both many each than them back through game group found made "
        "known since around later high point power music name line show light model value order place"
    ).split()
)


class PromptTokenizer(Protocol):
    """What prompt generation needs of a tokenizer (``trillm.tokenizer.Tokenizer`` has it)."""

    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(frozen=True)
class LengthDist:
    """A distribution of token counts: ``"128"``, ``"uniform:LO:HI"`` or ``"normal:MEAN:STD"``.

    Samples are integers >= 1 (normal is rounded and clipped at 1; uniform
    includes both ends).
    """

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> LengthDist:
        parts = str(spec).strip().split(":")
        try:
            if len(parts) == 1:
                dist = cls("fixed", int(parts[0]))
            elif len(parts) == 3 and parts[0] == "uniform":
                dist = cls("uniform", int(parts[1]), int(parts[2]))
            elif len(parts) == 3 and parts[0] == "normal":
                dist = cls("normal", float(parts[1]), float(parts[2]))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"token length {spec!r}: expected N, uniform:LO:HI or normal:MEAN:STD (e.g. 128, uniform:32:256)"
            ) from None
        if dist.kind == "fixed" and dist.a < 1:
            raise ValueError(f"token length {spec!r}: must be >= 1")
        if dist.kind == "uniform" and not 1 <= dist.a <= dist.b:
            raise ValueError(f"token length {spec!r}: need 1 <= LO <= HI")
        if dist.kind == "normal" and (dist.a < 1 or dist.b < 0):
            raise ValueError(f"token length {spec!r}: MEAN must be >= 1 and STD >= 0")
        return dist

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            return np.full(n, int(self.a), dtype=np.int64)
        if self.kind == "uniform":
            return rng.integers(int(self.a), int(self.b) + 1, size=n)
        return np.maximum(1, np.rint(rng.normal(self.a, self.b, size=n))).astype(np.int64)

    def __str__(self) -> str:
        if self.kind == "fixed":
            return str(int(self.a))
        if self.kind == "uniform":
            return f"uniform:{int(self.a)}:{int(self.b)}"
        return f"normal:{self.a:g}:{self.b:g}"


@dataclass(frozen=True)
class Prompt:
    text: str
    input_tokens: int  # as the tokenizer counts it (special tokens included); the target without one
    max_tokens: int
    exact: bool  # input_tokens was counted by the model's tokenizer


def load_prompt_tokenizer(path: str | Path | None) -> PromptTokenizer | None:
    """The tokenizer of a checkpoint dir via ``trillm.tokenizer``; None when no path is
    given or trillm is not installed (the Docker load image)."""
    if not path:
        return None
    try:
        from trillm.tokenizer import load_tokenizer
    except ImportError:
        return None
    return load_tokenizer(path)


def one_token_words(tokenizer: PromptTokenizer, limit: int = MAX_WORDS) -> list[str]:
    """Vocabulary entries of the form ``" word"`` that encode back to exactly that one token."""
    words: list[str] = []
    for token_id in range(tokenizer.vocab_size):
        text = tokenizer.decode([token_id], skip_special_tokens=True)
        if _WORD.match(text) and tokenizer.encode(text, add_special_tokens=False) == [token_id]:
            words.append(text)
            if len(words) >= limit:
                break
    return words


class PromptFactory:
    """Builds prompts of a given token count from random words."""

    def __init__(self, tokenizer: PromptTokenizer | None = None) -> None:
        self.tokenizer = tokenizer
        self.words = one_token_words(tokenizer) if tokenizer is not None else list(FALLBACK_WORDS)
        if len(self.words) < 16:
            raise ValueError(f"the tokenizer has only {len(self.words)} one-token words; cannot build prompts")
        # BOS and the like, which the server's preprocessing adds to every prompt.
        self.special = len(tokenizer.encode("", add_special_tokens=True)) if tokenizer is not None else 0

    def count(self, text: str) -> int:
        assert self.tokenizer is not None
        return len(self.tokenizer.encode(text, add_special_tokens=True))

    def make(self, rng: np.random.Generator, input_tokens: int) -> tuple[str, int]:
        """A prompt of ``input_tokens`` tokens (or the closest reachable); returns (text, counted)."""
        body = max(1, input_tokens - self.special)
        picks = list(rng.choice(len(self.words), size=body))
        if self.tokenizer is None:
            return "".join(self.words[i] for i in picks).lstrip(), input_tokens
        text = "".join(self.words[i] for i in picks)
        counted = self.count(text)
        # One-token words add up exactly in byte-level BPE; other tokenizers may merge
        # across word boundaries, so trim or extend a few times towards the target.
        for _ in range(8):
            if counted == input_tokens:
                break
            if counted > input_tokens and len(picks) > 1:
                picks.pop()
            elif counted < input_tokens:
                picks.append(int(rng.integers(len(self.words))))
            else:
                break
            text = "".join(self.words[i] for i in picks)
            counted = self.count(text)
        return text, counted


def build_prompts(
    num_prompts: int,
    input_dist: LengthDist,
    output_dist: LengthDist,
    seed: int,
    factory: PromptFactory,
) -> list[Prompt]:
    """``num_prompts`` prompts; the same arguments give the same prompts."""
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    rng = np.random.default_rng(seed)
    inputs = input_dist.sample(rng, num_prompts)
    outputs = output_dist.sample(rng, num_prompts)
    prompts = []
    for n_in, n_out in zip(inputs, outputs, strict=True):
        text, counted = factory.make(rng, int(n_in))
        exact = factory.tokenizer is not None
        prompts.append(Prompt(text=text, input_tokens=counted, max_tokens=int(n_out), exact=exact))
    return prompts
