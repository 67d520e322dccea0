"""The shared byte arena (ipc/byte_arena.py): first-fit allocation with merging, exact
accounting, a reader in another process seeing the owner's bytes, a full arena refusing."""

from __future__ import annotations

import random

import multiprocess as mp
import pytest

from ipc.byte_arena import ALIGN, ByteArena, ByteRef


def _read_in_child(handle, refs, out) -> None:
    arena = ByteArena.open(handle)
    out.put([arena.read(r) for r in refs])
    arena.close()


def test_put_read_free_accounting_and_merging() -> None:
    arena = ByteArena.create(16 * ALIGN)
    try:
        a = arena.put(b"a" * 10)
        b = arena.put(b"b" * (2 * ALIGN))
        c = arena.put(b"c" * (ALIGN + 1))
        assert (a.offset, b.offset, c.offset) == (0, ALIGN, 3 * ALIGN)
        assert arena.bytes_used == 5 * ALIGN and arena.bytes_free == 11 * ALIGN
        assert arena.read(b) == b"b" * (2 * ALIGN) and arena.read(c) == b"c" * (ALIGN + 1)
        arena.free(b)  # a hole between a and c
        with pytest.raises(ValueError, match="not a live span"):
            arena.free(b)
        assert arena.put(b"d" * (3 * ALIGN)).offset == 5 * ALIGN  # does not fit the hole: after c
        assert arena.put(b"e" * ALIGN).offset == ALIGN  # first fit: the hole
        for ref in (a, c):
            arena.free(ref)
        assert arena.put(b"x" * (16 * ALIGN)) is None  # e and d still hold 4 blocks
    finally:
        arena.close()


def test_random_puts_and_frees_never_overlap_and_all_merge_back() -> None:
    rng = random.Random(0)
    arena = ByteArena.create(1 << 16)
    live: dict[ByteRef, bytes] = {}
    try:
        for step in range(2000):
            if live and (rng.random() < 0.45 or arena.bytes_free < 4096):
                ref = rng.choice(list(live))
                assert arena.read(ref) == live.pop(ref)  # nothing overwrote it
                arena.free(ref)
            else:
                data = bytes([step % 251]) * rng.randint(1, 3000)
                ref = arena.put(data)
                if ref is not None:
                    live[ref] = data
            assert arena.bytes_used + arena.bytes_free == arena.capacity
        for ref in list(live):
            arena.free(ref)
        assert arena._free == [(0, arena.capacity)]  # merged back into one span
    finally:
        arena.close()


def test_a_reader_process_sees_the_bytes() -> None:
    arena = ByteArena.create(1 << 20)
    try:
        refs = [arena.put(bytes(range(256)) * k) for k in (1, 7, 100)]
        out = mp.get_context("spawn").Queue()
        child = mp.get_context("spawn").Process(target=_read_in_child, args=(arena.handle, refs, out))
        child.start()
        got = out.get(timeout=60)
        child.join(60)
        assert child.exitcode == 0 and got == [bytes(range(256)) * k for k in (1, 7, 100)]
    finally:
        arena.close()


def test_only_the_owner_allocates_and_refs_are_checked() -> None:
    arena = ByteArena.create(4 * ALIGN)
    try:
        reader = ByteArena.open(arena.handle)
        with pytest.raises(RuntimeError, match="owner"):
            reader.put(b"x")
        with pytest.raises(ValueError, match="outside"):
            reader.read(ByteRef(3 * ALIGN, 2 * ALIGN))
        reader.close()
        assert arena.put(b"") is None
        with pytest.raises(ValueError, match="capacity"):
            ByteArena.create(8)
    finally:
        arena.close()


def test_held_spans_are_freed_when_every_reader_has_answered_or_died() -> None:
    from collections import Counter

    arena = ByteArena.create(1024)
    try:
        a, b, c = arena.put(bytes(100)), arena.put(bytes(100)), arena.put(bytes(100))
        arena.hold(1, [a, b], Counter({"encode0": 2, "encode1": 1}))  # a request ended with 3 tasks out
        arena.hold(2, [c], Counter())  # none out: freed at once
        assert arena.held == 1 and arena.bytes_used == 256
        arena.answered(1, "encode0")
        arena.answered(1, "prefill0")  # not one of its readers: changes nothing
        arena.answered(7, "encode0")  # not held: changes nothing
        assert arena.held == 1 and arena.bytes_used == 256
        arena.answered(1, "encode0")
        arena.reader_gone("encode1")  # died: it answers for nothing
        assert arena.held == 0 and arena.bytes_used == 0 and arena.bytes_free == 1024
    finally:
        arena.close()
