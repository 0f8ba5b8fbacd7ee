"""The route allowlist: what Warden parses, what passes as a plain call, what it refuses."""

from __future__ import annotations

import pytest

from warden.config import load_config
from warden.errors import ConfigError
from warden.protocols.registry import (
    PassthroughRule,
    RouteMatch,
    base_segments,
    deployment_named,
    foreign_prefix,
    match_route,
    past_base,
)

GOVERNED = "governed"
PLAIN = "plain"
REFUSED = "refused"


def classify(match: RouteMatch | None) -> str:
    if match is None:
        return REFUSED
    return f"{GOVERNED}:{match.adapter.name}" if match.adapter is not None else PLAIN


def route(family: str, method: str, tail: str, passthrough: tuple[str, ...] = ()) -> str:
    rules = [PassthroughRule.parse(spec) for spec in passthrough]
    return classify(match_route(family, method, tail.split("/"), rules))


@pytest.mark.parametrize(
    ("family", "method", "tail", "expected"),
    [
        ("openai", "POST", "v1/chat/completions", "governed:openai.chat"),
        ("openai", "POST", "chat/completions", "governed:openai.chat"),  # base URL has /v1
        ("openai", "POST", "openai/deployments/gpt4/chat/completions", "governed:openai.chat"),
        # A stored completion is a ChatCompletion: its calls are decided too.
        ("openai", "GET", "v1/chat/completions/chatcmpl-1", "governed:openai.chat"),
        ("openai", "POST", "v1/chat/completions/chatcmpl-1", "governed:openai.chat"),
        ("openai", "POST", "v1/responses", "governed:openai.responses"),
        ("openai", "GET", "v1/responses/resp_123", "governed:openai.responses"),
        ("openai", "POST", "v1/responses/resp_123/cancel", "governed:openai.responses"),
        ("anthropic", "POST", "v1/messages", "governed:anthropic.messages"),
        # Known to carry no tool calls.
        ("openai", "GET", "v1/models", PLAIN),
        ("openai", "GET", "v1/models/gpt-4o", PLAIN),
        ("openai", "POST", "v1/embeddings", PLAIN),
        ("openai", "POST", "v1/moderations", PLAIN),
        ("openai", "DELETE", "v1/chat/completions/chatcmpl-1", PLAIN),
        ("anthropic", "GET", "v1/models", PLAIN),
        ("anthropic", "GET", "v1/models/claude-sonnet-4-5", PLAIN),
        ("anthropic", "POST", "v1/messages/count_tokens", PLAIN),
        # Carry tool calls in shapes Warden does not parse: refused.
        ("openai", "GET", "v1/chat/completions", REFUSED),
        ("openai", "GET", "v1/chat/completions/chatcmpl-1/messages", REFUSED),
        ("openai", "GET", "v1/responses/resp_123/input_items", REFUSED),
        ("anthropic", "GET", "v1/messages", REFUSED),
        ("anthropic", "POST", "v1/messages/batches", REFUSED),
        # Not known at all.
        ("openai", "GET", "v1/files", REFUSED),
        ("openai", "POST", "v1/completions", REFUSED),
        ("openai", "PUT", "v1/chat/completions", REFUSED),
        ("openai", "GET", "", REFUSED),
        ("anthropic", "POST", "v1/chat/completions", REFUSED),
        ("unknown", "POST", "v1/chat/completions", REFUSED),
        # http upstreams are tool APIs: every route is forwarded as an http_call.
        ("http", "POST", "v1/chat/completions", PLAIN),
        ("http", "DELETE", "orders/1", PLAIN),
    ],
)
def test_route_allowlist(family: str, method: str, tail: str, expected: str) -> None:
    assert route(family, method, tail) == expected


def test_a_resource_name_later_in_the_path_does_not_make_a_governed_route_plain() -> None:
    # The route starts at the first resource segment: a stored completion named
    # "models" is still a stored completion.
    assert route("openai", "GET", "v1/chat/completions/models") == "governed:openai.chat"
    assert route("openai", "GET", "v1/responses/x/models/y") == REFUSED
    assert route("openai", "GET", "v1/models/chat") == PLAIN  # a model named "chat"


