"""ipc/linked_arena.py: blocks of an arena read over a PeerLink (gloo on the CPU), as a stage on
another host will read KV blocks and image embeddings: the bytes arrive right, in the reader's
order, the server ends when the reader closes, and a dead owner fails the read within the
link's timeout instead of hanging."""

from __future__ import annotations

import time

import pytest
import torch

from ipc.linked_arena import ArenaServer, LinkedArena, LinkSpec
from ipc.peer_link import free_port

SHAPE = (12, 2, 3, 4)  # 12 blocks; a block is [2, 3, 4] (KV-like: layers x ... )


def _arena(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Every element names its block and position: a wrong block or order shows."""
    n = torch.tensor(SHAPE).prod().item()
    return (torch.arange(n, dtype=torch.float64) * 0.5).view(SHAPE).to(dtype)


def test_pull_and_read_in_the_readers_order() -> None:
    arena = _arena(torch.bfloat16)
    spec = LinkSpec("127.0.0.1", free_port(), timeout_s=30)
    server = ArenaServer(arena, spec, "kv-prefill0").start()
    reader = LinkedArena(spec, arena.shape, arena.dtype)
    src, dst_ids = [3, 0, 7, 7, 11], [1, 2, 5, 6, 0]
    dst = torch.zeros(8, *SHAPE[1:], dtype=arena.dtype)
    moved = reader.pull(src, dst, dst_ids)
    assert moved == len(src) * arena[0].numel() * arena.element_size()
    for s, d in zip(src, dst_ids):
        assert torch.equal(dst[d], arena[s])
    assert torch.equal(dst[[3, 4, 7]], torch.zeros(3, *SHAPE[1:], dtype=arena.dtype)), "only dst_ids are written"
    assert torch.equal(reader.read([5]), arena[5:6])
    assert reader.read([]).shape == (0, *SHAPE[1:])  # no round trip
    reader.close()
    server.join(10)
    assert not server.alive and server.served_blocks == len(src) + 1 and server.error is None


def test_reader_checks_before_it_sends() -> None:
    reader = LinkedArena(LinkSpec("127.0.0.1", free_port()), SHAPE, torch.float32)
    with pytest.raises(ValueError, match=r"blocks \[12, -1\] outside the arena's 12 blocks"):
        reader.read([1, 12, -1])
    with pytest.raises(ValueError, match="2 source blocks but 1 destination"):
        reader.pull([0, 1], torch.zeros(4, *SHAPE[1:]), [0])
    with pytest.raises(ValueError, match="block shapes differ"):
        reader.pull([0], torch.zeros(4, 2, 3, 5), [0])
    with pytest.raises(ValueError, match="backend 'nccl' needs a GPU arena"):
        LinkedArena(LinkSpec("127.0.0.1", 1, backend="nccl"), SHAPE, torch.float32, "cpu")
    assert reader._link is None, "nothing was connected"


def _owner(port: int, serve_reads: int, conn) -> None:
    """A stage on 'another host': serves its arena, then dies after `serve_reads` reads."""
    from ipc.linked_arena import ArenaServer, LinkSpec
    from tests.test_linked_arena import _arena

    server = ArenaServer(_arena(), LinkSpec("127.0.0.1", port, timeout_s=30), "mm-encode0").start()
    conn.send("serving")
    while server.served_blocks < serve_reads and server.alive:
        time.sleep(0.01)
    conn.send(server.served_blocks)
    import os

    os._exit(0)  # killed: no goodbye on the link


def test_a_dead_owner_fails_the_read_not_hangs() -> None:
    import multiprocess as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    port = free_port()
    proc = ctx.Process(target=_owner, args=(port, 2, child))
    proc.start()
    try:
        assert parent.poll(60) and parent.recv() == "serving"
        reader = LinkedArena(LinkSpec("127.0.0.1", port, timeout_s=5), SHAPE, torch.float32)
        assert torch.equal(reader.read([4, 9]), _arena()[[4, 9]])  # across processes
        assert parent.poll(30) and parent.recv() == 2
        proc.join(30)
        start = time.monotonic()
        with pytest.raises(RuntimeError):
            reader.read([1])
        assert time.monotonic() - start < 30, "bounded by the link's timeout"
        reader.close()  # the owner is gone: closing still returns
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
