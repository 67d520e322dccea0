"""Where a worker's weights come from: disk, a process on the same device (shared, zero copy), or
a peer over torch.distributed (a copy: NCCL between GPUs, gloo on the CPU).

    store = WeightStore.pack(model)              the owner: its parameters moved into one shared
                                                 arena (ipc/arena.py) and the model made of views
    store.manifest                               picklable: the arena's handle, each tensor's name,
                                                 shape, dtype and byte offset, which half (parts)
    WeightStore.open(manifest, cfg, device)      another process on that device: a model made of
                                                 views of the same memory (CUDA IPC / the shm file)
    store.send(link) / WeightStore.receive(manifest, cfg, device, link)   (link: ipc/peer_link.py)
                                                 a copy of the arena over a PeerLink, into an arena
                                                 of the receiver's own (which it may share in turn)

One arena per store: a flat byte buffer, each tensor at a 256-byte aligned offset, so a share is
one handle and a copy is one message per chunk (the transport carries any tensor: KV blocks and
image embeddings between hosts use the same link). Rotary tables are buffers, rebuilt by each
process (init_rope), not shared. The arena must outlive every model made from it: the store keeps
it, and a model built here keeps its store (`model.weight_store`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.config import ModelConfig
from engine.models.llava import MultimodalModel
from ipc.arena import ArenaHandle, SharedArena
from ipc.peer_link import PeerLink

ALIGN = 256
CHUNK_BYTES = 1 << 28  # one send / recv per 256 MiB: bounded buffers in gloo, and progress to time


@dataclass(frozen=True)
class WeightEntry:
    name: str  # the parameter's name in MultimodalModel (lm.layers.0.qkv_proj, vision.patch_embedding, ...)
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # bytes into the arena


@dataclass(frozen=True)
class WeightManifest:
    """What another process needs to build the same model from the store's arena."""

    handle: ArenaHandle
    entries: tuple[WeightEntry, ...]
    parts: str  # "all", "vision" or "lm" (MultimodalModel's)
    nbytes: int

    def names(self) -> list[str]:
        return [e.name for e in self.entries]


