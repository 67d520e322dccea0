"""An arena read over a PeerLink: how a stage reads blocks (KV blocks, image embeddings) of a stage
whose memory it cannot map (another host; issue 18, docs/multihost.md).

    owner:  ArenaServer(arena_tensor, LinkSpec(host, port, backend)).start()   # a thread
    reader: reader = LinkedArena.open(LinkedHandle(LinkSpec(...), shape, dtype, owner_device), device)
            reader.pull(src_ids, dst_arena, dst_ids)    # dst[dst_ids] = owner's arena[src_ids]
            reader.read(src_ids) -> [len(src_ids), *block shape] on the reader's device

Two-sided, pull-based, one request at a time per link: the reader sends the block ids, the owner's
server thread gathers those blocks (one contiguous buffer) and sends them back. The owner's role
goes on serving meanwhile: the blocks a reader asks for are ones the owner has finished writing
and will not touch until the reader acknowledges them (as with mapped arenas: FreeKV / FreeMM).
gloo moves CPU tensors (CPU arenas, or GPU arenas staged through the host: the CI path and plain
TCP); nccl moves GPU tensors between GPUs. A link whose peer is gone fails its call within the
link's timeout (an error for that request, not a hang), and the server thread ends.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass

import torch

from ipc.peer_link import PeerLink

log = logging.getLogger(__name__)
STOP = -1  # a request of this many blocks ends the server thread (the reader closes)
SERVE_TIMEOUT_S = 7 * 24 * 3600.0  # a server waits this long for its reader's next request


@dataclass(frozen=True)
class LinkSpec:
    """Where an arena is served: the owner listens (rank 0 of the PeerLink) on host:port."""

    host: str
    port: int
    backend: str = "gloo"  # "gloo" (CPU tensors over TCP) or "nccl" (GPU tensors)
    timeout_s: float = 120.0


@dataclass(frozen=True)
class LinkedHandle:
    """What a reader is given, in place of an ArenaHandle, for an arena on another host: where
    it is served, and its shape and dtype (the owner's device is for messages only)."""

    link: LinkSpec
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str


def _wire_device(backend: str, arena_device: torch.device) -> torch.device:
    """Where the tensors that cross the link live: the CPU for gloo, the arena's GPU for nccl."""
    if backend == "nccl":
        if arena_device.type != "cuda":
            raise ValueError(f"linked arena: backend 'nccl' needs a GPU arena, got {arena_device}")
        return arena_device
    return torch.device("cpu")


class ArenaServer:
    """The owner's side: a thread that answers one reader's pulls of `arena`'s blocks."""

    def __init__(self, arena: torch.Tensor, link: LinkSpec, name: str = "arena",
                 idle_timeout_s: float = SERVE_TIMEOUT_S) -> None:
        """idle_timeout_s: how long the server waits for its reader's next request (a reader
        that dies closes the connection, which ends the wait at once; this bounds a hung one)."""
        self.arena, self.spec, self.name, self.idle_timeout_s = arena, link, name, idle_timeout_s
        self.wire = _wire_device(link.backend, arena.device)
        self.served_blocks = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"serve-{name}", daemon=True)

    def start(self) -> ArenaServer:
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        link = None
        try:
            link = PeerLink(self.spec.host, self.spec.port, rank=0, backend=self.spec.backend,
                            timeout_s=self.idle_timeout_s, device=self.arena.device if self.spec.backend == "nccl"
                            else None)
            count = torch.zeros(1, dtype=torch.int64, device=self.wire)
            stream = torch.cuda.Stream(self.arena.device) if self.arena.is_cuda else None
            while True:
                link.recv(count)
                n = int(count.item())
                if n == STOP:
                    return
                ids = torch.empty(n, dtype=torch.int64, device=self.wire)
                link.recv(ids)
                outside = (ids < 0) | (ids >= self.arena.shape[0])
                if bool(outside.any()):  # readers check first: a bad request ends the link (its recv fails)
                    raise ValueError(f"a reader asked for blocks {ids[outside][:4].tolist()} outside the arena's "
                                     f"{self.arena.shape[0]}")
                if stream is not None:
                    with torch.cuda.stream(stream):
                        data = self.arena.index_select(0, ids.to(self.arena.device)).to(self.wire)
                    stream.synchronize()
                else:
                    data = self.arena.index_select(0, ids.to(self.arena.device)).to(self.wire)
                link.send(data)
                self.served_blocks += n
        except Exception as e:  # the reader went away (or never came): the thread ends, the role goes on
            self.error = e
            log.info("%s: arena server on port %d ended: %s", self.name, self.spec.port, str(e).splitlines()[0]
                     if str(e) else type(e).__name__)
        finally:
            if link is not None:
                link.close()


