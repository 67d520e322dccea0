"""A shared-memory byte arena: how image bytes reach the encoder processes without being
pickled through a pipe. The EPD orchestrator creates it (a file in /dev/shm, as the CPU
SharedArena), writes each image's encoded bytes once, and sends only a `ByteRef` (offset,
length) in the task; the stage that decodes the image maps the arena once (its handle travels in
the stage's spec) and reads the bytes in place. The orchestrator frees a span when the stage has
answered for the image (encoded or failed), so a span is never rewritten while a reader may still
look at it: a request that ends while a stage still holds its task has its spans held (`hold`)
until every such stage has answered (`answered`) or died (`reader_gone`), so readers need no check
that the bytes are still theirs. Allocation is the orchestrator's alone: first fit over a free
list kept sorted by offset, neighbours merged on free. A full arena refuses (`put` returns None)
and the caller sends the bytes in the message instead: nothing waits and nothing fails for want
of space.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from ipc.arena import ArenaHandle, SharedArena

ALIGN = 64


@dataclass(frozen=True)
class ByteRef:
    """Where one image's bytes are in the arena."""

    offset: int
    length: int


class ByteArena:
    """`create(capacity)` in the owner (it allocates and writes), `open(handle)` in readers."""

    def __init__(self, shared: SharedArena) -> None:
        self.shared = shared
        self.capacity = shared.tensor.numel()
        self._view = memoryview(shared.tensor.numpy()).cast("B")
        self._free: list[tuple[int, int]] = [(0, self.capacity)] if shared.owner else []  # (offset, size), sorted
        self._spans: dict[int, int] = {}  # offset -> size of each live span
        self._held: dict[Hashable, tuple[list[ByteRef], Counter]] = {}  # owner -> (spans, answers awaited per reader)

    @classmethod
    def create(cls, capacity: int, name: str = "images") -> ByteArena:
        if capacity < ALIGN:
            raise ValueError(f"capacity = {capacity} bytes; must be >= {ALIGN}")
        return cls(SharedArena.create((capacity,), torch.uint8, "cpu", name))

    @classmethod
    def open(cls, handle: ArenaHandle) -> ByteArena:
        return cls(SharedArena.open(handle))

    @property
    def handle(self) -> ArenaHandle:
        return self.shared.handle

    @property
    def bytes_free(self) -> int:
        return sum(size for _, size in self._free)

    @property
    def bytes_used(self) -> int:
        return sum(self._spans.values())

    def put(self, data: bytes | bytearray | memoryview) -> ByteRef | None:
        """Copy data into a free span; None when no span is large enough (or data is empty)."""
        n = len(data)
        size = -(-n // ALIGN) * ALIGN
        if not self.shared.owner:
            raise RuntimeError("only the arena's owner allocates")
        for i, (offset, free) in enumerate(self._free):
            if free >= size > 0:
                if free == size:
                    del self._free[i]
                else:
                    self._free[i] = (offset + size, free - size)
                self._spans[offset] = size
                self._view[offset : offset + n] = data
                return ByteRef(offset, n)
        return None

    def read(self, ref: ByteRef) -> bytes:
        """A copy of the bytes at ref (a reader's: the span may be reused once it is freed)."""
        if ref.offset < 0 or ref.length < 0 or ref.offset + ref.length > self.capacity:
            raise ValueError(f"byte ref {ref} is outside the arena's {self.capacity} bytes")
        return bytes(self._view[ref.offset : ref.offset + ref.length])

    def free(self, ref: ByteRef) -> None:
        """Return ref's span; merged with free neighbours."""
        size = self._spans.pop(ref.offset, None)
        if size is None:
            raise ValueError(f"byte ref {ref} is not a live span (freed twice?)")
        i = bisect.bisect_left(self._free, (ref.offset, 0))
        offset = ref.offset
        if i < len(self._free) and offset + size == self._free[i][0]:  # merge with the next
            size += self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:  # with the previous
            offset, size = self._free[i - 1][0], self._free[i - 1][1] + size
            self._free[i - 1] = (offset, size)
        else:
            self._free.insert(i, (offset, size))

    def hold(self, owner: Hashable, refs: list[ByteRef], readers: Counter) -> None:
        """Free refs once each reader has answered as many times as counted (at once if none)."""
        if +readers:
            self._held[owner] = (refs, +readers)
            return
        for ref in refs:
            self.free(ref)

    def answered(self, owner: Hashable, reader: Hashable, times: int = 1) -> None:
        """reader answered for `times` of owner's tasks: the last answer frees owner's held spans."""
        held = self._held.get(owner)
        if held is None or held[1][reader] <= 0:
            return
        refs, readers = held
        readers[reader] = max(readers[reader] - times, 0)
        if not +readers:
            del self._held[owner]
            self.hold(owner, refs, Counter())

    def reader_gone(self, reader: Hashable) -> None:
        """reader died: it will answer for nothing it holds."""
        for owner, (_, readers) in list(self._held.items()):
            self.answered(owner, reader, readers[reader])

    @property
    def held(self) -> int:
        """Requests whose spans wait for a reader's answer."""
        return len(self._held)

    def close(self) -> None:
        self._view.release()
        self.shared.close()
