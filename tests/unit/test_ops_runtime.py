"""``tune_gc``: what a served process does to the cyclic collector once started."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from warden.ops.runtime import GEN0_THRESHOLD, tune_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    before = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


@pytest.mark.usefixtures("restored_gc")
def test_tune_gc_freezes_what_exists_and_raises_the_young_threshold() -> None:
    gc.unfreeze()
    gen1, gen2 = gc.get_threshold()[1:]
    long_lived = [{"config": i} for i in range(100)]
    tune_gc()
    assert gc.get_freeze_count() >= len(long_lived)
    assert gc.get_threshold() == (GEN0_THRESHOLD, gen1, gen2)
    # Cyclic garbage made afterwards is still collected.
    cycle: list[object] = []
    cycle.append(cycle)
    del cycle
    assert gc.collect() >= 1
