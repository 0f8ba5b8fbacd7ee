"""How a process writes its heartbeat, and how another times it (warden.approvals.owner)."""

from __future__ import annotations

import pytest

from warden.approvals.owner import Heartbeat, Watch


def test_a_heartbeat_that_went_back_is_as_old_as_it_says() -> None:
    # Seen at 100 s (this monotonic clock), then its next value lies 31 s before it:
    # written at 69 s at the latest, 31 s ago.
    mono = [100.0]
    watch = Watch(lambda: mono[0])
    assert watch.age("own_x", 5000.0) == 0.0
    mono[0] = 100.1
    assert watch.age("own_x", 5000.0 + 0.1 - 31.0) == pytest.approx(31.0)
    # Beats that advance with time are never older than the time between them.
    watch.forget([])
    assert watch.age("own_x", 7.0) == 0.0
    for step in range(1, 50):
        mono[0] = 100.1 + 5 * step
        assert watch.age("own_x", 7.0 + 5 * step) == 0.0
    mono[0] += 29.0
    assert watch.age("own_x", 7.0 + 5 * 49) == pytest.approx(29.0)


def test_the_heartbeat_never_goes_back_and_keeps_pace_with_time() -> None:
    wall, mono = [1000.0], [50.0]
    beats = Heartbeat(lambda: wall[0], lambda: mono[0])
    assert beats.next() == 1000.0
    wall[0], mono[0] = 1000.0 - 3600.0, 55.0  # stepped back an hour, 5 s later
    assert beats.next() == 1005.0
    wall[0], mono[0] = 2000.0, 60.0  # stepped forward: the wall clock again
    assert beats.next() == 2000.0
