"""What every stage role has: its spec (RoleSpec), the base class (_Role) and small helpers."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig, ModelConfig
from engine.messages import Failed, SendWeights, ServeArena
from engine.mm_cache import EncoderCache, PixelCache
from engine.roles.weights import WeightManifest, WeightStore, model_parts, room_to_pack
from engine.runner import ModelRunner, kv_blocks_from_memory, load_weights
from ipc.arena import ArenaHandle, SharedArena
from ipc.byte_arena import ByteArena, ByteRef
from ipc.linked_arena import ArenaServer, LinkedArena, LinkedHandle
from ipc.peer_link import PeerLink

Send = Callable[[object], None]


@dataclass(frozen=True)
class RoleSpec:
    """What a worker builds: kind "encode" / "prefill" / "decode", its index among its kind,
    the resolved config (its device included). encodes: a prefill that encodes its requests'
    images itself (pd mode). shared: prefill0 and decode0 share prefill0's KV arena."""

    kind: str
    index: int
    config: EngineConfig
    encodes: bool = False
    shared: bool = False
    image_bytes: ArenaHandle | None = None  # the orchestrator's byte arena (ipc/byte_arena.py): image bytes
    pack_weights: bool = False  # other stages on its device will map its weights: pack them (engine/roles/weights.py)
    weights: WeightManifest | None = None  # map these (another stage's, same device) instead of reading disk
    weights_peer: tuple | None = None  # (host, port, backend, manifest): receive a copy over a PeerLink instead
    busy_board: ArenaHandle | None = None  # epd: which encoders have work in hand (ipc/busy_board.py)
    host: str = ""  # its host label in the placement ("": the orchestrator's): peers elsewhere are linked

    @property
    def name(self) -> str:
        return f"{self.kind}{self.index}"


def _gb(tensor: torch.Tensor, rows: int | None = None) -> float:
    """Size in GB of `rows` leading rows of tensor (all by default)."""
    rows = tensor.shape[0] if rows is None else rows
    return round(rows * tensor[0].numel() * tensor.element_size() / 1e9, 4) if tensor.shape[0] else 0.0


def _blocks(manager: BlockManager | None) -> dict:
    return {"used": manager.num_blocks - manager.num_free, "total": manager.num_blocks} if manager else {}


def _mm_blocks(cache: EncoderCache) -> dict:
    """An MM arena's blocks: used by requests, idle in the cache (evicted when needed), total."""
    s = cache.stats()
    return {"used": s["in_use_blocks"], "cached": s["idle_blocks"], "total": s["total_blocks"]}


def _pixel_cache(config: EngineConfig, processor) -> PixelCache | None:
    """The stage's pixel cache; none when it preprocesses on its GPU (a few ms per image there,
    and the memory is the KV cache's): the encoder cache keeps the embeddings either way."""
    on_gpu = getattr(processor, "device", torch.device("cpu")).type == "cuda"
    return PixelCache(config.pixel_cache_bytes) if config.pixel_cache_bytes and not on_gpu else None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def open_peer_arena(handle: ArenaHandle | LinkedHandle, device: torch.device) -> SharedArena | LinkedArena:
    """A peer stage's arena: mapped (CUDA IPC, or the shared-memory file on the CPU), or, for a
    stage on another host, read over a link (LinkedArena: pull / read / close)."""
    if isinstance(handle, LinkedHandle):
        return LinkedArena.open(handle, device)
    return SharedArena.open(handle, device)


def _same_device(handle, device: torch.device) -> bool:
    """The arena behind `handle` lives on `device`: readable in place (CUDA IPC on one GPU, or
    the same shared-memory file on the CPU); never one on another host."""
    if isinstance(handle, LinkedHandle):
        return False
    if device.type == "cpu":
        return handle.device == "cpu"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return handle.device == f"cuda:{index}"