class WeightStore:
    """A model's weights in one shared arena. `shared`: mapped from another process's store
    (zero copy) rather than owned."""

    def __init__(self, arena: SharedArena, manifest: WeightManifest, model: MultimodalModel, shared: bool) -> None:
        self.arena, self.manifest, self.model, self.shared = arena, manifest, model, shared
        model.weight_store = self  # the arena lives as long as the model

    @property
    def nbytes(self) -> int:
        return self.manifest.nbytes

    @classmethod
    def pack(cls, model: MultimodalModel, name: str = "weights") -> WeightStore:
        """Move `model`'s parameters into a new shared arena on their device; the model's
        parameters become views of it (the old tensors are freed as they are replaced)."""
        params = dict(model.named_parameters())  # a tied lm_head appears once, as lm.embed_tokens
        if not params:
            raise ValueError("the model has no parameters to pack")
        device = next(iter(params.values())).device
        entries, offset = [], 0
        for pname, p in params.items():
            entries.append(WeightEntry(pname, tuple(p.shape), p.dtype, offset))
            offset += -(-p.numel() * p.element_size() // ALIGN) * ALIGN
        arena = SharedArena.create((offset,), torch.uint8, device, name)
        for entry in entries:
            view = _view(arena.tensor, entry)
            view.copy_(params[entry.name].detach())
            _install(model, entry.name, view)
        _retie(model)
        manifest = WeightManifest(arena.handle, tuple(entries), model_parts(model), offset)
        return cls(arena, manifest, model, shared=False)

    @classmethod
    def open(cls, manifest: WeightManifest, cfg: ModelConfig, device: torch.device | str | None = None,
             parts: str | None = None) -> WeightStore:
        """The model of a store another process owns, as views of its arena (nothing copied);
        parts: a half of an "all" store ("vision" or "lm"), default the store's."""
        arena = SharedArena.open(manifest.handle, device)
        return cls(arena, manifest, _build(cfg, manifest, arena.tensor, parts), shared=True)

    @classmethod
    def receive(cls, manifest: WeightManifest, cfg: ModelConfig, device: torch.device | str, link: PeerLink,
                name: str = "weights", parts: str | None = None) -> WeightStore:
        """A copy of a peer's store (it calls send on the other end of `link`), into a new
        arena of this process's on `device`; parts: the half of an "all" store to build."""
        arena = SharedArena.create((manifest.nbytes,), torch.uint8, device, name)
        for chunk in _chunks(arena.tensor):
            link.recv(chunk)
        if arena.tensor.is_cuda:
            torch.cuda.synchronize(arena.tensor.device)
        mine = WeightManifest(arena.handle, manifest.entries, manifest.parts, manifest.nbytes)
        return cls(arena, mine, _build(cfg, mine, arena.tensor, parts), shared=False)

    def send(self, link: PeerLink) -> None:
        """Send the arena to the peer on `link` (which calls receive with this manifest)."""
        for chunk in _chunks(self.arena.tensor):
            link.send(chunk)

    def describe(self) -> dict:
        return {"parts": self.manifest.parts, "bytes": self.nbytes, "tensors": len(self.manifest.entries),
                "shared": self.shared, "device": self.manifest.handle.device}

    def close(self) -> None:
        self.arena.close()


def covers(store_parts: str, parts: str) -> bool:
    """A store of `store_parts` holds a model of `parts` ("all" holds "vision" and "lm")."""
    return store_parts in (parts, "all")


def room_to_pack(model: MultimodalModel) -> bool:
    """A store for model's weights fits: always on a GPU (the caching allocator frees the
    originals as they are moved); on the CPU the shm file system must hold them with a margin
    (writing past a full tmpfs is SIGBUS, not an error)."""
    params = list(model.parameters())
    if not params or params[0].device.type == "cuda":
        return bool(params)
    import os

    from ipc.arena import SHM_DIR

    need = sum(-(-p.numel() * p.element_size() // ALIGN) * ALIGN for p in params)
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize > 2 * need


def _view(arena: torch.Tensor, entry: WeightEntry) -> torch.Tensor:
    nbytes = math.prod(entry.shape) * entry.dtype.itemsize
    return arena[entry.offset : entry.offset + nbytes].view(entry.dtype).view(entry.shape)


def _install(model: MultimodalModel, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(tensor, requires_grad=False))


def _retie(model: MultimodalModel) -> None:
    if model.lm is not None and model.cfg.text.tie_word_embeddings:
        model.lm.lm_head = model.lm.embed_tokens


def model_parts(model: MultimodalModel) -> str:
    """Which half of the checkpoint a model holds: "vision", "lm" or "all"."""
    return "vision" if model.lm is None else "lm" if model.vision is None and model.cfg.is_multimodal else "all"


def _build(cfg: ModelConfig, manifest: WeightManifest, arena: torch.Tensor, parts: str | None = None
           ) -> MultimodalModel:
    """A model of `parts` (default manifest.parts; a half of an "all" store) whose parameters
    are views of `arena`."""
    parts = parts or manifest.parts
    if not covers(manifest.parts, parts):
        raise ValueError(f"a {manifest.parts!r} weight store has no {parts!r} model")
    with torch.device("meta"):
        model = MultimodalModel(cfg, parts)
    want, have = set(dict(model.named_parameters())), set(manifest.names())
    if not want <= have or (parts == manifest.parts and want != have):
        missing, extra = sorted(want - have), sorted(have - want)
        raise ValueError(f"weight manifest does not fit {cfg.architecture} ({parts}): "
                         f"missing {missing[:5]}, unexpected {extra[:5]}")
    for entry in manifest.entries:
        if entry.name in want:
            _install(model, entry.name, _view(arena, entry))
    _retie(model)
    if model.lm is not None:
        model.lm.init_rope(cfg.text.max_position_embeddings)
    return model.eval()


def _chunks(flat: torch.Tensor) -> list[torch.Tensor]:
    return [flat[i : i + CHUNK_BYTES] for i in range(0, flat.numel(), CHUNK_BYTES)]
