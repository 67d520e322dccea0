"""Shared arenas across processes: CPU (shared files) here, CUDA IPC on a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ipc.arena import ArenaHandle, SharedArena


def _peer_writes(handle: ArenaHandle, value: float) -> float:
    """In another process: map the arena, read block 1, write block 2."""
    arena = SharedArena.open(handle)
    seen = float(arena.tensor[1].sum())
    arena.tensor[2].fill_(value)
    arena.close()
    return seen


def _run_in_process(fn, *args):
    import multiprocess as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, args)


def test_cpu_arena_is_shared_between_processes() -> None:
    arena = SharedArena.create((4, 3, 5), torch.bfloat16, "cpu", "test")
    arena.tensor[1].fill_(2.0)
    seen = _run_in_process(_peer_writes, arena.handle, 7.0)
    assert seen == 2.0 * 15  # the peer saw our write
    assert torch.all(arena.tensor[2] == 7.0) and torch.all(arena.tensor[0] == 0)  # and we see its write
    path = Path(arena.handle.path)
    arena.close()
    assert not path.exists()


def _peer_maps_then_waits(handle: ArenaHandle, mapped, unlinked) -> float:
    """In another process: map the arena, wait until its file is gone, then read and write it."""
    arena = SharedArena.open(handle)
    mapped.set()
    assert unlinked.wait(60)
    seen = float(arena.tensor[1].sum())
    arena.tensor[2].fill_(5.0)
    return seen


def test_cpu_arena_file_can_go_once_mapped() -> None:
    """What EPD does once every stage has mapped the arenas: the file is unlinked (nothing can be
    left in /dev/shm), and both sides keep sharing the memory through their mappings."""
    import multiprocess as mp

    from ipc.arena import _OWNED_FILES, unlink

    arena = SharedArena.create((4, 3, 5), torch.float32, "cpu", "unlinked")
    path = Path(arena.handle.path)
    assert str(path) in _OWNED_FILES  # a stage dying from its parent's death removes these
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(1) as pool:
        mapped, unlinked = manager.Event(), manager.Event()
        result = pool.apply_async(_peer_maps_then_waits, (arena.handle, mapped, unlinked))
        assert mapped.wait(60)
        unlink(arena.handle)
        assert not path.exists() and str(path) not in _OWNED_FILES
        arena.tensor[1].fill_(3.0)
        unlinked.set()
        assert result.get(timeout=60) == 3.0 * 15
    assert torch.all(arena.tensor[2] == 5.0)
    arena.close()


def test_open_after_owner_closed_fails_clearly() -> None:
    arena = SharedArena.create((2, 2), torch.float32, "cpu", "gone")
    handle = arena.handle
    arena.close()
    with pytest.raises(FileNotFoundError, match="is gone"):
        SharedArena.open(handle)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_arena_is_shared_between_processes() -> None:
    pytest.importorskip("epd_kernels._epd_C")
    torch.empty(12345, device="cuda")  # so the arena is not at the start of its segment
    arena = SharedArena.create((4, 3, 5), torch.bfloat16, "cuda", "test")
    arena.tensor[1].fill_(2.0)
    torch.cuda.synchronize()
    seen = _run_in_process(_peer_writes, arena.handle, 7.0)
    assert seen == 2.0 * 15
    assert torch.all(arena.tensor[2] == 7.0) and torch.all(arena.tensor[0] == 0)
