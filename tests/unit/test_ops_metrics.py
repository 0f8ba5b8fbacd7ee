"""The cached metric children: the same child as labels(), resolved once."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, generate_latest

from warden.ops import metrics


def test_child_is_the_labelled_child_and_counts_into_it() -> None:
    before = REGISTRY.get_sample_value("warden_errors_total", {"code": "child_test"}) or 0
    first = metrics.child(metrics.ERRORS, "child_test")
    assert first is metrics.ERRORS.labels("child_test")
    assert metrics.child(metrics.ERRORS, "child_test") is first
    first.inc()
    assert REGISTRY.get_sample_value("warden_errors_total", {"code": "child_test"}) == before + 1


def test_children_of_different_metrics_or_labels_are_kept_apart() -> None:
    a = metrics.child(metrics.REQUESTS, "openai", "200")
    b = metrics.child(metrics.REQUESTS, "openai", "503")
    c = metrics.child(metrics.STREAM_VIOLATIONS, "openai")
    assert len({id(a), id(b), id(c)}) == 3


def test_the_memo_stays_bounded() -> None:
    for i in range(metrics._MAX_CHILDREN + 5):
        metrics.child(metrics.AMBIGUOUS_CALL_IDS, f"u{i}")
    assert len(metrics._children) <= metrics._MAX_CHILDREN
    metrics._children.clear()
    for i in range(metrics._MAX_CHILDREN + 5):
        metrics.AMBIGUOUS_CALL_IDS.remove(f"u{i}")


def test_long_label_values_are_cut() -> None:
    # Tool names come from agents, up to the body limit: a megabyte name must not
    # become a megabyte in every scrape.
    name = "t" * 1_000_000
    label = metrics.bounded("tool-length-test", name)
    assert len(label) == metrics.MAX_LABEL_CHARS
    assert label.endswith("…")
    assert metrics.bounded("tool-length-test", "short") == "short"


def test_a_label_with_a_lone_surrogate_leaves_the_exposition_readable() -> None:
    # A tool name a model's answer escaped as "\ud800": one such label would fail
    # every later scrape (the exposition is UTF-8).
    registry = CollectorRegistry()
    counter = Counter("surrogate_test_total", "A test counter.", ["tool"], registry=registry)
    counter.labels(metrics.bounded("tool-surrogate-test", "safe\ud800")).inc()
    assert 'tool="safe\ufffd"' in generate_latest(registry).decode()
