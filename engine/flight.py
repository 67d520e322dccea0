"""A request in flight through the EPD stages, as the orchestrator (engine/epd.py) keeps it."""

from __future__ import annotations

from engine.messages import EncodeTask
from engine.output_processor import RequestState
from engine.request import Sequence


class Flight:
    """A request in flight: its sequence (the orchestrator's record of its tokens), its output
    state, image sources, encoder parts and MM references. Items are numbered over the request:
    image 0's items, then image 1's, ..."""

    def __init__(self, seq: Sequence, state: RequestState, images: list, items_per_image: list[int]) -> None:
        self.seq, self.state, self.images = seq, state, images
        self.items = [(image, k) for image, n in enumerate(items_per_image) for k in range(n)]  # (image, its item)
        self.parts: dict[int, tuple[int, list[int]]] = {}  # part id -> (encoder, items being encoded)
        self.next_part = 0
        self.refs: dict[int, tuple[int, int]] = {}  # item -> (encoder, MM block), until prefill takes them
        self.prefill: int | None = None  # the instances it was routed to (prefill: until Prefilled)
        self.decode: int | None = None

    def encode_task(self, part: int, items: list[int]) -> EncodeTask:
        """The task for `items` of this request: the images they come from, once each, and the
        items' content keys."""
        used = sorted({self.items[i][0] for i in items})
        where = {image: k for k, image in enumerate(used)}
        return EncodeTask(self.seq.seq_id, part, [self.images[i] for i in used],
                          items=[(where[self.items[i][0]], self.items[i][1]) for i in items],
                          image_sizes=[self.seq.image_sizes[i] for i in used], keys=self.keys(items))

    def keys(self, items: list[int]) -> list[str]:
        """The content keys of these items ([] with the cache off)."""
        return [self.seq.mm_keys[i] for i in items] if self.seq.mm_keys else []
