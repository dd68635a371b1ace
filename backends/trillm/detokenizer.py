"""Incremental detokenisation and stop strings: streamed text that is exact.

Decoding each new token on its own loses text. A sentencepiece ("▁") decoder
drops the leading space of whatever it decodes first ("▁world" -> "world"),
and a character whose UTF-8 bytes are split across byte-level tokens decodes
to U+FFFD until its last byte arrives. So, as in vLLM, each step decodes a
short window of ids -- a few ids already rendered (the prefix) then the new
ones -- and keeps what follows the prefix's text::

    delta = decode(window)[len(decode(window[:prefix_len])):]

That formula is :func:`decode_delta`; it is all the stateless
``postprocessing`` model runs. The state lives on the engine host, in one
:class:`TextStream` per generated sequence: it feeds new ids to an
:class:`IncrementalDetokenizer`, holds back text that could still turn into a
stop string (:class:`StopStringMatcher`), and hands out :class:`TextDelta`
objects, each carrying its text *and* the (window_ids, prefix_len) that make
``decode_delta`` render exactly that text (or, for the last delta of a
sequence stopped inside a token, text that starts with it).

Invariant (tested): the streamed deltas concatenate to ``decode(generated)``
for byte-level BPE, and to ``decode(prompt + generated)`` minus
``decode(prompt)`` for sentencepiece-style tokenizers (where a word's space
belongs to its token, so the first generated word keeps its space). One
exception, for sentencepiece byte fallback only: a run of byte tokens that
is *invalid* UTF-8 is rendered one U+FFFD per byte, decided over the whole
run, so a valid byte already streamed (say "A" from <0x41>) is not turned
into U+FFFD afterwards. Byte-level BPE replaces invalid bytes locally and
has no such case.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

# Prompt ids kept as context for the first generated ids (vLLM uses 5 too):
# enough for a decoder to see that a word is not the first of the text.
PROMPT_CONTEXT = 5
_PARTIAL = "\ufffd"  # what an incomplete UTF-8 sequence decodes to, for now


class Decoder(Protocol):
    """What is needed of a tokenizer: trillm.tokenizer.Tokenizer, tokenizers.Tokenizer
    and transformers tokenizers all fit."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(frozen=True)
class TextDelta:
    """New text, and how to render it again from ids:
    ``decode_delta(tokenizer, window_ids, prefix_len)`` gives ``text``."""

    text: str
    window_ids: tuple[int, ...]
    prefix_len: int


def decode_delta(tokenizer: Decoder, window_ids: Sequence[int], prefix_len: int,
                 skip_special_tokens: bool = True) -> str:
    """The text ``window_ids[prefix_len:]`` adds after ``window_ids[:prefix_len]``."""
    window = list(window_ids)
    full = tokenizer.decode(window, skip_special_tokens=skip_special_tokens)
    if prefix_len <= 0:
        return full
    prefix = tokenizer.decode(window[:prefix_len], skip_special_tokens=skip_special_tokens)
    return full[len(prefix):]


class IncrementalDetokenizer:
    """Text of a growing id sequence, a completed piece at a time.

    ``add(ids)`` returns a :class:`TextDelta` once the ids so far end in
    complete text, or None while they do not (the tail is an incomplete
    UTF-8 sequence, or renders as nothing yet). Its window is the ids from
    ``prefix_offset`` (the start of the previous piece) to the end, so a
    sentencepiece decoder sees the word before and keeps the space.
    ``finish()`` flushes what is held back, U+FFFD included.
    """

    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int] | None = None,
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        context = list(prompt_ids or ())[-PROMPT_CONTEXT:]
        if context and self._decode(context).endswith(_PARTIAL):
            context = []  # a prompt cut inside a character is no context for its rest
        self.context_ids: tuple[int, ...] = tuple(context)
        self._ids = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """All text returned so far."""
        return "".join(self._pieces)

    def add(self, token_ids: Iterable[int]) -> TextDelta | None:
        self._ids.extend(token_ids)
        return self._read(final=False)

    def finish(self) -> TextDelta | None:
        return self._read(final=True)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def _read(self, final: bool) -> TextDelta | None:
        if self._read_offset == len(self._ids):
            return None
        window = self._ids[self._prefix_offset:]
        prefix_len = self._read_offset - self._prefix_offset
        prefix = self._decode(window[:prefix_len]) if prefix_len else ""
        full = self._decode(window)
        if not final and (len(full) <= len(prefix) or full.endswith(_PARTIAL)):
            return None
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        delta = TextDelta(full[len(prefix):], tuple(window), prefix_len)
        self._pieces.append(delta.text)
        return delta if delta.text else None


class StopStringMatcher:
    """Finds stop strings in a growing text.

    A stop string *appears* when its last character arrives, so the match is
    the one that ends first (of those ending together, the longest): the
    result does not depend on how the text was chunked. For stops ["abcd",
    "bc"] and text "abcd", "bc" completes first, so the cut is at 1.
    """

    def __init__(self, stop_strings: Iterable[str]) -> None:
        self.stop_strings: tuple[str, ...] = tuple(dict.fromkeys(s for s in stop_strings if s))
        self._longest = max(map(len, self.stop_strings), default=0)

    def find(self, text: str, checked: int = 0) -> int | None:
        """Where the first stop string to appear in ``text`` starts, or None.
        ``checked``: leading characters already searched (no match ends there)."""
        begin = max(0, checked - self._longest + 1)
        best: tuple[int, int] | None = None  # (end, start)
        for stop in self.stop_strings:
            start = text.find(stop, begin)
            if start >= 0 and (best is None or (start + len(stop), start) < best):
                best = (start + len(stop), start)
        return None if best is None else best[1]

    def holdback(self, text: str) -> int:
        """How many trailing characters of ``text`` could begin a stop string."""
        held = 0
        for stop in self.stop_strings:
            for n in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:n]):
                    held = n
                    break
        return held


