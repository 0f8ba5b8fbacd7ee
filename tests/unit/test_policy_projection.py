"""The projection the worker decides on: every read path finds in it what it finds in
the input, and functions given clauses through ref heads are not followed."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from warden.config import PolicyConfig
from warden.policy.bundle import Module
from warden.policy.cache import KIND, WILDCARD, InputShape, _Analysis, analyse, cache_key, project
from warden.policy.engine import PolicyEngine
from warden.policy.worker import Evaluator

# "$where" sorts before "*": read whole by one rule, and for its kind (object.get)
# through a wildcard by the other, whose stand-in "" once replaced the string.
WHERE = (
    "package warden\n\nimport rego.v1\n\n"
    'default decision := {"effect": "allow", "reason": "ok"}\n\n'
    'decision := {"effect": "deny", "reason": "$where JavaScript"} if {\n'
    '\tinput.action.tool == "db_find"\n'
    '\tregex.match(`function|=>`, input.action.arguments.filter["$where"])\n'
    "}\n\n"
    'decision := {"effect": "deny", "reason": "field operator"} if {\n'
    '\tinput.action.tool == "db_find"\n'
    "\tsome field\n"
    '\tobject.get(input.action.arguments.filter[field], "$function", null) != null\n'
    "}\n"
)
# A member the agent names "options" is read through the wildcard and for its
# members' kinds: the kind of its "value" once replaced the command.
OPTIONS = (
    "package warden\n\nimport rego.v1\n\n"
    'default decision := {"effect": "allow"}\n\n'
    'decision := {"effect": "deny", "reason": "shell"} if {\n'
    "\tsome k\n"
    "\tv := input.action.arguments[k].value\n"
    '\tcontains(v, "rm -rf")\n'
    "}\n\n"
    'decision := {"effect": "require_approval", "reason": "option"} if {\n'
    "\tsome o\n"
    '\tobject.get(input.action.arguments.options[o], "danger", false) == true\n'
    "}\n"
)
# A number read through a wildcard, and for its kind by a function: the int stand-in
# of a float once replaced it (the kind check told int from float).
NUMBER = (
    "package warden\n\nimport rego.v1\n\n"
    'decision := {"hot": hot, "has": has}\n\n'
    "default hot := false\n\n"
    "hot if {\n\tsome k\n\tinput[k].b > 0.4\n}\n\n"
    "default has := false\n\n"
    "has if present(input.a.b)\n\n"
    "present(_) := true\n"
)


def evaluator(*sources: str) -> Evaluator:
    return Evaluator([(f"m{i}.rego", s) for i, s in enumerate(sources)], {}, "data.warden.decision")


def decides_alike(sources: tuple[str, ...], docs: list[dict[str, Any]]) -> None:
    shape = analyse([Module(f"m{i}.rego", s) for i, s in enumerate(sources)])
    check = evaluator(*sources)
    for doc in docs:
        snapshot = copy.deepcopy(doc)
        projected = project(shape, doc)
        assert check.evaluate(dict(projected)) == check.evaluate(doc), (doc, projected)
        assert cache_key(shape, projected) == cache_key(shape, doc), (doc, projected)
        assert doc == snapshot  # the caller's input is never changed


def db_find(filter_: Any) -> dict[str, Any]:
    return {"action": {"tool": "db_find", "arguments": {"filter": filter_}}}


def shell(arguments: Any) -> dict[str, Any]:
    return {"action": {"tool": "shell", "arguments": arguments}}


def test_a_member_read_for_its_kind_keeps_a_value_read_whole() -> None:
    assert analyse([Module("p.rego", WHERE)]).paths == (
        ("action", "arguments", "filter", "$where"),
        ("action", "arguments", "filter", WILDCARD, KIND),
        ("action", "arguments", "filter", WILDCARD, "$function"),
        ("action", "tool"),
    )
    decides_alike(
        (WHERE,),
        [
            db_find({"$where": "function () { return true }"}),
            db_find({"$where": "function () { return true }", "a": {"$function": 1}}),
            db_find({"$where": ["function"], "a": 1}),
            db_find({"$where": 7, "b": {"$function": None}}),
            db_find({"$where": "x => 1", "z": "y"}),
            db_find({"$where": "safe"}),
        ],
    )


def test_a_kind_read_through_a_named_member_keeps_a_wildcard_read() -> None:
    decides_alike(
        (OPTIONS,),
        [
            shell({"options": {"value": "rm -rf /"}}),
            shell({"options": {"value": "rm -rf /", "x": {"danger": True}}}),
            shell({"cmd": {"value": "rm -rf /"}}),
            shell({"options": {"value": ["rm -rf /"]}, "cmd": {"value": "ls"}}),
            shell({"options": {"value": {"danger": True}}}),
        ],
    )


def test_a_number_read_for_its_kind_keeps_its_value() -> None:
    decides_alike(
        (NUMBER,),
        [{"a": {"b": 0.5}}, {"a": {"b": 0.25}}, {"a": {"b": 3}}, {"a": {}, "c": {"b": 1.5}}],
    )


# -- every path finds in the projection what it finds in the input ------------------------

# Member names around "*" in sort order, and one spelt like it.
NAMES = ["$w", " ", "*x", "a", "b", "z"]
documents = st.recursive(
    st.none() | st.booleans() | st.sampled_from([0, 7, 0.5, "", "s"]) | st.just([]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(NAMES), inner, min_size=1, max_size=4)
    ),
    max_leaves=12,
)
raw_paths = st.lists(
    st.tuples(
        st.lists(st.sampled_from([*NAMES, WILDCARD, WILDCARD]), min_size=1, max_size=3),
        st.booleans(),
    ),
    min_size=2,
    max_size=5,
)


def shape_of_paths(raw: list[tuple[list[str], bool]]) -> InputShape:
    """The shape :func:`analyse` makes of these reads below one member ``r`` (each
    ending in a kind read if flagged): no trailing wildcard, no path under another."""
    paths = set()
    for steps, kind in raw:
        path = ("r", *steps, *((KIND,) if kind else ()))
        while path and path[-1] == WILDCARD:
            path = path[:-1]
        paths.add(path)
    kept: list[tuple[str, ...]] = []
    for path in sorted(paths, key=len):
        if not any(path[: len(p)] == p for p in kept):
            kept.append(path)
    return InputShape(paths=tuple(sorted(kept)), deterministic=True)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw_paths, st.dictionaries(st.sampled_from(NAMES), documents, min_size=1, max_size=4))
# A member before "*" read whole, and every member's kind: "" replaced the value.
@example([(["$w"], False), (["*"], True)], {"$w": "s", "a": 1})
@example([(["$w"], False), (["*"], True)], {"$w": [1], "a": {}})
# The kind of a member's member under a name the wildcard also reaches.
@example([(["*", "b"], False), (["a", "*"], True)], {"a": {"b": "s"}})
# A float read through a wildcard, then for its kind (int 0 stands in for it).
@example([(["*", "b"], False), (["a", "b"], True)], {"a": {"b": 0.5}})
# A wildcard through a string that another wildcard's member holds as {}.
@example([(["*", "b"], False), (["a", "*", "b"], False)], {"a": "s"})
def test_the_projection_keys_as_the_input(raw: list[tuple[list[str], bool]], value: Any) -> None:
    # The worker decides on the projection alone: a path finding something else
    # there than in the input decides wrongly on every call, cached or not.
    shape = shape_of_paths(raw)
    doc = {"r": value, "other": 1}
    snapshot = orjson.dumps(doc)
    projected = project(shape, doc)
    assert cache_key(shape, projected) == cache_key(shape, doc), (shape.paths, doc, projected)
    assert orjson.dumps(doc) == snapshot


arguments = st.dictionaries(
    st.sampled_from(["$where", "options", "cmd", "a", "z"]),
    st.recursive(
        st.none()
        | st.booleans()
        | st.sampled_from([0, 1, "rm -rf /", "function", "ls", ""])
        | st.just([]),
        lambda inner: (
            st.lists(inner, max_size=2)
            | st.dictionaries(
                st.sampled_from(["value", "danger", "$function", "$where"]), inner, max_size=2
            )
        ),
        max_leaves=6,
    ),
    max_size=3,
)


@pytest.fixture(scope="module")
def repro_rules() -> list[tuple[InputShape, Evaluator]]:
    return [(analyse([Module("p.rego", s)]), evaluator(s)) for s in (WHERE, OPTIONS)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arguments)
def test_the_rules_decide_any_arguments_alike_projected(
    repro_rules: list[tuple[InputShape, Evaluator]], args: dict[str, Any]
) -> None:
    for shape, check in repro_rules:
        for doc in (db_find(args), shell(args), db_find(args.get("options", args))):
            assert check.evaluate(dict(project(shape, doc))) == check.evaluate(doc), doc


# -- a clause added through a ref head -----------------------------------------------------

CHECKS = (
    "package warden.checks\n\nimport rego.v1\n\n"
    'risky(action) if action.tool == "delete_account"\n\n'
    "flagged if risky(input.action)\n"
)


def ref_head_policy(head: str) -> str:
    return (
        "package warden\n\nimport rego.v1\n\n"
        'default decision := {"effect": "allow"}\n\n'
        'decision := {"effect": "require_approval"} if checks.flagged\n\n'
        f'{head} if {{\n\ta.tool == "issue_refund"\n\ta.arguments.amount > 500\n}}\n'
    )


@pytest.mark.parametrize(
    "head",
    [
        "checks.risky(a)",
        "checks . risky (a)",
        "checks.\nrisky(a)",
        'checks["risky"](a)',
        "limit := 5; checks.risky(a)",
    ],
)
def test_a_clause_added_through_a_ref_head_reads_its_argument(head: str) -> None:
    # data.warden.checks.risky gets a clause from package warden: the scan, which
    # finds heads by package, once followed risky() into checks.rego alone, and the
    # amount was cut from the projection (every refund allowed).
    sources = (CHECKS, ref_head_policy(head))
    shape = analyse([Module(f"m{i}.rego", s) for i, s in enumerate(sources)])
    assert shape.paths is not None
    assert ("action",) in shape.paths
    refund = {"action": {"tool": "issue_refund", "arguments": {"order": "A-1", "amount": 5000}}}
    decides_alike(sources, [refund, {"action": {"tool": "issue_refund", "arguments": {}}}])


def test_a_ref_head_stops_following_only_its_own_name() -> None:
    sources = (
        CHECKS + "\nsafe(a) if a.kind\n\nok if safe(input.action)\n",
        ref_head_policy("checks.risky(a)"),
    )
    shape = analyse([Module(f"m{i}.rego", s) for i, s in enumerate(sources)])
    assert shape.paths == (("action",),)
    # Without the ref head, both are followed.
    alone = analyse([Module("m0.rego", sources[0])])
    assert alone.paths == (("action", KIND), ("action", "kind"), ("action", "tool"))


def test_a_ref_head_whose_name_cannot_be_read_follows_nothing() -> None:
    source = (
        "package warden\n\nimport rego.v1\n\n"
        "ok if safe(input.action)\n\n"
        "safe(a) if a.kind\n\n"
        "checks[`risky` ](b) := 1\n"
    )
    assert analyse([Module("p.rego", source)]).paths == (("action", KIND), ("action", "kind"))
    odd = source.replace("checks[`risky` ](b)", "checks[x](b)")
    assert analyse([Module("p.rego", odd)]).paths == (("action",),)


# -- an import spelt with a bracketed string ---------------------------------------------

LIB = "package lib\n\nimport rego.v1\n\nrisky(action) if action.arguments.amount > 500\n"
# A helper of package warden with the imported function's name, in another module.
LOCAL_RISKY = (
    'package warden\n\nimport rego.v1\n\nrisky(action) if action.tool == "delete_account"\n'
)


def importing_policy(spelling: str) -> str:
    return (
        f"package warden\n\nimport rego.v1\n{spelling}\n\n"
        'default decision := {"effect": "allow", "reason": "ok"}\n\n'
        'decision := {"effect": "require_approval", "reason": "large refund"} if '
        "risky(input.action)\n"
    )


def refund(amount: int) -> dict[str, Any]:
    return {
        "agent": {"id": "bot"},
        "action": {
            "kind": "tool_call",
            "tool": "issue_refund",
            "arguments": {"order": "A-1", "amount": amount},
        },
        "mode": "enforce",
    }


@pytest.mark.parametrize(
    "spelling",
    [
        'import data.lib["risky"]',
        'import data["lib"]["risky"]',
        'import data.lib ["risky"]  # the platform checks',
        'import data.lib["ri\\u0073ky"]',
        'import data.lib["risky"] as risky',
    ],
)
def test_a_bracketed_import_binds_its_last_step(spelling: str) -> None:
    # risky in the importing module is data.lib.risky, which reads the amount: the
    # scan once recorded the import as `lib["     "]`, followed risky() into the
    # local helper, and cut the amount from the projection (every refund allowed).
    sources = (LIB, importing_policy(spelling), LOCAL_RISKY)
    shape = analyse([Module(f"m{i}.rego", s) for i, s in enumerate(sources)])
    assert shape.paths is not None
    assert ("action",) in shape.paths
    decides_alike(sources, [refund(5000), refund(5), {"action": {"tool": "delete_account"}}])


def test_an_import_whose_name_cannot_be_read_follows_nothing() -> None:
    followed = (("action", KIND), ("action", "tool"))
    local = LOCAL_RISKY + "\nflagged if risky(input.action)\n"
    assert analyse([Module("m.rego", local)]).paths == followed
    for spelling in ("import data.lib[`risky`]", "import data.lib[x]", 'import data.lib["*"]'):
        odd = local.replace("import rego.v1", f"import rego.v1\n{spelling}")
        assert analyse([Module("m.rego", odd)]).paths == (("action",),), spelling


# -- a reference continued on the next line, a package the scan cannot read --------------

# The same package as LIMITS (rego-cpp reads each spelling as warden.x): risky() has a
# clause in each, and flag reads through both.
HELPER = (
    "package PKG\n\nimport rego.v1\n\n"
    'risky(a) if a.tool == "delete_account"\n\n'
    "flag if risky(input.action)\n"
)
LIMITS = "package warden.x\n\nimport rego.v1\n\nrisky(b) if b.arguments.amount > 500\n"
FLAGGED = (
    "package warden\n\nimport rego.v1\nimport data.warden.x\n\n"
    'default decision := {"effect": "allow", "reason": "ok"}\n\n'
    'decision := {"effect": "deny", "reason": "risky"} if x.flag\n'
)
CONTINUED_IMPORTS = (
    "import data.lib  # the platform's checks\n.risky",
    "import data # c\n.lib.risky",
)
MISREAD_PACKAGES = ("warden[`x`]", "warden # helpers\n.x", "warden[ `x` ]", 'warden["\\u0078"]')


@pytest.mark.parametrize(
    "sources",
    [
        *((LIB, importing_policy(spelling), LOCAL_RISKY) for spelling in CONTINUED_IMPORTS),
        *((FLAGGED, HELPER.replace("PKG", pkg), LIMITS) for pkg in MISREAD_PACKAGES),
        (CHECKS, ref_head_policy("checks\n.risky(a)")),
    ],
)
def test_a_continued_reference_or_an_unread_package_reads_the_whole_input(
    sources: tuple[str, ...],
) -> None:
    # rego-cpp reads a "." on the next line, past a comment, as part of the reference,
    # and a raw-string step in a package: the scan once stopped at the comment (the
    # import bound `lib`, the package read `warden`), followed risky() into a helper
    # that reads the tool only, and cut the amount from the projection.
    assert analyse([Module(f"m{i}.rego", s) for i, s in enumerate(sources)]).whole_input
    decides_alike(sources, [refund(5000), refund(5), {"action": {"tool": "delete_account"}}])


@pytest.mark.parametrize("spelling", CONTINUED_IMPORTS)
def test_an_import_continued_past_a_comment_binds_no_name_the_scan_knows(spelling: str) -> None:
    analysis = _Analysis([Module("m.rego", importing_policy(spelling))], None)
    assert not analysis.follow
    assert analysis.imported == {"v1"}  # rego.v1 alone


def test_a_plain_package_keeps_the_projection() -> None:
    sources = (FLAGGED, HELPER.replace("PKG", 'warden ["x"]  # helpers'), LIMITS)
    assert analyse([Module(f"m{i}.rego", s) for i, s in enumerate(sources)]).paths == (
        ("action", KIND),
        ("action", "arguments", "amount"),
        ("action", "tool"),
    )
    decides_alike(sources, [refund(5000), refund(5)])


# -- whitespace the scan's patterns do not expect ------------------------------------------

NEEDS_REVIEW = (
    "package warden\n\nimport rego.v1\n\n"
    'default decision := {"effect": "allow", "reason": "ok"}\n\n'
    'decision := {"effect": "require_approval", "reason": "risky"} if '
    "needs_review(input.action)\n\n"
    'needs_review(a) if a.tool == "delete_account"\n\n'
    "SPACEneeds_review(b) if {\n"
    '\tb.tool == "issue_refund"\n'
    "\tb.arguments.amount > 500\n"
    "}\n"
)
OBJECT_GET = (
    "package warden\n\nimport rego.v1\n\n"
    'decision := object.get(input.session.calls, "refund", 0)\n'
    "SPACEobject.get(o, k, d) := o.x\n"
)


@pytest.mark.parametrize(
    ("sources", "docs"),
    [
        *(
            ((NEEDS_REVIEW.replace("SPACE", space),), [refund(5000), refund(5)])
            for space in ("\f", "\v", "\r")
        ),
        *(
            ((CHECKS, ref_head_policy(head)), [refund(5000), refund(5)])
            for head in ("\fchecks.risky(a)", 'checks\f["risky"](a)', "\vchecks.risky(a)")
        ),
        *(
            ((OBJECT_GET.replace("SPACE", space),), [{"session": {"calls": {"refund": 1, "x": 9}}}])
            for space in ("\f", "\v")
        ),
    ],
)
def test_a_form_feed_or_vertical_tab_reads_the_whole_input(
    sources: tuple[str, ...], docs: list[dict[str, Any]]
) -> None:
    # rego-cpp takes \f, \v and a lone \r as whitespace; before a head they once hid
    # it from the scan (a clause of needs_review, of checks.risky, a rule headed
    # object that makes object.get no builtin), and its reads were cut.
    assert analyse([Module(f"m{i}.rego", s) for i, s in enumerate(sources)]).whole_input
    decides_alike(sources, docs)


def test_windows_line_endings_keep_the_projection() -> None:
    source = NEEDS_REVIEW.replace("SPACE", "").replace("\n", "\r\n")
    assert analyse([Module("p.rego", source)]).paths == (
        ("action", KIND),
        ("action", "arguments", "amount"),
        ("action", "tool"),
    )
    decides_alike((source,), [refund(5000), refund(5)])


@pytest.mark.parametrize(
    ("files", "effect"),
    [
        (
            {
                "lib/lib.rego": LIB,
                "warden/main.rego": importing_policy('import data.lib["risky"]'),
                "warden/local.rego": LOCAL_RISKY,
            },
            "require_approval",
        ),
        ({"warden/main.rego": NEEDS_REVIEW.replace("SPACE", "\f")}, "require_approval"),
        *(
            (
                {
                    "lib/lib.rego": LIB,
                    "warden/main.rego": importing_policy(spelling),
                    "warden/local.rego": LOCAL_RISKY,
                },
                "require_approval",
            )
            for spelling in CONTINUED_IMPORTS
        ),
        *(
            (
                {
                    "warden/main.rego": FLAGGED,
                    "warden/helper.rego": HELPER.replace("PKG", pkg),
                    "warden/limits.rego": LIMITS,
                },
                "deny",
            )
            for pkg in MISREAD_PACKAGES[:2]
        ),
    ],
)
async def test_the_engine_decides_on_what_the_policy_reads(
    tmp_path: Path, files: dict[str, str], effect: str
) -> None:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / ".manifest").write_text(orjson.dumps({"roots": ["warden", "lib"]}).decode())
    config = PolicyConfig(bundles=(str(tmp_path),), workers=1, watch=False)
    engine = await PolicyEngine.start(config)
    try:
        assert engine.ready, engine.last_error
        assert (await engine.evaluate(refund(5000))).effect == effect
        assert (await engine.evaluate(refund(5))).effect == "allow"
    finally:
        await engine.close()
