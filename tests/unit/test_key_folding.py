"""Keys equal but for case, as Go's and .NET's JSON binders match them (simple folding)."""

from __future__ import annotations

import pytest

from warden.text import keys_fold_apart


@pytest.mark.parametrize(
    "keys",
    [
        ("path", "PATH"),
        ("amount", "Amount"),
        ("ſum", "sum"),  # U+017F, the long s: Go folds it to s
        ("\u212aey", "key"),  # the Kelvin sign is K
        ("straße", "STRAẞE"),  # U+1E9E, the capital sharp s, is ß
        ("σ", "ς"),  # final sigma
    ],
)
def test_keys_a_binder_reads_as_one_are_caught(keys: tuple[str, str]) -> None:
    assert not keys_fold_apart(dict.fromkeys(keys, 1))


@pytest.mark.parametrize(
    "keys",
    [
        ("Straße", "STRASSE"),  # full folding makes ß "ss"; Go and .NET keep them apart
        ("İd", "id"),  # the dotted capital I folds to nothing else in Go
        ("amount", "amount_usd"),
    ],
)
def test_keys_a_binder_keeps_apart_pass(keys: tuple[str, str]) -> None:
    assert keys_fold_apart(dict.fromkeys(keys, 1))
