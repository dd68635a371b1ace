"""The scheduler: which tokens of which sequences the model computes in each step.

Interface (called only from the engine loop thread):

``add(seq)``
    Queue a new sequence (first come, first served).
``schedule() -> list[ScheduledChunk]``
    Plan one step within the token budget. Every returned chunk has its KV
    slots allocated. May preempt running sequences (see below); returns an
    empty list only when nothing is runnable.
``complete(chunks)``
    After a successful forward: mark the chunks' tokens computed and enter
    newly full blocks in the prefix cache.
``finish(seq)``
    Drop a sequence (ended, cancelled or failed) and free its blocks.

Policy, in priority order within a step:

1. Decodes: every running sequence with one token to compute gets it.
2. Prefill chunks of running sequences whose prompt is not done.
3. Admission of waiting sequences, oldest first, while the budget, the
   ``max_num_seqs`` limit and free blocks allow (after prefix-cache hits).

Prompts are cut into chunks that end at multiples of ``prefill_chunk``
(or at the prompt's end), and a chunk runs whole or waits; a prompt is
therefore computed the same way whatever else is running, which keeps each
request's output independent of the batch. When a running sequence needs a
block and none is free, the newest running sequence not yet scheduled in this
step is preempted: its blocks are freed and it returns to the front of the
queue, to be recomputed from its tokens (prompt and output so far) later. No
new sequence is admitted in a step that was short of blocks.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

from trillm.engine.block_manager import BlockManager
from trillm.engine.config import EngineLimits
from trillm.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    """Tokens ``[start, start + num_tokens)`` of ``seq`` computed in this step."""

    seq: Sequence
    start: int
    num_tokens: int

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's last token, so its logits give the next token."""
        return self.end == self.seq.num_tokens


class Scheduler:
    def __init__(self, limits: EngineLimits, block_manager: BlockManager) -> None:
        self.limits = limits
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self._admissions = itertools.count()
        self.num_preemptions = 0
        # Admission keeps this many blocks free for the running sequences to grow into.
        self._watermark = block_manager.num_blocks // 100

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED

    def complete(self, chunks: list[ScheduledChunk]) -> None:
        for chunk in chunks:
            if chunk.seq.status is SequenceStatus.RUNNING:
                chunk.seq.num_computed_tokens = chunk.end
                self.blocks.register_full_blocks(chunk.seq)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.limits.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        scheduled: set[int] = set()
        short_of_blocks = False  # then no sequence is admitted in this step

        for seq in list(self.running):  # 1. decodes, oldest first
            if seq.status is not SequenceStatus.RUNNING or seq.num_tokens - seq.num_computed_tokens != 1:
                continue
            if budget == 0:
                break
            room = self._make_room(seq, seq.num_tokens, scheduled)
            short_of_blocks |= room is not True
            if room is False:
                self._preempt(seq)  # nothing newer left to preempt: it yields itself
                continue
            chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, 1))
            scheduled.add(id(seq))
            budget -= 1

        for seq in list(self.running):  # 2. prompt chunks of admitted sequences
            if seq.status is not SequenceStatus.RUNNING or id(seq) in scheduled:
                continue
            if seq.num_tokens - seq.num_computed_tokens <= 1:
                continue
            end = self._chunk_end(seq, seq.num_computed_tokens)
            if end - seq.num_computed_tokens > budget:
                continue
            room = self._make_room(seq, end, scheduled)
            short_of_blocks |= room is not True
            if room is False:
                continue  # waits for blocks; older sequences are not preempted for a newer one
            chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, end - seq.num_computed_tokens))
            scheduled.add(id(seq))
            budget -= end - seq.num_computed_tokens

        while not short_of_blocks and self.waiting and len(self.running) < self.limits.max_num_seqs:  # 3. admission
            seq = self.waiting[0]
            cached = self.blocks.match_prefix(seq)
            start = len(cached) * self.blocks.block_size
            end = self._chunk_end(seq, start)
            if end - start > budget:
                break
            watermark = self._watermark if self.running else 0
            if self.blocks.admission_cost(cached, end) > self.blocks.num_free_blocks - watermark:
                break
            self.waiting.popleft()
            self.blocks.admit(seq, cached, seq.num_prompt_tokens + seq.params.max_tokens)
            self.blocks.allocate(seq, end)
            seq.status = SequenceStatus.RUNNING
            seq.admitted_at = next(self._admissions)
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, start, end - start))
            scheduled.add(id(seq))
            budget -= end - start
        return chunks

    def _chunk_end(self, seq: Sequence, start: int) -> int:
        step = self.limits.prefill_chunk
        return min(seq.num_tokens, (start // step + 1) * step)

    def _make_room(self, seq: Sequence, num_tokens: int, scheduled: set[int]) -> bool | str:
        """Allocate blocks for ``num_tokens`` slots of ``seq``, preempting newer unscheduled sequences.

        Returns True (allocated, nothing preempted), "preempted" (allocated after
        preempting) or False (not enough blocks even so; nothing allocated).
        """
        need = self.blocks.blocks_for(num_tokens) - len(seq.block_table)
        outcome: bool | str = True
        while need > self.blocks.num_free_blocks:
            victims = [s for s in self.running if s is not seq and id(s) not in scheduled
                       and s.admitted_at > seq.admitted_at]
            if not victims:
                return False
            self._preempt(max(victims, key=lambda s: s.admitted_at))
            outcome = "preempted"
        self.blocks.allocate(seq, num_tokens)
        return outcome

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