class LinkedArena:
    """The reader's side: pulls blocks of an arena of `shape` / `dtype` that a peer serves."""

    def __init__(self, link: LinkSpec, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.spec, self.shape, self.dtype = link, tuple(shape), dtype
        self.device = torch.device(device)
        self.wire = _wire_device(link.backend, self.device)
        self.block_bytes = math.prod(self.shape[1:]) * torch.empty(0, dtype=dtype).element_size()
        self._link: PeerLink | None = None

    @classmethod
    def open(cls, handle: LinkedHandle, device: torch.device | str = "cpu") -> LinkedArena:
        """The reader of the arena `handle` names, connected now (its owner was told to serve it
        first): a link that cannot be formed fails here, at start-up, not under a request."""
        reader = cls(handle.link, handle.shape, handle.dtype, device)
        reader._connect()
        return reader

    def _connect(self) -> PeerLink:
        if self._link is None:
            self._link = PeerLink(self.spec.host, self.spec.port, rank=1, backend=self.spec.backend,
                                  timeout_s=self.spec.timeout_s, device=self.device if self.spec.backend == "nccl"
                                  else None)
        return self._link

    def read(self, src_ids: list[int]) -> torch.Tensor:
        """The owner's blocks `src_ids`, [len, *block shape] on this reader's device."""
        bad = [b for b in src_ids if not 0 <= b < self.shape[0]]
        if bad:
            raise ValueError(f"linked arena: blocks {bad[:4]} outside the arena's {self.shape[0]} blocks")
        if not src_ids:
            return torch.empty((0, *self.shape[1:]), dtype=self.dtype, device=self.device)
        link = self._connect()
        link.send(torch.tensor([len(src_ids)], dtype=torch.int64, device=self.wire))
        link.send(torch.tensor(src_ids, dtype=torch.int64, device=self.wire))
        data = torch.empty((len(src_ids), *self.shape[1:]), dtype=self.dtype, device=self.wire)
        link.recv(data)
        return data.to(self.device, non_blocking=False)

    def pull(self, src_ids: list[int], dst: torch.Tensor, dst_ids: list[int]) -> int:
        """dst[dst_ids] = the owner's arena[src_ids]; returns the bytes moved."""
        if len(src_ids) != len(dst_ids):
            raise ValueError(f"linked arena: {len(src_ids)} source blocks but {len(dst_ids)} destination blocks")
        if tuple(dst.shape[1:]) != self.shape[1:] or dst.dtype != self.dtype:
            raise ValueError(f"linked arena: block shapes differ: {self.shape[1:]} {self.dtype} vs "
                             f"{tuple(dst.shape[1:])} {dst.dtype}")
        data = self.read(src_ids)
        if src_ids:
            dst[torch.tensor(dst_ids, dtype=torch.int64, device=dst.device)] = data.to(dst.device)
        return len(src_ids) * self.block_bytes

    def close(self) -> None:
        """End the owner's server thread too (it answers no other reader)."""
        if self._link is not None:
            try:
                self._link.send(torch.tensor([STOP], dtype=torch.int64, device=self.wire))
            except Exception:  # the owner is gone already
                pass
            self._link.close()
            self._link = None
