"""Routing for EPD: which encoders, prefill and decode instance a request goes to.

Pure functions of a load snapshot (no processes, no messages), so the orchestrator
(engine/epd.py) and a future simulator route with the same code. The policy is least loaded
among live instances, ties to the lowest index; an encoder's load counts items (vision-tower
inputs: LLaVA-1.5 images, LLaVA-NeXT bases and tiles), a prefill's or decode's counts requests.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def split_items(items: Sequence[int], encoders: Sequence[InstanceLoad]) -> dict[int, list[int]] | None:
    """Encoder index -> the items (of `items`, in their order) it encodes: each item (a LLaVA-1.5
    image, a LLaVA-NeXT base or tile) in turn to the least-loaded live encoder, counting the items
    given out before it, so one image's tiles spread over the encoders. Keys are in the order the
    encoders were first picked. None if items are given and no encoder is alive."""
    loads = {e.index: e.load for e in encoders if e.alive}
    if items and not loads:
        return None
    assignment: dict[int, list[int]] = {}
    for item in items:
        encoder = min(loads, key=lambda i: (loads[i], i))
        loads[encoder] += 1
        assignment.setdefault(encoder, []).append(item)
    return assignment


class Router:
    """The orchestrator's routing decisions, each from a snapshot of one kind's instances."""

    def encoders_for(self, items: Sequence[int], encoders: Sequence[InstanceLoad]) -> dict[int, list[int]] | None:
        return split_items(items, encoders)

    def prefill_for(self, prefills: Sequence[InstanceLoad]) -> int | None:
        return least_loaded(prefills)

    def decode_for(self, decodes: Sequence[InstanceLoad]) -> int | None:
        return least_loaded(decodes)
