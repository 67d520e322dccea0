"""Routing for EPD: which encoders, prefill and decode instance a request goes to.

Pure functions of a load snapshot (no processes, no messages), so the orchestrator
(engine/epd.py) and a future simulator route with the same code. The policy is least loaded
among live instances, ties to the lowest index; an encoder's load counts images, a prefill's
or decode's counts requests.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def split_images(images: Sequence[int], encoders: Sequence[InstanceLoad]) -> dict[int, list[int]] | None:
    """Encoder index -> the images (of `images`, in their order) it encodes: each image in turn to
    the least-loaded live encoder, counting the images given out before it. Keys are in the order
    the encoders were first picked. None if images are given and no encoder is alive."""
    loads = {e.index: e.load for e in encoders if e.alive}
    if images and not loads:
        return None
    assignment: dict[int, list[int]] = {}
    for image in images:
        encoder = min(loads, key=lambda i: (loads[i], i))
        loads[encoder] += 1
        assignment.setdefault(encoder, []).append(image)
    return assignment


class Router:
    """The orchestrator's routing decisions, each from a snapshot of one kind's instances."""

    def encoders_for(self, images: Sequence[int], encoders: Sequence[InstanceLoad]) -> dict[int, list[int]] | None:
        return split_images(images, encoders)

    def prefill_for(self, prefills: Sequence[InstanceLoad]) -> int | None:
        return least_loaded(prefills)

    def decode_for(self, decodes: Sequence[InstanceLoad]) -> int | None:
        return least_loaded(decodes)