@dataclass
class _Piece:
    """A delta decoded but not yet emitted; token indices count from the context's start."""

    text: str
    char_start: int  # in the generated text
    window_start: int
    start: int  # first id this piece renders
    end: int


class TextStream:
    """The text of one generated sequence, as the engine host streams it.

    Feed new ids with ``add``; call ``finish`` when generation ends. Both
    return the text that is safe to send now, as a :class:`TextDelta`, or
    None. Text that could still become part of a stop string is held back
    (at token granularity: a delta always starts and, but for the last one,
    ends on a token boundary, so its window renders exactly its text).

    When a stop string appears, ``stopped`` turns True, the returned delta
    is the last one and ends right before the stop string, and later calls
    return None. The text is authoritative: if the stop string starts inside
    a token, the text is cut there, and that token still counts in
    ``num_tokens_kept`` (its leading characters are part of the answer).
    So output ids ``generated[:num_tokens_kept]`` render to text that *starts
    with* ``text``; cutting the rendering to ``len(text)`` characters gives
    ``text`` exactly (the final delta's window renders likewise).
    """

    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int] | None = None,
                 stop_strings: Iterable[str] = (), skip_special_tokens: bool = True) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
        self._matcher = StopStringMatcher(stop_strings)
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(self._detok.context_ids)  # context, then generated ids
        self._text = ""
        self._checked = 0  # characters of _text searched for stop strings
        self._emitted = 0  # characters of _text returned
        self._pending: list[_Piece] = []
        self._kept: int | None = None  # id count (from the context's start) once stopped
        self._done = False
        self.stopped = False

    @property
    def context_ids(self) -> tuple[int, ...]:
        """Prompt ids rendered before the generated ones: the window of the whole
        answer is ``context_ids + generated[:num_tokens_kept]`` with prefix_len
        ``len(context_ids)``."""
        return self._detok.context_ids

    @property
    def text(self) -> str:
        """The generated text decoded so far (possibly not all sent yet); once
        stopped, the final text, without the stop string and what followed."""
        return self._text

    @property
    def num_tokens_kept(self) -> int:
        """Generated ids that make up ``text``: all of them, or once stopped,
        those before the token where the stop string starts (inclusive when it
        starts inside that token)."""
        end = len(self._ids) if self._kept is None else self._kept
        return end - len(self.context_ids)

    def add(self, token_ids: Iterable[int]) -> TextDelta | None:
        if self._done:
            return None
        token_ids = list(token_ids)
        self._ids.extend(token_ids)
        return self._advance(self._detok.add(token_ids), final=False)

    def finish(self) -> TextDelta | None:
        """Generation ended: returns everything not sent yet (held text included)."""
        if self._done:
            return None
        delta = self._advance(self._detok.finish(), final=True)
        self._done = True
        return delta

    def _advance(self, delta: TextDelta | None, final: bool) -> TextDelta | None:
        if delta is not None:
            end = len(self._ids)
            window_start = end - len(delta.window_ids)
            self._pending.append(
                _Piece(delta.text, len(self._text), window_start, window_start + delta.prefix_len, end)
            )
            self._text += delta.text
        stop = self._matcher.find(self._text, self._checked)
        self._checked = len(self._text)
        if stop is not None:
            self.stopped = self._done = True
            self._kept = self._ids_before(stop)
            self._text = self._text[:stop]
            return self._emit(len(self._pending), stop, self._kept)
        if final:
            return self._emit(len(self._pending), len(self._text), len(self._ids))
        safe = len(self._text) - self._matcher.holdback(self._text)
        count = 0
        while count < len(self._pending) and self._pending[count].char_start + len(self._pending[count].text) <= safe:
            count += 1
        if count == 0:
            return None
        last = self._pending[count - 1]
        return self._emit(count, last.char_start + len(last.text), last.end)

    def _emit(self, count: int, char_end: int, id_end: int) -> TextDelta | None:
        """Send the text up to ``char_end``, rendered by the ids up to ``id_end``,
        retiring the first ``count`` pending pieces."""
        if not self._pending:
            return None
        first = self._pending[0]
        text = self._text[self._emitted:char_end]
        window = tuple(self._ids[first.window_start:id_end])
        del self._pending[:count]
        self._emitted = char_end
        return TextDelta(text, window, first.start - first.window_start) if text else None

    def _ids_before(self, char_pos: int) -> int:
        """The fewest ids (from the context's start) whose text covers the
        generated text up to ``char_pos``."""
        piece = next(p for p in self._pending if char_pos < p.char_start + len(p.text))
        need = self._text[piece.char_start:char_pos]
        if not need:
            return piece.start
        for end in range(piece.start + 1, piece.end):
            window = self._ids[piece.window_start:end]
            if decode_delta(self._tokenizer, window, piece.start - piece.window_start, self._skip).startswith(need):
                return end
        return piece.end
