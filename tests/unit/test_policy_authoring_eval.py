"""``warden policy eval`` (warden.policy.authoring.eval)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.policy_authoring_samples import POLICY, TESTS, write_bundle
from warden.policy.authoring import evaluate_input, load_policy_set


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bundle(
        tmp_path_factory.mktemp("mixed"), {"policy.rego": POLICY, "policy_test.rego": TESTS}
    )


def test_evaluate_input_gives_the_decision_and_timings(mixed: Path) -> None:
    policy = load_policy_set([mixed])
    result = evaluate_input(policy, {"amount": 3}, repeat=5)
    assert not result.error
    assert result.result == {"effect": "allow", "reason": "small amount"}
    assert len(result.times_us) == 5
    doc = result.to_json(query="data.warden.decision", revision=policy.revision)
    assert doc["timing"]["runs"] == 5
    assert evaluate_input(policy, {"amount": 300}).undefined
