"""Paged KV blocks for the full-attention layers: a free list with all-or-nothing allocation and reference counts
(a block of a cached prompt prefix is held by the prefix cache and by every request reading it)."""
from collections import deque


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one KV block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = deque(range(num_blocks))
        self._refs = [0] * num_blocks  # references: requests' and the prefix cache's
        self._cache_refs = [0] * num_blocks  # of which the prefix cache's
        self.num_in_requests = 0  # blocks some request references (the rest of the used ones: cached prefixes only)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, num_tokens: int, have: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - have)

    def allocate(self, n: int) -> list[int] | None:
        """n free block ids (one reference each, a request's), or None (nothing taken) when fewer are free."""
        if n > len(self._free):
            return None
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
        self.num_in_requests += n
        return blocks

    def share(self, blocks: list[int], cache: bool = False) -> None:
        """One more reference on each of these (held) blocks: a request's, or the prefix cache's (cache=True)."""
        for b in blocks:
            if self._refs[b] < 1:
                raise RuntimeError(f"KV block {b} shared while free")
            self._count(b, +1, cache)

    def free(self, blocks: list[int], cache: bool = False) -> None:
        """Drop one reference (a request's, or the prefix cache's) on each block; a block with none left goes back to
        the free list."""
        for b in blocks:
            if self._refs[b] - (0 if cache else self._cache_refs[b]) < 1 or (cache and self._cache_refs[b] < 1):
                raise RuntimeError(f"KV block {b} freed twice")
            self._count(b, -1, cache)
            if self._refs[b] == 0:
                self._free.append(b)

    def held_only_by_cache(self, b: int, refs: int) -> bool:
        """Whether these `refs` prefix-cache references are all that hold block b."""
        return self._refs[b] == refs

    def _count(self, b: int, delta: int, cache: bool) -> None:
        was = self._refs[b] > self._cache_refs[b]
        self._refs[b] += delta
        if cache:
            self._cache_refs[b] += delta
        self.num_in_requests += (self._refs[b] > self._cache_refs[b]) - was