@pytest.mark.parametrize(
    ("method", "tail"),
    [
        # A run, a run's update and a batch's output file whose id is spelled like a
        # plain resource: to the provider they carry tool calls Warden never reads.
        ("GET", "v1/threads/thread_1/runs/models"),
        ("POST", "v1/threads/thread_1/runs/embeddings"),
        ("GET", "v1/files/models"),
        ("POST", "x/y/moderations"),
        ("POST", "v1/threads/t1/messages/count_tokens"),
        ("POST", "v1/threads/t1/runs/responses/input_tokens"),
    ],
)
def test_a_plain_resource_name_past_the_api_base_is_refused(method: str, tail: str) -> None:
    assert route("openai", method, tail) == REFUSED


@pytest.mark.parametrize(
    ("method", "tail"),
    [
        # Ids the provider issued, spelled like a governed resource: the answers are
        # conversation items, runs and run steps, their calls in shapes no adapter reads.
        ("GET", "v1/conversations/responses/items"),
        ("GET", "v1/threads/responses/runs"),
        ("GET", "v1/threads/t/runs/responses/steps"),
        ("POST", "v1/threads/t/runs/responses"),
        ("POST", "v1/threads/chat/completions"),
        ("POST", "v1/files/messages"),
        ("POST", "gateway/x/v1/chat/completions"),
    ],
)
def test_a_governed_resource_name_past_the_base_path_is_refused(method: str, tail: str) -> None:
    for family in ("openai", "anthropic"):
        assert route(family, method, tail) == REFUSED


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        ("api/v1/chat/completions", "governed:openai.chat"),  # OpenRouter's base path
        ("v1beta/openai/chat/completions", "governed:openai.chat"),  # Gemini's
        ("openai/v1/responses", "governed:openai.responses"),
        ("OpenAI/deployments/responses/chat/completions", "governed:openai.chat"),
    ],
)
def test_a_governed_route_starts_after_a_base_path(tail: str, expected: str) -> None:
    assert route("openai", "POST", tail) == expected


@pytest.mark.parametrize(
    ("family", "method", "tail"),
    [
        ("openai", "GET", "api/v1/models"),
        ("openai", "GET", "v1beta/openai/models"),
        ("anthropic", "GET", "anthropic/v1/models"),
        ("anthropic", "POST", "anthropic/v1/messages/count_tokens"),
    ],
)
def test_a_plain_route_starts_after_the_same_base_paths(
    family: str, method: str, tail: str
) -> None:
    assert route(family, method, tail) == PLAIN


def test_a_gateways_own_base_path_is_named_and_can_be_taken_off() -> None:
    path = ["v1", "projects", "p", "locations", "l", "endpoints", "openapi", "chat", "completions"]
    assert route("openai", "POST", "/".join(path)) == REFUSED
    assert foreign_prefix("openai", path) == path[:-2]
    assert foreign_prefix("openai", ["v1", "chat", "completions"]) is None
    base = base_segments("https://gw.example/v1/projects/p/locations/l/endpoints/OpenAPI")
    assert past_base(path, base) == ["chat", "completions"]
    assert past_base(["v1", "chat", "completions"], base) == ["v1", "chat", "completions"]
    assert past_base(path, []) == path


@pytest.mark.parametrize(
    "tail", ["models", "v1/models", "openai/models", "openai/v1/models", "OpenAI/V1/models"]
)
def test_a_plain_route_starts_after_an_api_base(tail: str) -> None:
    assert route("openai", "GET", tail) == PLAIN
    assert route("openai", "POST", "openai/deployments/emb-3/embeddings") == PLAIN


def test_stored_response_reads_the_stream_flag_from_the_query() -> None:
    match = match_route("openai", "GET", ["v1", "responses", "resp_1"])
    assert match is not None
    assert match.stream_query
    assert not match.parse_request
    post = match_route("openai", "POST", ["v1", "responses"])
    assert post is not None
    assert post.parse_request
    assert not post.stream_query


