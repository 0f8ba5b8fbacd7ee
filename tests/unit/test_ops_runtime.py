"""``tune_gc`` and ``tune_runtime``: what a served process does to the interpreter once started."""

from __future__ import annotations

import gc
import subprocess
import sys
from collections.abc import Iterator

import pytest

from warden import cli
from warden.config import Config
from warden.ops import runtime
from warden.ops.runtime import GEN0_THRESHOLD, SWITCH_INTERVAL_S, tune_gc, tune_runtime


@pytest.fixture
def restored_gc() -> Iterator[None]:
    before, interval = gc.get_threshold(), sys.getswitchinterval()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
        sys.setswitchinterval(interval)


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


@pytest.mark.usefixtures("restored_gc")
def test_tune_runtime_also_hands_the_interpreter_over_sooner() -> None:
    sys.setswitchinterval(0.005)  # CPython's default
    tune_runtime()
    assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_S)
    assert SWITCH_INTERVAL_S < 0.005
    assert gc.get_threshold()[0] == GEN0_THRESHOLD


RAISE = """
import resource, sys
from warden.ops.runtime import raise_open_files
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (300, hard))
print(raise_open_files(200), raise_open_files(500), raise_open_files(10**9) == min(hard, 10**9))
print(resource.getrlimit(resource.RLIMIT_NOFILE)[0] == min(hard, 10**9))
"""


def test_raise_open_files_lifts_the_soft_limit_up_to_the_hard_one() -> None:
    # In a child: the limit is the whole process's.
    out = subprocess.run(
        [sys.executable, "-c", RAISE], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["300", "500", "True", "True"]


def test_a_hard_limit_too_low_for_the_caps_lowers_them_to_fit(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A warning alone let idle connections use up the descriptors before the cap
    # was reached: the upstream pool and the audit log then had none.
    config = Config.model_validate({"limits": {"max_connections": 1000}})
    monkeypatch.setattr(runtime, "raise_open_files", lambda needed: 1024)
    lowered = cli._make_room_for_connections(config)
    # Three shares (proxy, admin, upstream pool), the refusals' 128 and Warden's own 256.
    assert lowered.limits.max_connections == (1024 - 256 - 128) // 3
    assert "serving at most 213 connections per listener" in caplog.text
    monkeypatch.setattr(runtime, "raise_open_files", lambda needed: needed)
    assert cli._make_room_for_connections(config) is config
