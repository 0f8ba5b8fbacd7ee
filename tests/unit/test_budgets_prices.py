"""The price table: shipped prices, name matching, defaults and overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from warden.budgets.prices import PriceTable
from warden.errors import ConfigError
from warden.model import Usage
from warden.protocols._wire import tier_rate
from warden.protocols.anthropic import AnthropicMessagesAdapter
from warden.protocols.openai_chat import OpenAIChatAdapter
from warden.protocols.openai_responses import OpenAIResponsesAdapter


def test_shipped_table_prices_known_models_and_dated_snapshots() -> None:
    table = PriceTable.shipped()
    price, known = table.lookup("openai", "gpt-4o-mini-2024-07-18")
    assert known
    assert price.input == 0.15
    price, known = table.lookup("openai", "gpt-4o-2024-08-06")
    assert known
    assert price.input == 2.5
    assert table.lookup("anthropic", "claude-sonnet-4-5-20250929")[1]
    # A snapshot dearer than its alias is priced as itself.
    assert table.lookup("openai", "gpt-4o-2024-05-13")[0].output == 15.0
    assert table.lookup("openai", "gpt-3.5-turbo-0613")[0].input == 1.5
    # Digits of another script are no date: another model, priced as unknown.
    assert table.lookup("openai", "gpt-4o-\uff12\uff10\uff12\uff14") == (table.default, False)


def test_a_suffix_that_is_not_a_snapshot_is_another_model() -> None:
    # The agent picks the model: "o3-pro" must not be priced as "o3" (ten times less).
    table = PriceTable.shipped()
    assert table.lookup("openai", "o3-pro")[0].output == 80.0
    assert table.lookup("openai", "o3-pro-2025-06-10")[0].output == 80.0
    assert table.lookup("openai", "o1-pro")[0].output == 600.0
    assert table.lookup("openai", "gpt-5-pro-2025-10-06")[0].output == 120.0
    assert table.lookup("openai", "gpt-3.5-turbo-0125")[1]  # four-digit snapshots keep theirs
    assert table.lookup("openai", "o3-mini-latest")[1]
    for model in ("o3-ultra", "gpt-4o-realtime", "gpt-4o-mini-search", "gpt-5-codex-max"):
        assert table.lookup("openai", model) == (table.default, False), model


def test_unknown_models_and_providers_get_the_default() -> None:
    table = PriceTable.shipped()
    assert table.lookup("openai", "gpt-4ox") == (table.default, False)
    assert table.lookup("elsewhere", "gpt-4o") == (table.default, False)
    # No model named (a stored prompt brings its own): the dearest of every part, which
    # is above the default (o1-pro's 150 and 600 USD a million).
    assert table.lookup("openai", None) == (table.dearest, False)
    assert table.lookup("anthropic", "") == (table.dearest, False)
    assert (table.dearest.input, table.dearest.output) == (150.0, 600.0)
    assert table.dearest.output > table.default.output


def test_cost_counts_cached_tokens_as_the_provider_reports_them() -> None:
    table = PriceTable.shipped()
    usage = Usage(input_tokens=100_000, output_tokens=100_000, cached_input_tokens=40_000)
    # OpenAI's input count includes cached tokens: 60k uncached at 0.15.
    openai = table.cost("openai", "gpt-4o-mini", usage)
    assert openai.known
    assert openai.usd == pytest.approx((0.6 * 0.15 + 0.4 * 0.075 + 0.6) / 10)
    # Anthropic reports cache reads beside the input count.
    anthropic = table.cost("anthropic", "claude-3-5-haiku", usage)
    assert anthropic.usd == pytest.approx((0.8 + 0.4 * 0.08 + 4.0) / 10)


def test_cost_counts_cache_writes_above_input() -> None:
    # A prompt behind a cache breakpoint that never hits again is billed as a write on
    # every call: 1.25 times input for five minutes, twice for an hour.
    table = PriceTable.shipped()
    usage = Usage(input_tokens=10, output_tokens=0, cache_write_tokens=190_000)
    assert table.cost("anthropic", "claude-opus-4-1", usage).usd == pytest.approx(
        (10 * 15.0 + 190_000 * 15.0 * 1.25) / 1e6
    )
    hour = Usage(input_tokens=10, cache_write_tokens=1_000, cache_write_1h_tokens=180_000)
    assert table.cost("anthropic", "claude-opus-4-1", hour).usd == pytest.approx(
        (10 * 15.0 + 1_000 * 15.0 * 1.25 + 180_000 * 15.0 * 2.0) / 1e6
    )


def test_tiers_long_context_and_hosted_calls_cost_what_the_provider_bills() -> None:
    """A premium tier multiplies the price (priority twice, one the table does not know
    six times); an Anthropic request past 200,000 input tokens (cache reads and writes
    included) is billed at long-context prices for all of it; each call of a tool the
    provider ran costs its fee, a kind not listed the dearest fee."""
    table = PriceTable.shipped()
    usage = Usage(input_tokens=100_000, output_tokens=10_000)
    standard = table.cost("openai", "gpt-5", usage).usd
    assert standard == pytest.approx((100_000 * 1.25 + 10_000 * 10.0) / 1e6)
    priority = Usage(input_tokens=100_000, output_tokens=10_000, rate=tier_rate("priority"))
    assert table.cost("openai", "gpt-5", priority).usd == pytest.approx(2 * standard)
    unknown = Usage(input_tokens=100_000, output_tokens=10_000, rate=tier_rate("ultrafast"))
    assert table.cost("openai", "gpt-5", unknown).usd == pytest.approx(6 * standard)
    for tier in (None, "auto", "default", "flex", "scale", "standard"):
        assert tier_rate(tier) == 1.0
    sonnet = table.lookup("anthropic", "claude-sonnet-4-5")[0]
    short = Usage(input_tokens=150_000, output_tokens=10_000, cached_input_tokens=50_000)
    assert table.cost("anthropic", "claude-sonnet-4-5", short).usd == pytest.approx(
        (150_000 * sonnet.input + 50_000 * sonnet.cached_input + 10_000 * sonnet.output) / 1e6
    )
    long = Usage(input_tokens=150_000, output_tokens=10_000, cached_input_tokens=50_001)
    assert table.cost("anthropic", "claude-sonnet-4-5", long).usd == pytest.approx(
        (
            (150_000 * sonnet.input + 50_001 * sonnet.cached_input) * 2.0
            + 10_000 * sonnet.output * 1.5
        )
        / 1e6
    )
    plain = Usage(input_tokens=1_000, output_tokens=100)
    base = table.cost("anthropic", "claude-sonnet-4-5", plain).usd
    searched = Usage(input_tokens=1_000, output_tokens=100, hosted_calls=(("web_search", 3),))
    assert table.cost("anthropic", "claude-sonnet-4-5", searched).usd == pytest.approx(base + 0.03)
    odd = Usage(input_tokens=1_000, output_tokens=100, hosted_calls=(("image_generation", 1),))
    assert table.cost("anthropic", "claude-sonnet-4-5", odd).usd == pytest.approx(base + 0.03)


def test_override_file_adds_models_and_replaces_the_default(tmp_path: Path) -> None:
    file = tmp_path / "prices.yaml"
    file.write_text(
        "default: {input: 1, cached_input: 1, output: 2}\n"
        "providers:\n"
        "  openai:\n"
        "    models:\n"
        "      house-model: {input: 0.5, output: 1}\n"
        "      gpt-4o: {input: 2, cached_input: 1, output: 9}\n"
    )
    table = PriceTable.load(str(file))
    assert table.default.output == 2
    house, known = table.lookup("openai", "house-model")
    assert known
    assert house.cached_input == 0.5
    assert table.lookup("openai", "gpt-4o")[0].output == 9
    assert table.lookup("openai", "gpt-4o-mini")[0].input == 0.15  # shipped entries stay


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("providers: {openai: {models: {m: {input: -1, output: 1}}}}", "models.m.input"),
        ("providers: {openai: {models: {m: {input: 1, output: 1, extra: 2}}}}", "unknown key"),
        ("default: 3", "default"),
        ("[1, 2]", "top level"),
        ("colour: red", "unknown key"),
    ],
)
def test_bad_override_files_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    file = tmp_path / "prices.yaml"
    file.write_text(text)
    with pytest.raises(ConfigError, match="prices.file") as err:
        PriceTable.load(str(file))
    assert key in str(err.value)


def test_missing_override_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="prices.file: cannot read"):
        PriceTable.load(str(tmp_path / "absent.yaml"))


def test_adapters_read_the_tier_asked_for_and_ran_and_the_hosted_calls_billed() -> None:
    chat, responses, messages = (
        OpenAIChatAdapter(),
        OpenAIResponsesAdapter(),
        AnthropicMessagesAdapter(),
    )
    assert chat.parse_request({"model": "m", "service_tier": "priority"}).rate == 2.0
    assert chat.parse_request({"model": "m", "service_tier": "flex"}).rate == 1.0
    assert responses.parse_request({"model": "m", "service_tier": "ultrafast"}).rate == 6.0
    assert messages.parse_request({"model": "m", "max_tokens": 5, "speed": "fast"}).rate == 6.0
    counts = {"prompt_tokens": 5, "completion_tokens": 2}
    ran = chat.usage({"usage": counts, "service_tier": "priority"})
    assert ran is not None
    assert ran.rate == 2.0
    plain = chat.usage({"usage": counts, "service_tier": "default"})
    assert plain is not None
    assert plain.rate == 1.0
    output = [
        {"type": "web_search_call", "id": "ws_1", "status": "completed"},
        {"type": "web_search_call", "id": "ws_2", "status": "completed"},
        {"type": "file_search_call", "id": "fs_1", "status": "completed"},
    ]
    answer = responses.usage(
        {
            "usage": {"input_tokens": 5, "output_tokens": 2},
            "service_tier": "priority",
            "output": output,
        }
    )
    assert answer is not None
    assert answer.rate == 2.0
    assert answer.hosted_calls == (("file_search", 1), ("web_search", 2))
    usage = {
        "input_tokens": 5,
        "output_tokens": 2,
        "server_tool_use": {"web_search_requests": 3},
        "speed": "fast",
    }
    searched = messages.usage({"usage": usage})
    assert searched is not None
    assert searched.hosted_calls == (("web_search", 3),)
    assert searched.rate == 6.0


def test_a_models_own_most_output_bounds_what_is_written() -> None:
    table = PriceTable.shipped()
    assert table.output_bound("openai", "gpt-4-turbo", 8192) == 4096
    assert table.output_bound("openai", "gpt-4-turbo-2024-04-09", 8192) == 4096
    assert table.output_bound("openai", "gpt-4-turbo", 1000) == 1000
    assert table.output_bound("openai", "gpt-4o", 8192) == 8192
    assert table.output_bound("openai", "house-model", 8192) == 8192
    with pytest.raises(ConfigError, match="max_output"):
        PriceTable.from_mapping(
            {"default": {"input": 1, "output": 1, "max_output": 0}}, "prices.file (x)"
        )


def test_billed_hosted_tools_get_a_bound_where_the_request_sets_none() -> None:
    messages, responses, chat = (
        AnthropicMessagesAdapter(),
        OpenAIResponsesAdapter(),
        OpenAIChatAdapter(),
    )
    tools = [
        {"type": "web_search_20250305", "name": "web_search"},
        {"type": "web_search_20250305", "name": "news", "max_uses": 3},
        {"name": "lookup", "input_schema": {"type": "object"}},
    ]
    body, most = messages.bound_hosted_calls({"tools": tools}, 10)
    assert [t.get("max_uses") for t in body["tools"]] == [10, 3, None]
    assert most == 13
    assert messages.bound_hosted_calls({"tools": tools[2:]}, 10) == ({"tools": tools[2:]}, 0)
    search = {"tools": [{"type": "web_search"}]}
    assert responses.bound_hosted_calls(search, 10) == ({**search, "max_tool_calls": 10}, 10)
    given = {**search, "max_tool_calls": 2}
    assert responses.bound_hosted_calls(given, 10) == (given, 2)
    plain = {"tools": [{"type": "function", "name": "f"}]}
    assert responses.bound_hosted_calls(plain, 10) == (plain, 0)
    assert chat.bound_hosted_calls({"model": "m"}, 10) == ({"model": "m"}, 0)


@pytest.mark.parametrize(
    "body",
    [
        {
            "input": [
                {"type": "additional_tools", "role": "developer", "tools": [{"type": "web_search"}]}
            ]
        },
        {
            "input": [
                {
                    "type": "tool_search_output",
                    "call_id": "ts_1",
                    "tools": [{"type": "file_search"}],
                }
            ]
        },
        {"prompt": {"id": "pmpt_1", "version": "1"}, "input": "news?"},
    ],
    ids=["additional_tools", "tool_search_output", "stored-prompt"],
)
def test_billed_tools_declared_beyond_tools_are_bounded_too(body: dict[str, Any]) -> None:
    """Tools an input item declares, or a stored prompt may bring, are the provider's to run
    all the same: bounded and held like those in ``tools``."""
    sent, most = OpenAIResponsesAdapter().bound_hosted_calls(body, 10)
    assert sent == {**body, "max_tool_calls": 10}
    assert most == 10
