"""Which input paths a policy reads, cache keys built from them, and the LRU."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from warden.policy.authoring import discover_case_files, load_case_file, load_policy_set
from warden.policy.bundle import Module
from warden.policy.cache import (
    KIND,
    WILDCARD,
    InputShape,
    LRUCache,
    analyse,
    cache_key,
    path_text,
    project,
)
from warden.policy.worker import Evaluator

BUNDLE = Path(__file__).resolve().parents[2] / "policies" / "customer-support"


def shape_of(*sources: str) -> InputShape:
    return analyse([Module(f"m{i}.rego", s) for i, s in enumerate(sources)])


def test_static_paths_are_collected_and_minimised() -> None:
    shape = shape_of(
        "package warden\n"
        'x if input.action.tool == "refund"\n'
        "y if input.action.arguments.amount > 10\n"
        "z if count(input.action.arguments) > 1\n"
        'w if input["budget"]["refunds"] > 0\n'
    )
    assert shape.paths == (("action", "arguments"), ("action", "tool"), ("budget", "refunds"))
    assert shape.deterministic


def test_dynamic_step_keys_on_the_parent() -> None:
    shape = shape_of("package warden\nx if { some k; input.action.arguments[k] == 1 }\n")
    assert shape.paths == (("action", "arguments"),)


@pytest.mark.parametrize(
    "body",
    [
        'x := object.get(input, "budget", {})',
        "x := input",
        "x if input[k]",
        "import input\ny := 1",
    ],
)
def test_whole_input_when_read_as_a_whole(body: str) -> None:
    assert shape_of(f"package warden\n{body}\n").whole_input


def test_a_quote_in_a_comment_starts_no_string() -> None:
    # A lone backtick in a comment once opened a "raw string" running to the next
    # backtick, and the reads in between went unseen (the key came out empty).
    shape = shape_of(
        "package warden\n# block `rm and friends\n"
        'deny if input.action.tool == "rm"\n'
        "deny if input.action.arguments.force\n# and `this`\n"
    )
    assert shape.paths == (("action", "arguments", "force"), ("action", "tool"))


def test_a_template_string_reads_the_whole_input() -> None:
    # Its {expressions} are code inside a literal: the scan cannot follow them.
    source = 'package warden\ndeny if $"{input.action.tool}:{input.action.arguments.op}" == "x"\n'
    assert shape_of(source).whole_input


def test_strings_and_comments_are_not_references() -> None:
    shape = shape_of(
        'package warden\n# input is read below\nmsg := "input alone"\nx if input.action.tool\n'
    )
    assert shape.paths == (("action", "tool"),)


@pytest.mark.parametrize(
    "call",
    [
        "time.now_ns()",
        "uuid.rfc4122(x)",
        "rand.intn(x, 2)",
        "http.send(r)",
        "opa.runtime()",
        "crypto.x509.parse_and_verify_certificates(c)",  # reads the clock
    ],
)
def test_non_deterministic_builtins_disable_caching(call: str) -> None:
    assert not shape_of(f"package warden\nx := {call}\ny := input.a\n").deterministic


def test_key_depends_only_on_read_paths() -> None:
    shape = shape_of("package warden\nx if input.action.tool == 1\n")
    a = {"action": {"tool": "t", "arguments": {"x": 1}}, "context": {"trace": "1"}}
    b = {"action": {"tool": "t", "arguments": {"x": 2}}, "context": {"trace": "2"}}
    assert cache_key(shape, a) == cache_key(shape, b)
    assert cache_key(shape, a) != cache_key(shape, {"action": {"tool": "u"}})


def test_missing_and_null_differ() -> None:
    shape = shape_of("package warden\nx if input.action.tool == null\n")
    assert cache_key(shape, {"action": {}}) != cache_key(shape, {"action": {"tool": None}})
    assert project(shape, {"action": {}}) == {}
    assert project(shape, {"action": {"tool": None}, "x": 1}) == {"action": {"tool": None}}


def test_whole_input_key_ignores_key_order() -> None:
    shape = InputShape(paths=None, deterministic=True)
    assert cache_key(shape, {"a": 1, "b": {"c": 2, "d": 3}}) == cache_key(
        shape, {"b": {"d": 3, "c": 2}, "a": 1}
    )
    doc = {"a": 1}
    assert project(shape, doc) is doc


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=3),
    lambda inner: (
        st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=2), inner, max_size=2)
    ),
    max_leaves=4,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values, json_values, json_values, json_values, json_values)
def test_keys_follow_only_the_read_paths(
    tool: Any, args: Any, other_tool: Any, noise_a: Any, noise_b: Any
) -> None:
    shape = shape_of("package warden\nx if input.action.tool\ny if input.action.arguments\n")
    a = {"action": {"tool": tool, "arguments": args, "kind": noise_a}, "context": noise_a}
    b = {"action": {"tool": tool, "arguments": args, "kind": noise_b}, "context": noise_b}
    assert cache_key(shape, a) == cache_key(shape, b)
    c = {"action": {"tool": other_tool, "arguments": args}}
    # Compare as JSON: Python says True == 1, Rego does not.
    differs = orjson.dumps(tool, option=orjson.OPT_SORT_KEYS) != orjson.dumps(
        other_tool, option=orjson.OPT_SORT_KEYS
    )
    assert (cache_key(shape, a) != cache_key(shape, c)) == differs


def test_function_parameters_are_followed() -> None:
    shape = shape_of(
        "package warden\n"
        "d := verdict(input.action, input.budget)\n"
        "verdict(action, budget) := check(action.tool, budget) if {\n"
        "\tis_object(action.arguments)\n"
        '} else := 1 if action.kind == "llm_call"\n'
        "check(tool, b) := b.refunds.day if tool\n"
        "check(_, _) := 0\n"
    )
    assert shape.paths == (
        ("action", KIND),  # a call with an undefined argument is undefined
        ("action", "arguments"),
        ("action", "kind"),
        ("action", "tool"),
        ("budget", KIND),
        ("budget", "refunds", "day"),
    )


@pytest.mark.parametrize(
    "rest",
    [
        "f(a) := a",  # the parameter read whole
        "f(a) := 1 if {\n\tis_object(a)\n}",  # passed whole to a builtin
        "f(a) := 1 if a[k]",  # a dynamic step
        'f({"tool": a}) := a',  # a pattern parameter
        "f(a) := a.x\nf(1) := 2",  # a literal parameter compares the whole value
        "f(a) := a.x\ny := f(1) with f as g",  # `with` can replace the function
        "import data.lib.f\nf(a) := a.x",  # the name may mean an imported function
        "f(a, a) := a.x",  # the second use compares the value
        "g(a) := a.x",  # not a bundle function (a builtin or undefined)
    ],
)
def test_unfollowable_calls_keep_the_argument_whole(rest: str) -> None:
    shape = shape_of(f"package warden\nd := f(input.action, 1)\n{rest}\n")
    assert shape.paths is not None
    assert ("action",) in shape.paths


@pytest.mark.parametrize("gap", [" ", "\t", "\n"])
def test_a_head_with_space_before_its_parameters_is_a_head(gap: str) -> None:
    # rego-cpp takes "safe (b)" and even "safe\n(b)" as the head of safe.
    shape = shape_of(
        "package warden\n"
        "d if safe(input.action)\n"
        "safe(a) := true if a.tool\n"
        f'safe{gap}(b) := true if b.arguments.path == "/tmp"\n'
    )
    assert shape.paths == (("action", KIND), ("action", "arguments", "path"), ("action", "tool"))


def test_a_function_of_another_package_is_not_the_one_called() -> None:
    # In package warden, count(...) is the builtin: lib's count reads nothing of it.
    shape = shape_of(
        "package warden\nd if count(input.action.arguments) > 1\n",
        "package lib\ncount(x) := x.n\n",
    )
    assert shape.paths == (("action", "arguments"),)
    # A function of the same package is the one called, builtin's name or not.
    same = shape_of("package warden\nd if count(input.action.arguments) > 1\ncount(x) := x.n\n")
    assert same.paths == (("action", "arguments", KIND), ("action", "arguments", "n"))


def test_an_extra_argument_is_the_output_and_reads_the_whole() -> None:
    shape = shape_of("package warden\nd if f(1, input.action)\nf(a) := a.x\n")
    assert shape.paths == (("action",),)


def test_shipped_bundle_reads_only_the_fields_it_uses_and_decides_the_same() -> None:
    policy = load_policy_set([BUNDLE])
    shape = analyse(policy.production, policy.data)
    account_changes = ("close_account", "update_address", "update_email", "update_phone")
    assert shape.paths == (
        ("action", KIND),
        ("action", "arguments"),
        ("action", "input_responses"),  # an MCP retry's answers
        ("action", "kind"),
        ("action", "labels"),  # taint labels of the tool (session rules)
        ("action", "stage"),  # MCP tools/list entries are answered by name
        ("action", "tool"),
        ("budget",),
        ("history", KIND),
        # Four fields of each earlier call in the conversation (session rules).
        ("history", "*", "arguments", "order_id"),
        ("history", "*", "arguments", "query"),
        ("history", "*", "tool"),
        ("history", "*", "verified"),
        ("request", "tools"),  # hosted MCP servers a model request declares
        ("session", KIND),
        ("session", "available"),  # counters unread (an outage) hold a sensitive sink
        # Only the account-change tools' counters (data.warden.sessions).
        ("session", "calls", KIND),
        *(("session", "calls", tool) for tool in account_changes),
        ("session", "conversation"),
        ("session", "held", KIND),
        *(("session", "held", tool) for tool in account_changes),
        ("session", "taints"),
        ("session", "truncated"),  # a history cut by the bounds holds a sensitive sink
    )
    evaluator = Evaluator(
        [(m.path, m.source) for m in policy.production], policy.data, "data.warden.decision"
    )
    cases = [c for f in discover_case_files([BUNDLE]) for c in load_case_file(f).cases]
    assert len(cases) >= 30
    for case in cases:
        doc = dict(case.input)
        # The projection decides exactly as the whole input does.
        assert evaluator.evaluate(dict(project(shape, doc))) == evaluator.evaluate(doc), case.name


def test_a_key_read_whole_and_through_a_wildcard_keeps_its_value() -> None:
    # "$where" sorts before "*": the wildcard's empty placeholder for that member
    # once replaced the string the first rule reads, and the deny never fired.
    source = (
        "package warden\n\nimport rego.v1\n\ndefault deny := false\n\n"
        'deny if startswith(input.action.arguments.filter["$where"], "function")\n\n'
        'deny if {\n\tsome k\n\tinput.action.arguments.filter[k].op == "drop"\n}\n'
    )
    shape = shape_of(source)
    arguments = {"filter": {"$where": "function () { return true }", "a": {"op": "eq"}}}
    doc = {"action": {"arguments": arguments}}
    snapshot = copy.deepcopy(doc)
    projected = project(shape, doc)
    assert projected["action"]["arguments"]["filter"]["$where"].startswith("function")
    assert doc == snapshot  # the caller's arguments are never changed
    evaluator = Evaluator([("p.rego", source)], {}, "data.warden.deny")
    assert evaluator.evaluate(dict(projected)) == evaluator.evaluate(doc)


def test_lru_evicts_least_recently_used() -> None:
    cache: LRUCache[str, int] = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1
    cache.put("c", 3)
    assert cache.get("b") is None
    assert cache.get("a") == 1
    assert len(cache) == 2
    cache.clear()
    assert len(cache) == 0
    off: LRUCache[str, int] = LRUCache(0)
    off.put("a", 1)
    assert off.get("a") is None


# -- what a call with a missing argument decides --------------------------------------------

MISSING_MEMBER = (
    "package warden\n\nimport rego.v1\n\n"
    'decision := "deny" if bad(input.action.arguments) else := "allow"\n\n'
    "bad(a) if not a.approved_by\n"
)


@pytest.mark.parametrize(
    "arguments", [{"amount": 5}, {}, "approve it", [], None, {"approved_by": "lead"}, ...]
)
def test_a_function_argument_without_the_members_read_is_still_passed(arguments: Any) -> None:
    # Reading a.approved_by is not all bad() reads: a call whose argument is
    # undefined is undefined. Projected to nothing but approved_by, arguments
    # without one vanished, bad() became undefined and the deny turned to allow.
    shape = shape_of(MISSING_MEMBER)
    doc: dict[str, Any] = {"action": {"tool": "refund"}}
    if arguments is not ...:
        doc["action"]["arguments"] = arguments
    evaluator = Evaluator([("p.rego", MISSING_MEMBER)], {}, "data.warden.decision")
    assert evaluator.evaluate(dict(project(shape, doc))) == evaluator.evaluate(doc)


def test_the_key_holds_the_kind_of_a_function_argument() -> None:
    shape = shape_of(MISSING_MEMBER)
    kinds: list[Any] = [{"amount": 5}, {"other": 1}, "x", "y", [], [1], 0, 1, None]
    keys = [cache_key(shape, {"action": {"arguments": a}}) for a in kinds]
    keys.append(cache_key(shape, {"action": {}}))
    # Objects without the member are one input; so are two strings, two lists, two numbers.
    for a, b in ((0, 1), (2, 3), (4, 5), (6, 7)):
        assert keys[a] == keys[b], kinds[a]
    assert len({keys[0], keys[2], keys[4], keys[6], keys[8], keys[9]}) == 6


# -- object.get reads one member ----------------------------------------------------------

COUNTED = (
    "package warden\n\nimport rego.v1\n\n"
    'decision := {"used": changes(input.session)}\n\n'
    "changes(s) := sum([n |\n"
    "\tsome tool in data.limits.counted\n"
    "\tn := object.get(s.calls, tool, 0)\n"
    "])\n"
)
LIMITS = {"limits": {"counted": ["close_account", "update_email"]}}


def counted_shape(source: str | list[str] = COUNTED, data: Any = LIMITS) -> InputShape:
    sources = [source] if isinstance(source, str) else source
    return analyse([Module(f"m{i}.rego", s) for i, s in enumerate(sources)], data)


def test_object_get_with_a_key_from_data_reads_only_those_members() -> None:
    shape = counted_shape()
    assert shape.paths == (
        ("session", KIND),
        ("session", "calls", KIND),
        ("session", "calls", "close_account"),
        ("session", "calls", "update_email"),
    )
    base: dict[str, Any] = {"session": {"calls": {"get_order": 1, "close_account": 1}}}
    # Calls of tools the policy never counts leave the key alone.
    assert cache_key(shape, base) == cache_key(
        shape, {"session": {"calls": {"get_order": 7, "close_account": 1}}}
    )
    others: list[dict[str, Any]] = [
        {"session": {"calls": {"get_order": 1, "close_account": 2}}},
        {"session": {"calls": {"get_order": 1, "close_account": 1, "update_email": 0}}},
        {"session": {"calls": {}}},
        {"session": {"calls": "none"}},
        {"session": {}},
    ]
    for other in others:
        assert cache_key(shape, base) != cache_key(shape, other), other
    evaluator = Evaluator([("p.rego", COUNTED)], LIMITS, "data.warden.decision")
    for doc in [base, *others]:
        assert evaluator.evaluate(dict(project(shape, doc))) == evaluator.evaluate(doc), doc


def test_object_get_with_a_string_key_reads_that_member() -> None:
    shape = shape_of('package warden\nd := object.get(input.session.calls, "refund", 0)\n')
    assert shape.paths == (("session", "calls", KIND), ("session", "calls", "refund"))


@pytest.mark.parametrize(
    ("source", "data"),
    [
        # Declared outside the comprehension: it may hold anything there.
        (COUNTED.replace("sum([n |\n\tsome tool in data.limits.counted\n", "sum([n |\n"), LIMITS),
        # Used beyond the key: bound some other way too.
        (COUNTED.replace("\tn := object", "\ttool != input.action.tool\n\tn := object"), LIMITS),
        # A rule could define the list, or a package holds rules below it.
        ([COUNTED, 'package limits\n\ncounted := ["x"]\n'], LIMITS),
        ([COUNTED, "package limits\n\ndefault counted := []\n"], LIMITS),
        ([COUNTED, "package limits.counted\n\nx := 1\n"], LIMITS),
        # The list holds something other than strings, or is missing, or no data given.
        (COUNTED, {"limits": {"counted": ["close_account", 1]}}),
        (COUNTED, {"limits": {}}),
        (COUNTED, None),
        # The key is an expression, or a path through the list.
        (COUNTED.replace("s.calls, tool, 0", 's.calls, concat("", [tool]), 0'), LIMITS),
        (COUNTED.replace("data.limits.counted\n", "data.limits.counted[0]\n"), LIMITS),
        # Declared in a comprehension inside: the key is the parameter.
        (
            COUNTED.replace("changes(input.session)", "changes(input.session, input.action.tool)")
            .replace("changes(s) :=", "changes(s, tool) :=")
            .replace(
                "\tsome tool in data.limits.counted\n", "\t[1 | some tool in data.limits.counted]\n"
            ),
            LIMITS,
        ),
        # A package spelled with space around its dots is limits.counted.
        ([COUNTED, "package limits .counted\n\nx := 1\n"], LIMITS),
        # Two rules on one line: the second defines the list.
        ([COUNTED, 'package limits\n\nx := 1; counted := ["a"]\n'], LIMITS),
        # `with` can replace data.
        (
            "package warden\n\nimport rego.v1\n\n"
            "d := sum([n | some tool in data.limits.counted; "
            "n := object.get(input.session.calls, tool, 0)])\n\n"
            'y := d with data.limits.counted as ["x"]\n',
            LIMITS,
        ),
    ],
)
def test_object_get_keys_that_cannot_be_pinned_read_the_whole_object(
    source: str | list[str], data: Any
) -> None:
    shape = counted_shape(source, data)
    assert shape.paths is not None
    assert ("session", "calls") in shape.paths or ("session",) in shape.paths


TOOLS = ("get_order", "issue_refund", "close_account", "update_email", "update_phone")
counters = st.dictionaries(st.sampled_from(TOOLS), st.integers(0, 3), max_size=4)
sessions = st.fixed_dictionaries(
    {},
    optional={
        "calls": counters | st.just("none"),
        "held": counters,
        "taints": st.lists(st.sampled_from(["untrusted_output", "pii"]), max_size=2),
        "conversation": st.booleans(),
    },
)


@pytest.fixture(scope="module")
def shipped() -> tuple[InputShape, Evaluator, list[dict[str, Any]]]:
    policy = load_policy_set([BUNDLE])
    evaluator = Evaluator(
        [(m.path, m.source) for m in policy.production], policy.data, "data.warden.decision"
    )
    cases = [c for f in discover_case_files([BUNDLE]) for c in load_case_file(f).cases]
    return analyse(policy.production, policy.data), evaluator, [dict(c.input) for c in cases]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), sessions | st.none())
def test_the_shipped_bundle_decides_any_session_alike_projected(
    shipped: tuple[InputShape, Evaluator, list[dict[str, Any]]], data: Any, session: Any
) -> None:
    # Session counters in any shape, on every case's action: the projection,
    # with only the account-change counters in it, decides as the whole input.
    shape, evaluator, inputs = shipped
    doc = dict(data.draw(st.sampled_from(inputs)))
    if session is None:
        doc.pop("session", None)
    else:
        doc["session"] = session
    assert evaluator.evaluate(dict(project(shape, doc))) == evaluator.evaluate(doc)


def decides_alike(source: str, docs: list[dict[str, Any]], data: Any = None) -> None:
    """Every doc decides the same projected as whole, with the bundle analysed as shipped."""
    shape = analyse([Module("p.rego", source)], data)
    evaluator = Evaluator([("p.rego", source)], data or {}, "data.warden.decision")
    for doc in docs:
        assert evaluator.evaluate(dict(project(shape, doc))) == evaluator.evaluate(doc), doc


def test_a_kind_is_kept_where_a_wildcard_found_nothing_below() -> None:
    # The wildcard's empty object for a member without "$where" once stood in for
    # the string filter, and object.get on {} gave its default: the deny was lost.
    decides_alike(
        "package warden\n\nimport rego.v1\n\n"
        'default decision := {"effect": "allow"}\n\n'
        'decision := {"effect": "deny", "reason": "$where"} if {\n'
        "\tsome k\n"
        '\tinput.action.arguments[k]["$where"]\n'
        "}\n\n"
        'decision := {"effect": "deny", "reason": "filter"} if {\n'
        '\tinput.action.tool == "db_query"\n'
        "\tnot safe_filter(input.action.arguments.filter)\n"
        "}\n\n"
        'safe_filter(f) if object.get(f, "op", "find") in {"find", "count"}\n',
        [
            {"action": {"tool": "db_query", "arguments": {"filter": filter_}}}
            for filter_ in ("db.dropDatabase()", ["drop"], {"op": "drop"}, {"op": "find"}, {})
        ],
    )


def test_a_bracket_on_the_next_line_starts_a_new_expression() -> None:
    # rego-cpp reads `argv` then a new expression `["rm"] == ...`: not argv["rm"].
    source = (
        "package warden\n\nimport rego.v1\n\n"
        'default decision := {"effect": "allow"}\n\n'
        'decision := {"effect": "deny"} if {\n'
        "\targv := input.action.arguments.argv\n"
        '\t["rm"] == array.slice(argv, 0, 1)\n'
        "}\n"
    )
    assert shape_of(source).paths == (("action", "arguments", "argv"),)
    decides_alike(source, [{"action": {"arguments": {"argv": a}}} for a in (["rm", "-rf"], ["ls"])])


@pytest.mark.parametrize(
    "modules",
    [
        # An import as object: object.get is the imported function.
        [
            "package warden\n\nimport rego.v1\nimport data.lib.objects as object\n\n"
            'd := object.get(input.action.arguments, "options.recursive", false)\n',
            "package lib.objects\n\nimport rego.v1\n\n"
            'get(o, path, fallback) := o[a][b] if [a, b] := split(path, ".") else := fallback\n',
        ],
        # A package named object: rego-cpp resolves object.get to it.
        [
            'package warden\n\nd := object.get(input.action.arguments, "options.recursive", 0)\n',
            "package object\n\nget(o, k, d) := o\n",
        ],
        # A rule headed object.get in the same package (after a `;` too).
        [
            'package warden\n\nd := object.get(input.action.arguments, "options.recursive", 0)\n'
            "x := 1; object.get(o, k, d) := o\n"
        ],
    ],
)
def test_object_get_that_a_module_can_redefine_is_not_narrowed(modules: list[str]) -> None:
    shape = analyse([Module(f"m{i}.rego", s) for i, s in enumerate(modules)])
    assert shape.paths == (("action", "arguments"),)


def test_a_clock_read_spelled_with_space_is_not_cached() -> None:
    for spelled in ("time .now_ns()", "time\n\t.now_ns()", "time.\n\tnow_ns()"):
        assert not shape_of(f"package warden\nd := {spelled}\n").deterministic


def test_a_deep_chain_of_functions_reads_the_whole_input() -> None:
    chain = "".join(f"f{i}(x) := f{i + 1}(x)\n" for i in range(400))
    shape = shape_of(f"package warden\nd := f0(input.action)\n{chain}f400(x) := x.tool\n")
    assert shape.whole_input


def test_many_counted_keys_in_one_body_are_read_once() -> None:
    # One scan of the body serves every object.get in it (this once took minutes).
    terms = " + ".join(f"object.get(s.calls{i}, tool, 0)" for i in range(1000))
    source = COUNTED.replace("object.get(s.calls, tool, 0)", terms)
    shape = counted_shape(source)
    assert shape.paths is not None
    assert ("session", "calls999", "update_email") in shape.paths


def test_paths_read_as_operators_see_them() -> None:
    assert path_text(("session", "calls", KIND)) == "session.calls.(kind)"
    assert path_text(("history", WILDCARD, "tool")) == "history.*.tool"


def test_a_value_read_member_by_member_too_often_is_read_whole() -> None:
    # Each object.get with its own key is a path of the key: hundreds would make every
    # decision's key cost more than the cache saves.
    rules = "".join(
        f'd{i} if object.get(input.action.arguments, "k{i}", 0) > 1\n' for i in range(40)
    )
    shape = shape_of(f"package warden\n{rules}")
    assert shape.paths == (("action", "arguments"),)
    few = shape_of('package warden\nd if object.get(input.action.arguments, "k", 0) > 1\n')
    assert few.paths == (("action", "arguments", KIND), ("action", "arguments", "k"))


def test_a_head_after_a_semicolon_is_followed() -> None:
    # rego-cpp reads a second rule after ";" on one line: its reads count too, or a
    # cached (and projected) decision for one tool would answer for another.
    shape = shape_of(
        "package warden\n"
        "risky(x) if x.arguments.amount > 1000\n"
        'refund_limit := 500; risky(a) if a.tool == "delete_account"\n'
        'decision := {"effect": "deny"} if risky(input.action)\n'
    )
    assert shape.paths is not None
    assert ("action", "tool") in shape.paths or ("action",) in shape.paths


@pytest.mark.parametrize("cut", ["data.warden.", "3 %"])
def test_a_statement_broken_after_a_dot_or_percent_goes_on(cut: str) -> None:
    # rego-cpp carries "f(x) if data.warden." onto the next line: "g(x) = 1" there is
    # the rest of that statement, not a head, so its x is a read, not a parameter.
    shape = shape_of(
        "package warden\n"
        'g(y) := 1 if y.b == "evil"\n'
        f"f(x) if {cut}\n"
        "g(x) = 1\n"
        "deny if f(input.action)\n"
    )
    assert shape.paths is not None
    assert any(p[:2] == ("action", "b") or p == ("action",) for p in shape.paths), shape.paths
