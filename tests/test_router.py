"""The EPD router alone (engine/router.py): no processes, only load snapshots.

Property checks over seeded random snapshots (no extra test dependency): every image goes to
exactly one live encoder, the split keeps the loads as even as one-at-a-time least-loaded
placement can, ties go to the lowest index, dead instances get nothing, and loads that return to
zero route like a fresh start.
"""

from __future__ import annotations

import random

import pytest

from engine.router import InstanceLoad, Router, least_loaded, split_items

ROUNDS = 300  # snapshots per property: well under a second


def _snapshot(rng: random.Random, max_instances: int = 5) -> list[InstanceLoad]:
    n = rng.randint(1, max_instances)
    return [InstanceLoad(i, rng.randint(0, 6), rng.random() > 0.3) for i in range(n)]


def test_least_loaded_is_the_minimum_over_live_instances_lowest_index_first() -> None:
    rng = random.Random(0)
    for _ in range(ROUNDS):
        instances = _snapshot(rng)
        live = [i for i in instances if i.alive]
        picked = least_loaded(instances)
        if not live:
            assert picked is None
            continue
        best = min(i.load for i in live)
        assert picked == min(i.index for i in live if i.load == best)


def test_split_gives_every_pending_image_to_exactly_one_live_encoder() -> None:
    rng = random.Random(1)
    for _ in range(ROUNDS):
        encoders = _snapshot(rng)
        images = sorted(rng.sample(range(12), rng.randint(0, 8)))
        split = split_items(images, encoders)
        live = {e.index for e in encoders if e.alive}
        if images and not live:
            assert split is None
            continue
        assert split is not None
        assert sorted(i for part in split.values() for i in part) == images
        assert set(split) <= live and all(split.values())
        for part in split.values():
            assert part == sorted(part)  # each encoder's images in prompt order


def test_split_evens_out_the_loads() -> None:
    """After the split no live encoder is more than one image above another that got images
    (the one-at-a-time least-loaded rule), and none that got images started above the final
    minimum."""
    rng = random.Random(2)
    for _ in range(ROUNDS):
        encoders = [e for e in _snapshot(rng) if e.alive] or [InstanceLoad(0, 0)]
        images = list(range(rng.randint(1, 10)))
        split = split_items(images, encoders)
        after = {e.index: e.load + len(split.get(e.index, [])) for e in encoders}
        low = min(after.values())
        for e in encoders:
            if e.index in split:
                assert after[e.index] <= low + 1
                assert e.load <= low


def test_ties_go_to_the_lowest_index_and_keys_follow_first_pick() -> None:
    idle = [InstanceLoad(i, 0) for i in range(3)]
    assert split_items([0, 1, 2, 3, 4], idle) == {0: [0, 3], 1: [1, 4], 2: [2]}
    assert list(split_items([0, 1], [InstanceLoad(0, 2), InstanceLoad(1, 1), InstanceLoad(2, 0)])) == [2, 1]
    assert least_loaded([InstanceLoad(0, 1), InstanceLoad(1, 0), InstanceLoad(2, 0)]) == 1


def test_dead_instances_get_nothing_even_when_idle() -> None:
    encoders = [InstanceLoad(0, 0, alive=False), InstanceLoad(1, 9)]
    assert split_items([0, 1, 2], encoders) == {1: [0, 1, 2]}
    assert least_loaded([InstanceLoad(0, 0, alive=False), InstanceLoad(1, 5)]) == 1
    assert least_loaded([InstanceLoad(0, 0, alive=False)]) is None
    assert split_items([0], [InstanceLoad(0, 0, alive=False)]) is None
    assert split_items([], [InstanceLoad(0, 0, alive=False)]) == {}  # nothing to place: no error


@pytest.mark.parametrize("requests", [1, 7, 20])
def test_loads_that_return_to_zero_route_like_a_fresh_start(requests: int) -> None:
    """Replays the orchestrator's bookkeeping: add what the router picks, take it off when the
    work finishes; once all is done the counters are zero and the next pick is as at start."""
    router, rng = Router(), random.Random(requests)
    loads = [0, 0, 0]
    fresh = router.prefill_for([InstanceLoad(i, 0) for i in range(3)])
    in_flight: list[int] = []
    for _ in range(requests):
        picked = router.prefill_for([InstanceLoad(i, n) for i, n in enumerate(loads)])
        loads[picked] += 1
        in_flight.append(picked)
        if rng.random() < 0.4:  # some finish while others arrive
            loads[in_flight.pop(rng.randrange(len(in_flight)))] -= 1
    for picked in in_flight:
        loads[picked] -= 1
    assert loads == [0, 0, 0]
    assert router.decode_for([InstanceLoad(i, n) for i, n in enumerate(loads)]) == fresh == 0
    assert router.encoders_for([0, 1], [InstanceLoad(i, n) for i, n in enumerate(loads)]) == {0: [0], 1: [1]}
