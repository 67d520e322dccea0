"""Which encoders have work in hand, and on which device: a row of int32 slots in shared memory.

The EPD orchestrator creates the board (a /dev/shm file, as a CPU SharedArena) and passes its
handle in every stage's spec. Encoder i writes slot i only (one writer per slot: no locks, no
atomics): 0 when it has nothing it can run, else its device's code. A prefill on the same device
reads the row before each batch and, while an encoder there is busy, waits (engine/roles/prefill.py,
`encode_first`). Without MPS a GPU time-slices between processes: an encoder's short batches
(preprocessing, the tower: a few ms) would otherwise wait behind a long prefill's slices, and
every request's prefill waits for its images' encodes anyway. Encoders past the board's
SLOTS publish nothing (their prefills do not wait for them).
"""

from __future__ import annotations

import torch

from ipc.arena import ArenaHandle, SharedArena

SLOTS = 64


def device_code(device: torch.device | str) -> int:
    """A device as a nonzero int: 1 for the CPU, 2 + N for cuda:N."""
    device = torch.device(device)
    if device.type == "cpu":
        return 1
    return 2 + (device.index if device.index is not None else torch.cuda.current_device())


class BusyBoard:
    """`create()` in the orchestrator, `open(handle)` in stages; `set(slot, device, busy)` by the
    slot's one encoder, `busy_on(device)` by anyone."""

    def __init__(self, shared: SharedArena) -> None:
        self.shared = shared
        self._row = shared.tensor.numpy()  # the mapped file itself: writes are seen by every process

    @classmethod
    def create(cls) -> BusyBoard:
        return cls(SharedArena.create((SLOTS,), torch.int32, "cpu", "busy"))

    @classmethod
    def open(cls, handle: ArenaHandle) -> BusyBoard:
        return cls(SharedArena.open(handle))

    @property
    def handle(self) -> ArenaHandle:
        return self.shared.handle

    def set(self, slot: int, device: torch.device | str, busy: bool) -> None:
        if 0 <= slot < SLOTS:
            self._row[slot] = device_code(device) if busy else 0

    def busy_on(self, device: torch.device | str) -> bool:
        return bool((self._row == device_code(device)).any())

    def close(self) -> None:
        self._row = None
        self.shared.close()
