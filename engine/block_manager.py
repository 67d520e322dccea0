"""Block allocators for the paged arenas: free list + reference counts, exact accounting."""

from __future__ import annotations

from collections import deque


class BlockManager:
    """Hands out block ids in [0, num_blocks). `allocate` returns None when it cannot."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks = {num_blocks}; need at least 1")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks

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
            self._refs[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        """Add a reference to blocks already held (e.g. a second reader)."""
        for b in blocks:
            assert self._refs[b] > 0, f"block {b} is not allocated"
            self._refs[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks reaching zero return to the free list."""
        for b in blocks:
            assert self._refs[b] > 0, f"block {b} freed twice"
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)
