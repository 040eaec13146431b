"""Bookkeeping for the paged KV cache: which block holds what, who uses it, and which full blocks can be
reused by a later request whose prompt starts the same way. Pure Python — no tensors — so the scheduler
that depends on it is testable with fake tokens.

A block holds `block_size` consecutive tokens of one sequence. A *full* block is identified by the hash of
(its parent block's hash, its token ids), so equal hashes mean equal prefixes up to and including that
block. Blocks whose reference count drops to zero stay in the prefix table, in LRU order, until the space
is needed: a follow-up chat turn or a shared system prompt finds them there.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


class OutOfBlocks(Exception):
    pass


@dataclass
class Block:
    index: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and registered for reuse


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("need at least one block of at least one token")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # never-used or forgotten blocks
        self._cached: dict[int, int] = {}  # prefix hash -> block index (in use or evictable)
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 but still cached, oldest first
        self.hits = 0  # tokens served from the prefix cache, for metrics

    # ---- capacity -------------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks available to allocate now (never used + evictable cached ones)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_in_use(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- allocation -----------------------------------------------------------------------------------

    def allocate(self) -> int:
        if self._free:
            index = self._free.pop()
        elif self._evictable:
            index, _ = self._evictable.popitem(last=False)  # least recently used
            block = self.blocks[index]
            if block.hash is not None:
                del self._cached[block.hash]
                block.hash = None
        else:
            raise OutOfBlocks
        self.blocks[index].ref_count = 1
        return index

    def free(self, indices: Sequence[int]) -> None:
        """Drop one reference to each block; cached full blocks stay reusable until evicted."""
        for index in reversed(indices):  # tail blocks first, so they are evicted before their prefixes
            block = self.blocks[index]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {index} freed twice"
            if block.ref_count == 0:
                if block.hash is None:
                    self._free.append(index)
                else:
                    self._evictable[index] = None

    # ---- prefix reuse ---------------------------------------------------------------------------------

    @staticmethod
    def chain_hash(parent: int | None, tokens: Sequence[int]) -> int:
        return hash((parent, tuple(tokens)))

    @staticmethod
    def root_hash(adapter_key: int | None) -> int | None:
        """The parent of a sequence's first block: None for the base model; for an adapter, a value of its
        own, so the same tokens under different adapters (whose K/V differ) never share a block."""
        return None if adapter_key is None else hash(("adapter", adapter_key))

    def match_prefix(self, token_ids: Sequence[int], root: int | None = None) -> list[int]:
        """Reference the longest run of cached full blocks that starts `token_ids` (under `root`, see
        `root_hash`); returns their indices.

        Never covers the whole prompt: the last prompt token must be computed to get logits from it."""
        matched: list[int] = []
        parent = root
        usable = (len(token_ids) - 1) // self.block_size
        for b in range(usable):
            h = self.chain_hash(parent, token_ids[b * self.block_size : (b + 1) * self.block_size])
            index = self._cached.get(h)
            if index is None:
                break
            block = self.blocks[index]
            if block.ref_count == 0:
                del self._evictable[index]
            block.ref_count += 1
            matched.append(index)
            parent = h
        self.hits += len(matched) * self.block_size
        return matched

    def register_full(self, index: int, parent_hash: int | None, tokens: Sequence[int]) -> int:
        """Make a just-filled block findable by later requests. Returns its hash (the next block's parent)."""
        h = self.chain_hash(parent_hash, tokens)
        block = self.blocks[index]
        if h in self._cached or block.hash is not None:
            return h  # an identical block is already cached (or this one is): keep the first
        block.hash = h
        self._cached[h] = index
        return h
