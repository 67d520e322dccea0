"""Routing for EPD: which encoders, prefill and decode instance a request goes to.

Pure functions of a load snapshot (no processes, no messages), so the orchestrator
(engine/epd.py) and a future simulator route with the same code. The policy is least loaded
among live instances, ties to the lowest index; an encoder's load counts items (vision-tower
inputs: LLaVA-1.5 images, LLaVA-NeXT bases and tiles), a prefill's or decode's counts requests.
An item whose embeddings an encoder has cached goes to it; equal items of one request go to one
encoder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class InstanceLoad:
    """One stage instance as routing sees it."""

    index: int  # its index among the instances of its kind
    load: int  # work in flight on it (items for an encoder, requests otherwise)
    alive: bool = True


def least_loaded(instances: Sequence[InstanceLoad]) -> int | None:
    """The index of the least-loaded live instance (the lowest index among equals); None if none
    is alive."""
    live = [i for i in instances if i.alive]
    if not live:
        return None
    return min(live, key=lambda i: (i.load, i.index)).index


def split_items(items: Sequence[int], encoders: Sequence[InstanceLoad], keys: Sequence[str | None] = (),
                cached_at: Mapping[str, int] | None = None) -> dict[int, list[int]] | None:
    """Encoder index -> the items (of `items`, in their order) it encodes: each item (a LLaVA-1.5
    image, a LLaVA-NeXT base or tile) in turn to the least-loaded live encoder, counting the items
    given out before it, so one image's tiles spread over the encoders. With keys (content keys
    by item index, engine/mm_cache.py): equal items go to one encoder (encoded once), and an item
    whose key is in cached_at (key -> the encoder that holds its embeddings) goes to that encoder
    if it is alive. Keys of the result are in the order the encoders were first picked. None if
    items are given and no encoder is alive."""
    loads = {e.index: e.load for e in encoders if e.alive}
    if items and not loads:
        return None
    cached_at = cached_at or {}
    placed: dict[str, int] = {}  # key -> encoder, for the images given out so far
    assignment: dict[int, list[int]] = {}
    for item in items:
        key = keys[item] if item < len(keys) else None
        encoder = placed.get(key, cached_at.get(key)) if key is not None else None
        if encoder not in loads:
            encoder = min(loads, key=lambda i: (loads[i], i))
        if key is not None:
            placed[key] = encoder
        loads[encoder] += 1
        assignment.setdefault(encoder, []).append(item)
    return assignment


class Router:
    """The orchestrator's routing decisions, each from a snapshot of one kind's instances."""

    def encoders_for(self, items: Sequence[int], encoders: Sequence[InstanceLoad], keys: Sequence[str | None] = (),
                     cached_at: Mapping[str, int] | None = None) -> dict[int, list[int]] | None:
        return split_items(items, encoders, keys, cached_at)

    def prefill_for(self, prefills: Sequence[InstanceLoad]) -> int | None:
        return least_loaded(prefills)

    def decode_for(self, decodes: Sequence[InstanceLoad]) -> int | None:
        return least_loaded(decodes)
