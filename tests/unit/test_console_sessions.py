"""Console sessions: expiry, bounds, sign-out and CSRF token comparison."""

from __future__ import annotations

from warden.admin.auth import Principal
from warden.console.sessions import SessionStore, same_token

DANA = Principal("dana", frozenset({"approver"}))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_session_lives_until_its_ttl_and_not_after() -> None:
    clock = Clock()
    store = SessionStore(60, clock=clock)
    sid, session = store.create(DANA)
    assert store.get(sid) == session
    assert session.expires_at == 1060.0
    clock.now = 1059.9
    assert store.get(sid) is not None
    clock.now = 1060.0
    assert store.get(sid) is None
    assert len(store) == 0


def test_ids_and_csrf_tokens_are_random_and_distinct() -> None:
    store = SessionStore(60)
    a_id, a = store.create(DANA)
    b_id, b = store.create(DANA)
    assert a_id != b_id
    assert a.csrf != b.csrf
    assert len(a_id) >= 40


def test_unknown_oversized_and_dropped_ids_find_nothing() -> None:
    store = SessionStore(60)
    sid, _ = store.create(DANA)
    assert store.get(None) is None
    assert store.get("nope") is None
    assert store.get("x" * 1000) is None
    store.drop(sid)
    assert store.get(sid) is None


def test_the_store_is_bounded_and_drops_the_oldest() -> None:
    store = SessionStore(60, limit=3)
    first, _ = store.create(DANA)
    for _ in range(3):
        store.create(DANA)
    assert len(store) == 3
    assert store.get(first) is None


def test_same_token_needs_an_exact_non_empty_match() -> None:
    assert same_token("abc", "abc")
    assert not same_token("abc", "abd")
    assert not same_token("abc", "")
    assert not same_token("abc", None)
    assert not same_token("abc", "\udcff")  # a lone surrogate from a form is just wrong


def test_a_person_signing_in_again_and_again_drops_only_their_own_oldest_sessions() -> None:
    store = SessionStore(60, limit=20, per_person=3)
    ada = Principal("ada", frozenset({"admin"}))
    kept, _ = store.create(ada)
    vic = Principal("vic", frozenset({"viewer"}))
    theirs = [store.create(vic)[0] for _ in range(50)]
    assert store.get(kept) is not None  # a viewer's flood cannot sign the admin out
    assert [store.get(s) is not None for s in theirs[-4:]] == [False, True, True, True]
    assert len(store) == 4
    store.drop(theirs[-1])
    assert len(store) == 3


def test_a_change_of_roles_ends_the_persons_other_proxy_made_sessions() -> None:
    store = SessionStore(60)
    admin = Principal("dana", frozenset({"admin"}))
    laptop, _ = store.create(admin, via="sso")
    phone, _ = store.create(admin, via="sso")
    typed, _ = store.create(admin)  # signed in with an admin token: not the proxy's word
    store.drop_sso("dana", keep=DANA)  # the proxy now names her an approver
    assert store.get(laptop) is None
    assert store.get(phone) is None
    assert store.get(typed) is not None
    kept, _ = store.create(DANA, via="sso")
    store.drop_sso("dana", keep=DANA)
    assert store.get(kept) is not None
