"""Routing for EPD: which encoders, prefill and decode instance a request goes to.

Pure functions of a load snapshot (no processes, no messages), so the orchestrator
(engine/epd.py) and a future simulator route with the same code. The policy is least loaded
among live instances, ties to the lowest index; an encoder's load counts images, a prefill's
or decode's counts requests. An image whose embeddings an encoder has cached goes to it; equal
images of one request go to one encoder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class InstanceLoad:
    """One stage instance as routing sees it."""

    index: int  # its index among the instances of its kind
    load: int  # work in flight on it (images for an encoder, requests otherwise)
    alive: bool = True


def least_loaded(instances: Sequence[InstanceLoad]) -> int | None:
    """The index of the least-loaded live instance (the lowest index among equals); None if none
    is alive."""
    live = [i for i in instances if i.alive]
    if not live:
        return None
    return min(live, key=lambda i: (i.load, i.index)).index


def split_images(images: Sequence[int], encoders: Sequence[InstanceLoad], keys: Sequence[str | None] = (),
                 cached_at: Mapping[str, int] | None = None) -> dict[int, list[int]] | None:
    """Encoder index -> the images (of `images`, in their order) it encodes: each image in turn to
    the least-loaded live encoder, counting the images given out before it. With keys (content
    keys by image index, engine/mm_cache.py): equal images go to one encoder (encoded once), and
    an image whose key is in cached_at (key -> the encoder that holds its embeddings) goes to that
    encoder if it is alive. Keys of the result are in the order the encoders were first picked.
    None if images are given and no encoder is alive."""
    loads = {e.index: e.load for e in encoders if e.alive}
    if images and not loads:
        return None
    cached_at = cached_at or {}
    placed: dict[str, int] = {}  # key -> encoder, for the images given out so far
    assignment: dict[int, list[int]] = {}
    for image in images:
        key = keys[image] if image < len(keys) else None
        encoder = placed.get(key, cached_at.get(key)) if key is not None else None
        if encoder not in loads:
            encoder = min(loads, key=lambda i: (loads[i], i))
        if key is not None:
            placed[key] = encoder
        loads[encoder] += 1
        assignment.setdefault(encoder, []).append(image)
    return assignment


class Router:
    """The orchestrator's routing decisions, each from a snapshot of one kind's instances."""

    def encoders_for(self, images: Sequence[int], encoders: Sequence[InstanceLoad], keys: Sequence[str | None] = (),
                     cached_at: Mapping[str, int] | None = None) -> dict[int, list[int]] | None:
        return split_images(images, encoders, keys, cached_at)

    def prefill_for(self, prefills: Sequence[InstanceLoad]) -> int | None:
        return least_loaded(prefills)

    def decode_for(self, decodes: Sequence[InstanceLoad]) -> int | None:
        return least_loaded(decodes)
