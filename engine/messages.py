"""Messages between the EPD orchestrator (engine/epd.py) and the stage roles it runs in worker
processes (engine/roles/, hosted by ipc/worker.py): small and picklable, ids only (tensors
stay in the arenas). The worker shell's own messages (Shutdown, Crashed, StageStatus) are in
ipc/worker.py.

Start-up, per stage: Loaded (its weights are in memory; a stage whose weights others on its
device share sends their manifest, and those stages start after it, mapping them:
engine/roles/weights.py) -> SizeKV (prefill and decode: size the KV arena now; sent once every
stage on the device is loaded, to one KV owner at a time, so each sees the memory the others
hold) -> Exported (its arena's handle; encoders and prefill) -> Peers (the arenas it maps;
prefill and decode) -> Ready (what it holds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.sampling import SamplingParams

# ----------------------------------------------------------------------------- start-up


@dataclass
class Loaded:
    stage: str
    kv_owner: bool  # it sizes a KV arena of its own when told (SizeKV)
    weights: Any = None  # engine.weights.WeightManifest: its weights, packed for stages that share them


@dataclass
class SizeKV:
    """Size the KV arena: kv_cache_tokens if set, else `share` of what the GPU has left now.
    for_decode: a prefill whose arena decode shares also holds decode's blocks (half of it)."""

    share: float = 1.0
    for_decode: bool = False


@dataclass
class Sized:
    stage: str
    blocks: int  # the KV blocks it owns


@dataclass
class Exported:
    stage: str  # "encode0", "prefill0", ...
    handle: Any  # ArenaHandle of the arena it owns, for its peers


@dataclass
class Peers:
    handles: list  # prefill: the encoders' MM arenas; decode: the prefill instances' KV arenas (None: gone;
    #                an ipc.linked_arena.LinkedHandle: on another host, read over a link)
    kv_owned: list[int] = field(default_factory=list)  # decode: the blocks each prefill owns (from Sized)


@dataclass
class ServeArena:
    """To an arena's owner: serve it to `reader`, a stage on another host, over `link` (an
    ipc.linked_arena.LinkSpec; the reader's Peers carries the matching LinkedHandle)."""

    link: Any
    reader: str


@dataclass
class PeerArena:
    """After a role switch: the arena of instance `index` of `kind` ("encode": an MM arena, for
    the prefills; "prefill": a KV arena, for the decodes) is now `handle` (None: gone, unmap it)."""

    kind: str
    index: int
    handle: Any = None


@dataclass
class Unencoded:
    """An encoder that changes role gives back a task it had not started (its MM arena was full):
    the orchestrator sends its items to another encoder."""

    req_id: int
    part: int
    items: int


@dataclass
class EncoderDraining:
    """Encoder `index` drains for a role switch: a prefill copies the embeddings that its queued
    prompts hold in that encoder's MM arena into its own MM blocks and frees them there (FreeMM),
    so the encoder closes without waiting for those prompts' prefills (a blocked prefill can hold
    them for as long as decode keeps its KV arena full)."""

    index: int


@dataclass
class SendWeights:
    """Send this stage's packed weights to the stage that changes role, over a PeerLink
    (ipc/peer_link.py) it serves at host:port as rank 0; the stage serves on meanwhile."""

    host: str
    port: int
    backend: str  # "gloo" (CPU) or "nccl" (GPUs)


@dataclass
class Ready:
    stage: str
    stats: dict  # pid, device, torch_threads and what it holds (KV / MM blocks, GB, graph buckets)


# ----------------------------------------------------------------------------- requests


@dataclass
class EncodeTask:
    req_id: int
    part: int  # which slice of the request's items
    images: list[Any]  # sources as the user gave them (paths, bytes, PIL images, data URLs)
    # the items to encode, in order: (index into images, item of that image: 0 = the whole image
    # or a NeXT base, 1.. = tiles); empty: every item of every image
    items: list[tuple[int, int]] = field(default_factory=list)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width) the orchestrator counted
    keys: list[str] = field(default_factory=list)  # content key per item (engine/mm_cache.py); []: not cached


# an encoder batch's stamps (Encoded.times), the last three on the GPU path only: the
# preprocessing's image bytes read, decode returned, resize + normalize launched (host times)
ENCODER_STAMPS = ("preprocess_start", "preprocess_end", "tower_start", "tower_end", "sources_end", "decode_end",
                  "resize_end")


@dataclass
class Encoded:
    req_id: int
    part: int
    encoder: int
    blocks: list[int]  # one MM block per item of the task, in order (a cached item's: one more reference)
    preprocess_s: float = 0.0  # decoding + preprocessing the task's items not cached (synchronized)
    tower_s: float = 0.0  # the vision tower + projector on them (synchronized)
    times: tuple[float, ...] = ()  # ENCODER_STAMPS (perf_counter), the GPU path's steps included


@dataclass
class FreeMM:
    """Drop one reference to each block (cached images stay in the encoder's cache)."""

    blocks: list[int]
    encoder: int = 0  # whose arena (the orchestrator forwards it there)


@dataclass
class PrefillTask:
    req_id: int
    prompt_ids: list[int]
    mm_refs: list[tuple[int, int]]  # epd: (encoder, block) per item, images in prompt order, items in order
    sampling: SamplingParams
    seed: int
    images: list[Any] = field(default_factory=list)  # pd: image sources, encoded by prefill itself
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width) per image: the row layouts
    item_keys: list[str] = field(default_factory=list)  # pd: content key per item


@dataclass
class Prefilled:
    req_id: int
    first_token: int
    prefill: int  # the instance whose arena holds kv_blocks
    kv_blocks: list[int]
    mm_bytes: int = 0  # image embeddings copied in from the encoders' arenas
    mm_copy_s: float = 0.0
    times: tuple[float, ...] = ()  # the prefill batch's start (after encode_first's wait) and end (perf_counter)


@dataclass
class Migrated:
    req_id: int
    kv_bytes: int  # 0: read in place (shared arena)
    seconds: float


@dataclass
class DecodeTask:
    req_id: int
    prompt_ids: list[int]
    first_token: int
    prefill: int  # the instance whose arena holds kv_blocks
    kv_blocks: list[int]
    sampling: SamplingParams
    seed: int
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    # a request handed over by a decode that changes role (HandedOver): its tokens after the
    # first, the decode whose arena (src_arena) holds kv_blocks (acked there), the KV length
    more_tokens: list[int] = field(default_factory=list)
    src_decode: int | None = None
    src_arena: Any = None
    num_cached: int = 0


@dataclass
class HandedOver:
    """A decode that changes role gives up a request: the task another decode continues it from
    (its KV blocks stay lent until that decode acks with FreeKV(decode=...))."""

    task: DecodeTask


@dataclass
class FreeKV:
    blocks: list[int]
    prefill: int = 0  # whose arena (the orchestrator forwards it there)
    decode: int | None = None  # a handed-over request's blocks: that decode's arena instead


@dataclass
class Tokens:
    """One decode step's tokens, one message for the whole batch."""

    req_ids: list[int]
    token_ids: list[int]


@dataclass
class Abort:
    req_id: int


@dataclass
class Failed:
    req_id: int
    stage: str
    error: str
    images: int = 0  # encoder: the items of the part it did not encode (its load drops by these)