class _Role:
    """What every role has: its spec, config, checkpoint config, device, outbox."""

    busy = False

    def __init__(self, spec: RoleSpec, send: Send) -> None:
        self.spec, self.config, self.send, self.name = spec, spec.config, send, spec.name
        self.cfg = ModelConfig.from_dir(self.config.model)
        self.device, self.dtype = torch.device(self.config.device), self.config.torch_dtype
        self.draining = False
        self.arena_servers: list[ArenaServer] = []  # its arena, served to stages on other hosts
        self.weight_store: WeightStore | None = None  # its weights when shared (packed here or mapped)
        # the orchestrator's byte arena (image bytes), mapped now (kept: a role switch maps it later too)
        self.byte_arena = ByteArena.open(spec.image_bytes) if spec.image_bytes is not None and (
            spec.kind == "encode" or spec.encodes) else None

    def load_model(self, parts: str):
        """The role's weights ("vision", "lm" or "all"): mapped from the store spec.weights
        describes (zero copy), else read from disk, and packed into a store of their own when
        spec.pack_weights (and there is room: a CPU store lives in /dev/shm)."""
        if self.spec.weights is not None:
            self.weight_store = WeightStore.open(self.spec.weights, self.cfg, self.device, parts)
            return self.weight_store.model
        if self.spec.weights_peer is not None:  # a copy from a live stage (SendWeights), one message per chunk
            host, port, backend, manifest = self.spec.weights_peer
            link = PeerLink(host, port, rank=1, backend=backend, device=self.device)
            try:
                self.weight_store = WeightStore.receive(manifest, self.cfg, self.device, link, f"weights-{self.name}",
                                                        parts)
            finally:
                link.close()
            return self.weight_store.model
        model = load_weights(self.config, self.cfg, parts)
        if self.spec.pack_weights and room_to_pack(model):
            self.weight_store = WeightStore.pack(model, f"weights-{self.name}")
        return model

    def send_weights(self, msg: SendWeights) -> None:
        """Serve this role's packed weights to one peer (SendWeights), on a thread: the role
        serves on while the copy runs."""
        def run() -> None:
            link = PeerLink(msg.host, msg.port, rank=0, backend=msg.backend, device=self.device)
            try:
                self.weight_store.send(link)
            finally:
                link.close()

        threading.Thread(target=run, name="send-weights", daemon=True).start()

    def serve_arena(self, msg: ServeArena, arena: torch.Tensor) -> None:
        """Serve `arena` to a stage on another host (ServeArena), on a thread of its own."""
        self.arena_servers.append(ArenaServer(arena, msg.link, f"{self.name}->{msg.reader}").start())

    def served(self) -> dict:
        """Blocks of its arena read by stages on other hosts (stats), when it serves any."""
        return {"arena_served_blocks": sum(s.served_blocks for s in self.arena_servers)} if self.arena_servers else {}

    @property
    def packed_weights(self) -> WeightManifest | None:
        """What Loaded carries: the manifest of weights this role packed for others."""
        store = self.weight_store
        return store.manifest if store is not None and not store.shared else None

    def weight_stats(self, model) -> dict:
        if self.weight_store is not None:
            return self.weight_store.describe()
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        return {"parts": model_parts(model), "bytes": nbytes, "shared": False, "device": str(self.device)}

    def base_stats(self, runner: ModelRunner) -> dict:
        stats = {"pid": os.getpid(), "device": str(self.device), "backend": runner.backend,
                 "torch_threads": torch.get_num_threads(), "weights": self.weight_stats(runner.model)}
        if self.device.type == "cuda":  # what this process allocated (mapped weights are the owner's)
            stats["gpu_allocated_gb"] = round(torch.cuda.memory_allocated(self.device) / 1e9, 3)
        return stats

    def kv_stats(self, runner: ModelRunner, own: int) -> dict:
        """The role's KV cache for its Ready message: `own` blocks of the runner's arena."""
        return {"kv_cache_blocks": own, "kv_cache_tokens": own * runner.block_size,
                "kv_cache_gb": _gb(runner.kv_arena, own)}

    def kv_blocks_to_own(self, mm_arena: torch.Tensor, share: float) -> int:
        """config.kv_cache_tokens' blocks, or `share` of what the GPU has left now."""
        blocks = self.config.num_kv_blocks()
        if blocks is None:
            blocks = kv_blocks_from_memory(self.config, self.cfg, self.model, mm_arena, share)
        return blocks

    def image_sources(self, images: list) -> list:
        """A task's images with those sent through the orchestrator's byte arena read out (a
        copy: the orchestrator frees the span once this stage has answered for the task).
        Thread-safe (an encoder reads on its preprocessing thread)."""
        return [self.byte_arena.read(x) if isinstance(x, ByteRef) else x for x in images]

    @property
    def drained(self) -> bool:
        """Nothing in hand and nothing lent out: the role can close (a role switch waits for it)."""
        return not self.busy

    def drain(self) -> None:
        """Take no new work (new tasks fail with "draining"); what is in hand runs to its end."""
        self.draining = True

    def refuse(self, req_id: int, images: int = 0) -> None:
        self.send(Failed(req_id, self.name, f"{self.name} is draining and takes no new requests", images=images))

    def close(self) -> None:
        if self.weight_store is not None:
            self.weight_store.close()
