"""Shared arenas: a tensor one process allocates and exports, which peers map once.

On a GPU the handle is a CUDA IPC handle (cudaIpcGetMemHandle, via epd_kernels._epd_C) plus the
offset of the tensor inside its allocation; on the CPU (CI) it names a file in /dev/shm that
both sides map (torch.from_file, shared); the file stays while the engine runs (a stage that
changes role maps its peers' arenas then) and goes at shutdown, or with the processes. Either
way only the small handle crosses processes: tensor data never does.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")
_OWNED_FILES: set[str] = set()  # CPU arena files this process created and has not unlinked yet
_MAPPED_FILES: set[str] = set()  # CPU arena files of other processes this one mapped


def unlink_owned_files() -> None:
    """Remove every CPU arena file this process created or mapped (a stage exiting because its
    parent died: nobody else would; the files stay for the engine's life, as a stage that
    changes role maps its peers' then). Safe from a signal handler: no locks, missing files
    ignored."""
    for files in (_OWNED_FILES, _MAPPED_FILES):
        for path in list(files):
            Path(path).unlink(missing_ok=True)
            files.discard(path)


@dataclass(frozen=True)
class ArenaHandle:
    """Picklable description of an arena: enough for a peer to map it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str  # "cpu" or "cuda:N"
    path: str | None = None  # cpu: the shared file
    cuda_handle: bytes | None = None  # cuda: cudaIpcMemHandle_t
    offset: int = 0  # cuda: byte offset inside the exported allocation
    owner_pid: int = 0


class SharedArena:
    """`create` in the owner, `open(handle)` in peers; `tensor` is the arena in both."""

    def __init__(self, tensor: torch.Tensor, handle: ArenaHandle, owner: bool) -> None:
        self.tensor, self.handle, self.owner = tensor, handle, owner

    @classmethod
    def create(cls, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str, name: str) -> SharedArena:
        device = torch.device(device)
        numel = 1
        for n in shape:
            numel *= n
        if device.type == "cuda":
            from epd_kernels import _epd_C

            tensor = torch.zeros(shape, dtype=dtype, device=device)
            cuda_handle, offset = _epd_C.ipc_export(tensor)
            index = device.index if device.index is not None else torch.cuda.current_device()
            handle = ArenaHandle(tuple(shape), dtype, f"cuda:{index}", cuda_handle=cuda_handle, offset=offset,
                                 owner_pid=os.getpid())
            return cls(tensor, handle, owner=True)
        path = SHM_DIR / f"epd-{os.getpid()}-{name}-{uuid.uuid4().hex[:8]}"
        _OWNED_FILES.add(str(path))  # before the file exists: a death while creating it still removes it
        tensor = torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)
        tensor.zero_()
        return cls(tensor, ArenaHandle(tuple(shape), dtype, "cpu", path=str(path), owner_pid=os.getpid()), owner=True)

    @classmethod
    def open(cls, handle: ArenaHandle, device: torch.device | str | None = None) -> SharedArena:
        """Map a peer's arena (do it once per process and keep the mapping). device: this
        process's GPU; an arena on another GPU is mapped into its context with peer access (as
        NCCL and vLLM's custom all-reduce do), so copies run there and use NVLink, and this
        process never creates a context on the owner's GPU. The tensor reports `device`."""
        if handle.device.startswith("cuda"):
            from epd_kernels import _epd_C

            here = torch.device(device if device is not None else handle.device)
            if here.type != "cuda":
                raise ValueError(f"arena on {handle.device} cannot be mapped on {here}")
            index = here.index if here.index is not None else torch.cuda.current_device()
            like = torch.empty(handle.shape, dtype=handle.dtype, device="meta")
            tensor = _epd_C.ipc_open(handle.cuda_handle, handle.offset, like, index)
            return cls(tensor, handle, owner=False)
        if handle.path is None or not Path(handle.path).exists():
            raise FileNotFoundError(f"arena file {handle.path} is gone (owner pid {handle.owner_pid} exited?)")
        numel = 1
        for n in handle.shape:
            numel *= n
        tensor = torch.from_file(handle.path, shared=True, size=numel, dtype=handle.dtype).view(handle.shape)
        _MAPPED_FILES.add(handle.path)
        return cls(tensor, handle, owner=False)

    def close(self) -> None:
        """Drop this process's mapping; the owner also removes the CPU file (peers that mapped
        it keep their mapping until they close)."""
        self.tensor = None
        if self.owner:
            unlink(self.handle)

    def __del__(self) -> None:
        if getattr(self, "owner", False) and getattr(self, "handle", None) is not None:
            unlink(self.handle)


def unlink(handle: ArenaHandle) -> None:
    """Remove a CPU arena's file now. Every mapping made from it stays valid (the memory lives
    until the last one is dropped), so once all peers have opened an arena its file can go:
    nothing is left in /dev/shm however the processes end. No-op for a CUDA arena."""
    if handle.path is not None:
        Path(handle.path).unlink(missing_ok=True)
        _OWNED_FILES.discard(handle.path)
