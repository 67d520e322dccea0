"""Block allocators for the paged arenas: free list + reference counts, exact accounting."""

from __future__ import annotations

from collections import deque


class BlockManager:
    """Hands out block ids in [0, num_blocks). `allocate` returns None when it cannot."""

    def __init__(self, num_blocks: int, first: int = 0) -> None:
        """Ids [first, first + num_blocks): first > 0 when the arena is shared with another
        stage that owns the ids below (EPD prefill and decode on one GPU)."""
        if num_blocks < 0:  # 0: a stage without this arena (an encoder has no KV cache)
            raise ValueError(f"num_blocks = {num_blocks}; must be >= 0")
        self.num_blocks, self.first = num_blocks, first
        self._free: deque[int] = deque(range(first, first + num_blocks))
        self._refs = [0] * num_blocks

    def rebase(self, first: int) -> None:
        """Move this (untouched) pool to ids [first, first + num_blocks)."""
        if self.num_free != self.num_blocks:
            raise RuntimeError("rebase: blocks are allocated")
        self.__init__(self.num_blocks, first)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._refs[b - self.first] = 1
        return blocks

    def _index(self, b: int) -> int:
        if not self.first <= b < self.first + self.num_blocks:
            raise ValueError(f"block {b} is not in this pool [{self.first}, {self.first + self.num_blocks})")
        return b - self.first

    def refs(self, block: int) -> int:
        """References held on one block (0: free)."""
        return self._refs[self._index(block)]

    def share(self, blocks: list[int]) -> None:
        """Add a reference to blocks already held (e.g. a second reader)."""
        for b in blocks:
            i = self._index(b)
            assert self._refs[i] > 0, f"block {b} is not allocated"
            self._refs[i] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks reaching zero return to the free list."""
        for b in blocks:
            i = self._index(b)
            assert self._refs[i] > 0, f"block {b} freed twice"
            self._refs[i] -= 1
            if self._refs[i] == 0:
                self._free.append(b)
