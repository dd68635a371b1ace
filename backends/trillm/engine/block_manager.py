"""KV-cache block accounting: allocation, reference counts and the prefix cache.

The cache is ``num_blocks`` blocks of ``block_size`` token slots. A
sequence's ``block_table`` lists its blocks in token order; slot ``i`` of
the sequence is ``block_table[i // block_size] * block_size + i % block_size``.

Prefix caching: a block that is full and computed is registered under
``hash((parent block's hash, its token ids))``, so a hash names the whole
prefix up to that block. A new sequence whose leading full blocks hash to
registered blocks shares them (reference counted) instead of recomputing.
Blocks whose count drops to zero stay registered, and so reusable, until
they are handed out again (least recently freed first).

Contiguity: attention reads a sequence's K/V as one view when its blocks
are consecutive, and has to gather (copy) them otherwise. So a sequence is
given, when it is admitted, a run of free blocks long enough for its whole
life (prompt + max_tokens) when one exists; the run's unused tail is only
*reserved* for it: still free, taken by others only when nothing else is.
"""

from __future__ import annotations

from collections import OrderedDict

from trillm.engine.sequence import Sequence

# Per-block state in ``_state``, a bytearray so that free runs are found in C.
_USED, _FREE, _CACHED, _RESERVED = 0, 1, 2, 3  # _CACHED: free, but holding a prefix-cache entry


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_count = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._tokens: list[tuple[int, ...] | None] = [None] * num_blocks  # to rule out hash collisions
        self._by_hash: dict[int, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # LRU first
        self._reserved: dict[int, int] = {}  # block -> id() of the sequence it is kept for
        self._reservations: dict[int, list[int]] = {}  # id() of a sequence -> its reserved blocks, ascending
        self._state = bytearray([_FREE]) * num_blocks
        self.prefix_cache_hit_blocks = 0  # cumulative, for stats

    # ---- queries -------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free, cached-but-unused, or only reserved)."""
        return len(self._free) + len(self._reserved)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Registered blocks holding ``seq``'s leading full blocks (no side effects).

        The last prompt token is never taken from the cache: its logits are needed.
        """
        if not self.enable_prefix_caching:
            return []
        blocks: list[int] = []
        parent: int | None = None
        bs = self.block_size
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            block = self._by_hash.get(hash((parent, tokens)))
            if block is None or self._tokens[block] != tokens:
                break
            blocks.append(block)
            parent = self._hash[block]
        return blocks

    def admission_cost(self, cached: list[int], num_tokens: int) -> int:
        """Free blocks consumed by admitting a sequence with ``cached`` prefix blocks and ``num_tokens`` slots."""
        revived = sum(1 for b in cached if self._ref_count[b] == 0)
        return revived + max(0, self.blocks_for(num_tokens) - len(cached))

    # ---- changes -------------------------------------------------------------

    def admit(self, seq: Sequence, cached: list[int], lifetime_tokens: int) -> None:
        """Give ``seq`` its cached prefix blocks and reserve a run for the rest of its life."""
        for block in cached:
            if self._ref_count[block] == 0:
                self._take(block)
            self._ref_count[block] += 1
        self.prefix_cache_hit_blocks += len(cached)
        seq.block_table = list(cached)
        seq.block_hashes = [self._hash[b] for b in cached]
        seq.num_computed_tokens = len(cached) * self.block_size
        self._reserve_run(seq, self.blocks_for(lifetime_tokens) - len(cached))

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow ``seq.block_table`` to hold ``num_tokens`` slots. The caller has checked num_free_blocks."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need > self.num_free_blocks:
            raise RuntimeError(f"KV cache: {need} blocks needed, {self.num_free_blocks} free")
        for _ in range(need):
            block = self._next_block(seq)
            self._take(block)
            self._evict(block)
            self._ref_count[block] = 1
            seq.block_table.append(block)

    def register_full_blocks(self, seq: Sequence) -> None:
        """Enter the newly computed full blocks of ``seq`` in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = hash((parent, tokens))
            block = seq.block_table[i]
            seq.block_hashes.append(h)
            if h in self._by_hash or self._hash[block] is not None:
                continue  # computed twice concurrently: the first copy stays the cached one
            self._hash[block] = h
            self._tokens[block] = tokens
            self._by_hash[h] = block

    def free(self, seq: Sequence) -> None:
        """Release ``seq``'s blocks and reservations; its cached blocks stay reusable."""
        for block in reversed(seq.block_table):  # the tail is evicted before the shared prefix
            self._ref_count[block] -= 1
            if self._ref_count[block] == 0:
                self._free[block] = None
                self._state[block] = _FREE if self._hash[block] is None else _CACHED
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
        self._release_reservation(seq)

    # ---- internals -----------------------------------------------------------

    def _reserve_run(self, seq: Sequence, num_blocks: int) -> None:
        """Reserve the first run of ``num_blocks`` free, uncached blocks, if there is one."""
        if num_blocks <= 0:
            return
        start = self._state.find(bytes([_FREE]) * num_blocks)
        if start < 0:
            return
        blocks = list(range(start, start + num_blocks))
        for block in blocks:
            del self._free[block]
            self._reserved[block] = id(seq)
            self._state[block] = _RESERVED
        self._reservations[id(seq)] = blocks

    def _release_reservation(self, seq: Sequence) -> None:
        for block in self._reservations.pop(id(seq), []):
            if self._reserved.get(block) == id(seq):
                del self._reserved[block]
                self._free[block] = None
                self._state[block] = _FREE

    def _next_block(self, seq: Sequence) -> int:
        """The block ``seq`` should grow into: the next of its run, else the least recently freed."""
        if seq.block_table:
            after = seq.block_table[-1] + 1
            if after < self.num_blocks and (
                self._reserved.get(after) == id(seq) or self._state[after] == _FREE
            ):
                return after
        for block in self._reservations.get(id(seq), []):
            if self._reserved.get(block) == id(seq):
                return block
        if self._free:
            return next(iter(self._free))
        return next(iter(self._reserved))  # memory is tight: take another sequence's reservation

    def _take(self, block: int) -> None:
        """Remove ``block`` from the free pools (its prefix-cache entry, if any, stays)."""
        if self._reserved.pop(block, None) is None:
            del self._free[block]
        self._state[block] = _USED

    def _evict(self, block: int) -> None:
        """Forget ``block``'s prefix-cache entry: it is about to be overwritten."""
        h = self._hash[block]
        if h is not None:
            if self._by_hash.get(h) == block:
                del self._by_hash[h]
            self._hash[block] = None
            self._tokens[block] = None