@pytest.mark.parametrize(
    ("family", "patterns", "method", "tail", "expected"),
    [
        ("openai", ("GET v1/files",), "GET", "v1/files", PLAIN),
        ("openai", ("GET v1/files",), "POST", "v1/files", REFUSED),
        ("openai", ("GET v1/files",), "GET", "v1/files/file-1", REFUSED),
        ("openai", ("get v1/files/*",), "GET", "v1/files/file-1", PLAIN),
        ("openai", ("GET v1/files/*",), "GET", "v1/files/file-1/content", REFUSED),
        ("openai", ("* v1/batches/**",), "POST", "v1/batches/b1/cancel", PLAIN),
        ("openai", ("* v1/batches/**",), "GET", "v1/batches", REFUSED),  # '**': one or more
        ("openai", ("GET /v1/files/",), "GET", "v1/files", PLAIN),  # outer slashes ignored
        # Pass-through never opens a governed resource or overrides its adapter.
        ("openai", ("GET v1/chat/completions",), "GET", "v1/chat/completions", REFUSED),
        ("openai", ("* v1/**",), "GET", "v1/responses/resp_1/input_items", REFUSED),
        ("openai", ("* v1/**",), "POST", "v1/chat/completions", "governed:openai.chat"),
        ("anthropic", ("* v1/**",), "POST", "v1/messages/batches", REFUSED),
        # A gateway that ignores path case serves these as the governed routes.
        ("openai", ("* v1/**",), "POST", "v1/Chat/completions", REFUSED),
        ("openai", ("* v1/**",), "POST", "v1/RESPONSES", REFUSED),
        ("anthropic", ("* v1/**",), "POST", "v1/Messages", REFUSED),
        # Providers serve each other's shapes: Anthropic answers OpenAI's chat/completions.
        ("anthropic", ("* v1/**",), "POST", "v1/chat/completions", REFUSED),
        ("anthropic", ("* v1/**",), "POST", "v1/responses", REFUSED),
        ("openai", ("* v1/**",), "POST", "v1/messages", REFUSED),
        ("openai", ("* v1/**",), "GET", "v1/threads/t1/messages", REFUSED),
    ],
)
def test_passthrough_patterns(
    family: str, patterns: tuple[str, ...], method: str, tail: str, expected: str
) -> None:
    assert route(family, method, tail, patterns) == expected
    if expected == PLAIN:
        rules = [PassthroughRule.parse(spec) for spec in patterns]
        match = match_route(family, method, tail.split("/"), rules)
        assert match is not None
        assert match.passthrough


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("FETCH v1/files", "HTTP method"),
        ("v1/files", "HTTP method"),
        ("GET", "needs a path"),
        ("GET  ", "needs a path"),
        ("GET v1//files", "segment ''"),
        ("GET v1/../admin", "segment '..'"),
        ("GET v1/fil*", "segment 'fil*'"),
        ("GET v1/**/x", "'**' may only be the last"),
        ("GET v1/a\\b", "segment"),
    ],
)
def test_bad_passthrough_patterns_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match="must|needs|may only") as caught:
        PassthroughRule.parse(spec)
    assert message in str(caught.value)
    assert repr(spec) in str(caught.value)


def test_config_names_the_key_of_a_bad_passthrough_pattern() -> None:
    upstream = {"protocol": "openai", "base_url": "https://api.example", "passthrough": ["GET"]}
    with pytest.raises(ConfigError) as caught:
        load_config(environ={}, overrides={"upstreams": {"llm": upstream}})
    assert "upstreams.llm.passthrough" in str(caught.value)
    assert "needs a path" in str(caught.value)


@pytest.mark.parametrize(
    ("tail", "deployment"),
    [
        ("openai/deployments/o1-pro/chat/completions", "o1-pro"),
        ("openai/Deployments/prod-4o/embeddings", "prod-4o"),
        ("v1/chat/completions", None),
        ("deployments/chat/completions", None),
        ("openai/models/x/chat/completions", None),
    ],
)
def test_an_azure_path_names_its_deployment(tail: str, deployment: str | None) -> None:
    assert deployment_named("openai", tail.split("/")) == deployment


def test_the_deployment_may_sit_in_the_upstreams_base_path() -> None:
    # The Azure SDK's base_url ends in the deployment; the tail is then chat/completions.
    base = ["openai", "deployments", "o1-pro"]
    assert deployment_named("openai", ["chat", "completions"], base) == "o1-pro"
    assert deployment_named("openai", ["chat", "completions"]) is None
    gateway = ["gw", "azure"]  # a gateway's base path before Azure's own
    tail = ["openai", "deployments", "gpt-4o", "chat", "completions"]
    assert deployment_named("openai", tail, gateway) == "gpt-4o"
