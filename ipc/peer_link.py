"""A two-process torch.distributed link formed on demand: how a worker gets tensors (weights, KV
blocks, image embeddings) from a peer whose memory it cannot map (another GPU without a shared
context, another host). NCCL between GPUs, gloo on the CPU (so CI runs the same code path). Only
tensors cross: it knows nothing of what they are."""

from __future__ import annotations

import socket
from datetime import timedelta

import torch


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now: where a link's rank 0 will serve its store."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class PeerLink:
    """A two-process torch.distributed group formed on demand (no global init_process_group):
    rank 0 serves a TCPStore on (host, port), rank 1 connects; "gloo" for CPU tensors, "nccl" for
    GPU tensors (on `device`, made current; gloo ignores it). send / recv move one tensor to /
    from the other rank, synchronously."""

    def __init__(self, host: str, port: int, rank: int, backend: str = "gloo", timeout_s: float = 120.0,
                 device: torch.device | str | None = None) -> None:
        import torch.distributed as dist

        if rank not in (0, 1):
            raise ValueError(f"PeerLink rank = {rank}; a link has ranks 0 and 1")
        timeout = timedelta(seconds=timeout_s)
        self.rank, self.backend = rank, backend
        self.store = dist.TCPStore(host, port, 2, is_master=rank == 0, timeout=timeout)
        if backend == "gloo":
            self.group = dist.ProcessGroupGloo(self.store, rank, 2, timeout)
        elif backend == "nccl":
            if device is not None:
                torch.cuda.set_device(device)
            self.group = dist.ProcessGroupNCCL(self.store, rank, 2)
        else:
            raise ValueError(f"PeerLink backend {backend!r}: use 'gloo' or 'nccl'")

    @property
    def peer(self) -> int:
        return 1 - self.rank

    def send(self, tensor: torch.Tensor) -> None:
        self.group.send([tensor], self.peer, 0).wait()

    def recv(self, tensor: torch.Tensor) -> None:
        self.group.recv([tensor], self.peer, 0).wait()

    def close(self) -> None:
        self.group = None
        self.store = None
