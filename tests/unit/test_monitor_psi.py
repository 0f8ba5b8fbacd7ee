"""PSI math and drift per agent and version, on generated events."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from warden.monitor import drift
from warden.monitor.events import DecisionEvent
from warden.monitor.psi import (
    EMPTY_SHARE,
    Histogram,
    Level,
    bin_values,
    level_of,
    psi,
    psi_counts,
    quantile_edges,
)


def test_psi_matches_hand_computed_values() -> None:
    # (0.25 - 0.5) ln(0.25/0.5) + (0.75 - 0.5) ln(0.75/0.5)
    assert psi([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.274653, abs=1e-6)
    # Three bins: 0.1 ln(0.4/0.3)... by hand: 0.028768 + 0.0 + 0.040547
    assert psi([0.3, 0.4, 0.3], [0.4, 0.4, 0.2]) == pytest.approx(0.069315, abs=1e-6)
    assert psi_counts({"a": 50, "b": 50}, {"a": 25, "b": 75}) == pytest.approx(0.274653, abs=1e-6)
    assert psi([0.2, 0.8], [0.2, 0.8]) == 0.0


def test_empty_bins_count_as_a_small_share_not_infinity() -> None:
    # The empty reference bin counts as 1e-4: 0.5 ln(0.5) term + (0.5 - 1e-4) ln(0.5 / 1e-4).
    value = psi([1.0, 0.0], [0.5, 0.5])
    assert math.isfinite(value)
    assert value == pytest.approx(4.604319, abs=1e-6)
    # A tool never seen in the reference is a large shift, and still finite.
    assert math.isfinite(psi_counts({"search_kb": 10}, {"search_kb": 5, "export": 5}))
    # Bins empty on both sides contribute nothing.
    assert psi([0.5, 0.0, 0.5], [0.5, 0.0, 0.5]) == 0.0
    # Nothing on one side: nothing to compare.
    assert psi_counts({}, {"a": 3}) == 0.0
    assert EMPTY_SHARE > 0


def test_levels_follow_the_thresholds() -> None:
    assert level_of(0.0999) is Level.OK
    assert level_of(0.1) is Level.WATCH
    assert level_of(0.2499) is Level.WATCH
    assert level_of(0.25) is Level.ACT
    assert level_of(5.0, enough=False) is Level.INSUFFICIENT


def test_bins_come_from_the_reference_quantiles() -> None:
    values = [float(v) for v in range(1, 11)]
    edges = quantile_edges(values, bins=5)
    assert edges == (3.0, 5.0, 7.0, 9.0)
    assert bin_values(values, edges).counts == (3, 2, 2, 2, 1)
    # Values past the reference's range fall in the end bins.
    assert bin_values([-100.0, 1000.0, math.nan], edges).counts == (1, 0, 0, 0, 1)
    # Few distinct values make few bins; one value makes one bin.
    assert quantile_edges([5.0] * 20) == ()
    assert bin_values([5.0, 5.0], ()).counts == (2,)
    with pytest.raises(ValueError, match="different bins"):
        Histogram((1.0,), (1, 1)).psi(Histogram((2.0,), (1, 1)))


shares = st.lists(st.integers(0, 1000), min_size=1, max_size=12)


@given(shares, shares)
def test_psi_is_finite_and_never_negative(a: list[int], b: list[int]) -> None:
    n = max(len(a), len(b))
    ref = {str(i): c for i, c in enumerate(a + [0] * (n - len(a)))}
    cur = {str(i): c for i, c in enumerate(b + [0] * (n - len(b)))}
    value = psi_counts(ref, cur)
    assert math.isfinite(value)
    assert value >= 0.0
    assert psi_counts(ref, ref) == 0.0


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=200))
def test_every_value_lands_in_exactly_one_bin(values: list[float]) -> None:
    edges = quantile_edges(values)
    assert list(edges) == sorted(set(edges))
    assert bin_values(values, edges).total == len(values)


def refunds(
    amounts: list[float], *, agent: str = "refunds-bot", version: str = "v1"
) -> list[DecisionEvent]:
    """Decision events of refunds of these amounts (allowed under 100, held above)."""
    return [
        DecisionEvent(
            ts=float(i),
            agent=agent,
            version=version,
            action_id=f"act_{i}",
            decision_id=f"dec_{i}",
            kind="tool_call",
            tool="issue_refund",
            effect="allow" if amount <= 100 else "require_approval",
            guard="policy",
            elapsed_us=400,
            numbers=(("issue_refund.amount", amount),),
        )
        for i, amount in enumerate(amounts)
    ]


def amounts(seed: int, low: float, high: float, n: int = 2000) -> list[float]:
    rng = random.Random(seed)
    return [round(rng.uniform(low, high), 2) for _ in range(n)]


def by_name(result: drift.DriftResult) -> dict[str, drift.Distribution]:
    return {d.name: d for d in result.distributions}


def test_refund_amounts_moving_up_cross_the_act_threshold() -> None:
    reference = refunds(amounts(1, 20, 100))
    shifted = refunds(amounts(2, 60, 140))
    [every, one] = drift.compute(reference, shifted)
    assert (one.agent, one.version, every.version) == ("refunds-bot", "v1", drift.ALL_VERSIONS)
    dist = by_name(one)
    assert dist["number:issue_refund.amount"].psi >= 0.25
    assert dist["number:issue_refund.amount"].level is Level.ACT
    assert dist["tools"].psi == 0.0  # still only refunds
    assert dist["effects"].level is not Level.OK  # half of them are held now
    assert one.level is Level.ACT


def test_an_unchanged_distribution_stays_under_watch() -> None:
    reference = refunds(amounts(1, 20, 100))
    same = refunds(amounts(3, 20, 100))
    [_, one] = drift.compute(reference, same)
    assert all(d.psi < 0.1 for d in one.distributions), one.as_dict()
    assert one.level is Level.OK


def test_too_few_samples_are_reported_as_insufficient() -> None:
    [_, one] = drift.compute(refunds([10.0] * 5), refunds([900.0] * 5))
    assert one.level is Level.INSUFFICIENT
    assert one.max_psi == 0.0
    # A version with no reference at all (a new canary) is insufficient, not an error.
    [_, new] = drift.compute([], refunds([50.0] * 40, version="v2"))
    assert new.version == "v2"
    assert new.level is Level.INSUFFICIENT


def test_versions_and_agents_are_separate_groups() -> None:
    reference = refunds(amounts(1, 20, 100), version="v1") + refunds(
        amounts(4, 20, 100), agent="other"
    )
    current = refunds(amounts(5, 20, 100), version="v1") + refunds(
        amounts(6, 300, 400), agent="other"
    )
    results = {(r.agent, r.version): r for r in drift.compute(reference, current)}
    assert results[("refunds-bot", "v1")].level is Level.OK
    assert results[("other", "v1")].level is Level.ACT
    assert [r.agent for r in drift.compute(reference, current, agent="other")] == ["other"] * 2


def test_a_profile_survives_its_json_form() -> None:
    profile = drift.profiles(refunds(amounts(1, 20, 100)))[("refunds-bot", "v1")]
    again = drift.Profile.from_dict(profile.as_dict())
    assert again == profile
    with pytest.raises(ValueError, match="not a drift profile"):
        drift.Profile.from_dict({"agent": "x"})


def test_a_numeric_argument_the_calls_stopped_carrying_is_drift() -> None:
    """Refunds that no longer carry ``amount`` as a number (renamed, sent as text, pushed
    out of the numbers kept) read ``act``, not ``insufficient``, which no alert fires on."""
    reference = refunds(amounts(1, 20, 100))
    hidden = [dataclasses.replace(e, numbers=()) for e in refunds(amounts(2, 900, 1000))]
    [_, one] = drift.compute(reference, hidden)
    amount = by_name(one)["number:issue_refund.amount"]
    assert amount.level is Level.ACT
    assert amount.psi >= 0.25
    assert amount.current_n == 0
    assert one.level is Level.ACT
    # Too few refunds in the window to tell: insufficient, as before.
    [_, few] = drift.compute(reference, hidden[:5])
    assert by_name(few)["number:issue_refund.amount"].level is Level.INSUFFICIENT
    # No refunds at all (the agent does other things): the tools moved, not the amounts.
    other = [dataclasses.replace(e, tool="get_order", numbers=()) for e in hidden]
    [_, moved] = drift.compute(reference, other)
    assert by_name(moved)["number:issue_refund.amount"].level is Level.INSUFFICIENT
    assert by_name(moved)["tools"].level is Level.ACT
