"""Model prices: the table shipped in ``warden/data/prices.yaml`` plus overrides.

Cost of one response, in USD::

    uncached * input + cached * cached_input + output_tokens * output
      + cache writes * input * 1.25 (five minutes) or 2 (an hour)   (per 1e6)

where ``uncached`` is the input tokens less the cached ones when the provider
counts cached tokens inside its input count (OpenAI), else all input tokens
(Anthropic reports cache reads and writes separately).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from warden.config import LlmBudgetConfig
from warden.errors import ConfigError
from warden.model import Usage

__all__ = ["OutputBounds", "Price", "PriceTable", "Priced"]

_PER = 1_000_000
_CACHE_WRITE_5M = 1.25
"""A prompt-cache write for five minutes, against the model's input price (Anthropic)."""
_CACHE_WRITE_1H = 2.0
"""A prompt-cache write for an hour, against the model's input price (Anthropic)."""
_LONG_CONTEXT_TOKENS = 200_000
"""Anthropic bills a request whose input passes this (the 1M-token context) at long-context
prices for all of it: input at twice the model's price, output at one and a half."""
_LONG_INPUT, _LONG_OUTPUT = 2.0, 1.5
_HOSTED_CALL_USD: dict[tuple[str, str], float] = {
    ("anthropic", "web_search"): 0.01,  # 10 USD per thousand
    ("openai", "web_search"): 0.025,  # 10 to 25 USD per thousand, by model: the most
    ("openai", "file_search"): 0.0025,
    ("openai", "code_interpreter"): 0.03,  # a container session, counted per call
}
"""What a provider bills per call of a tool it runs itself; a kind not listed costs the
dearest listed price."""
_SNAPSHOT = re.compile(r"-(?:[0-9]{4}-[0-9]{2}-[0-9]{2}|[0-9]{8}|[0-9]{4}|latest|preview)")
"""What may follow a listed name and keep its price: a dated snapshot or an alias of it.
Anything else is another model (``o3-pro`` costs ten times ``o3``): priced as unknown."""


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens."""

    input: float
    cached_input: float
    output: float
    max_output: int | None = None
    """The most output tokens the model generates in one answer, where it is below what
    Warden would write into a request that sets no bound (``unbounded_output_tokens``)."""


@dataclass(frozen=True, slots=True)
class Priced:
    """A cost and whether the model was found in the table."""

    usd: float
    known: bool


@dataclass(frozen=True, slots=True)
class _Provider:
    input_includes_cached: bool
    models: Mapping[str, Price]


class PriceTable:
    """Looks up prices by provider (the upstream's protocol) and model name."""

    def __init__(self, default: Price, providers: Mapping[str, _Provider]) -> None:
        self.default = default
        self._providers = dict(providers)
        # Longest names first, so prefix matching picks the most specific entry.
        self._ordered = {
            name: sorted(p.models, key=len, reverse=True) for name, p in providers.items()
        }
        prices = [default, *(m for p in providers.values() for m in p.models.values())]
        self.dearest = Price(
            max(p.input for p in prices),
            max(p.cached_input for p in prices),
            max(p.output for p in prices),
        )
        """Each part at the dearest any entry has: the price of a call whose model is not
        named in its request (a stored prompt's, which Warden cannot see)."""

    @classmethod
    def shipped(cls) -> PriceTable:
        """The table shipped with Warden."""
        text = resources.files("warden").joinpath("data/prices.yaml").read_text("utf-8")
        return cls.from_mapping(yaml.safe_load(text), "the shipped price table")

    @classmethod
    def load(cls, file: str | None) -> PriceTable:
        """The shipped table, with ``file`` (``prices.file``) merged on top."""
        table = cls.shipped()
        if file is None:
            return table
        try:
            text = Path(file).read_text(encoding="utf-8")
            data = yaml.safe_load(text)
        except OSError as exc:
            raise ConfigError(f"prices.file: cannot read {file}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"prices.file: {file} is not valid YAML: {exc}") from None
        return table.merged(cls.from_mapping(data, f"prices.file ({file})", partial=True))

    @classmethod
    def from_mapping(cls, data: Any, where: str, *, partial: bool = False) -> PriceTable:
        """Build a table from the YAML shape; errors name ``where`` and the key."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: the top level must be a mapping")
        unknown = set(data) - {"default", "providers"}
        if unknown:
            raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
        raw_default = data.get("default")
        if raw_default is None and not partial:
            raise ConfigError(f"{where}: default: a default price is required")
        default = _price(raw_default, f"{where}: default") if raw_default is not None else None
        providers: dict[str, _Provider] = {}
        raw_providers = data.get("providers") or {}
        if not isinstance(raw_providers, Mapping):
            raise ConfigError(f"{where}: providers: must be a mapping of provider names")
        for pname, entry in raw_providers.items():
            key = f"{where}: providers.{pname}"
            if not isinstance(entry, Mapping):
                raise ConfigError(f"{key}: must be a mapping")
            models = entry.get("models") or {}
            if not isinstance(models, Mapping):
                raise ConfigError(f"{key}.models: must be a mapping of model names")
            includes = entry.get("input_includes_cached", pname == "openai")
            if not isinstance(includes, bool):
                raise ConfigError(f"{key}.input_includes_cached: must be true or false")
            providers[str(pname)] = _Provider(
                includes,
                {str(m): _price(p, f"{key}.models.{m}") for m, p in models.items()},
            )
        return cls(default if default is not None else _NO_PRICE, providers)

    def merged(self, over: PriceTable) -> PriceTable:
        """This table with ``over``'s default (when set) and models on top."""
        providers = dict(self._providers)
        for name, prov in over._providers.items():
            base = providers.get(name)
            models = {**(base.models if base else {}), **prov.models}
            providers[name] = _Provider(prov.input_includes_cached, models)
        default = over.default if over.default is not _NO_PRICE else self.default
        return PriceTable(default, providers)

    def lookup(self, provider: str, model: str | None) -> tuple[Price, bool]:
        """The price for a model and whether it was in the table (else the default).

        A request that names no model runs one Warden cannot see (a stored
        prompt's): it is priced at :attr:`dearest`, not at ``default``, which
        is below the dearest models'.
        """
        if not model:
            return self.dearest, False
        prov = self._providers.get(provider)
        if prov is None:
            return self.default, False
        found = prov.models.get(model)
        if found is not None:
            return found, True
        for name in self._ordered[provider]:
            if model.startswith(name) and _SNAPSHOT.fullmatch(model, len(name)):
                return prov.models[name], True
        return self.default, False

    def _fine_tune_of_known(self, provider: str, model: str | None) -> bool:
        """Whether ``model`` is OpenAI's fine-tune (``ft:<base>:<org>::<id>``) of a model
        the table knows. Such a model runs at up to twice its base's price, under
        ``default``: it is held at ``default`` (as before), not at the dearest price,
        which would refuse ordinary calls under a small cap."""
        if not model or not model.startswith("ft:"):
            return False
        base = model.split(":", 2)[1]
        return bool(base) and self.lookup(provider, base)[1]

    def hosted_call_most(self, provider: str) -> float:
        """The dearest fee a ``provider`` bills per call of a tool it runs (USD)."""
        fees = [fee for (name, _), fee in _HOSTED_CALL_USD.items() if name == provider]
        return max(fees, default=max(_HOSTED_CALL_USD.values()))

    def output_bound(self, provider: str, model: str | None, bound: int) -> int:
        """``bound``, or the model's own most output where that is less (``max_output``)."""
        price, known = self.lookup(provider, model)
        return min(bound, price.max_output) if known and price.max_output else bound

    def cost(self, provider: str, model: str | None, usage: Usage, *, held: bool = False) -> Priced:
        """What a response with ``usage`` cost, in USD.

        ``held``: the most it can cost before it is answered. A model the table does
        not know is then priced at :attr:`dearest`, not ``default``: an unknown name
        (a gateway alias, an Azure deployment) may run the dearest model there is,
        and its answer is settled at that model's price.
        """
        price, known = self.lookup(provider, model)
        if held and not known and not self._fine_tune_of_known(provider, model):
            price = self.dearest
        prov = self._providers.get(provider)
        cached = max(0, usage.cached_input_tokens)
        uncached = max(0, usage.input_tokens)
        if prov is None or prov.input_includes_cached:
            uncached = max(0, uncached - cached)
        written = (
            max(0, usage.cache_write_tokens) * _CACHE_WRITE_5M
            + max(0, usage.cache_write_1h_tokens) * _CACHE_WRITE_1H
        )
        into, out = 1.0, 1.0
        writes = max(0, usage.cache_write_tokens) + max(0, usage.cache_write_1h_tokens)
        if provider == "anthropic" and uncached + cached + writes > _LONG_CONTEXT_TOKENS:
            into, out = _LONG_INPUT, _LONG_OUTPUT
        usd = (
            (uncached * price.input + cached * price.cached_input + written * price.input) * into
            + usage.output_tokens * price.output * out
        ) / _PER
        usd *= max(1.0, usage.rate)
        for kind, count in usage.hosted_calls:
            fee = _HOSTED_CALL_USD.get((provider, kind), max(_HOSTED_CALL_USD.values()))
            usd += max(0, count) * fee
        return Priced(usd=usd, known=known)


_NO_PRICE = Price(-1.0, -1.0, -1.0)


class OutputBounds:
    """The output bound Warden writes into a model request that sets none, per model.

    Only under an LLM spend cap (``budgets.llm.limit_usd``): such a call is held
    at ``unbounded_output_tokens``, so it must not generate more. A model whose
    price entry names a smaller ``max_output`` gets that instead: a provider
    refuses a bound past what the model can generate.
    """

    def __init__(self, llm: LlmBudgetConfig | None, prices: PriceTable) -> None:
        """``prices``: the table the budget guard prices with, so both read one file once."""
        self._bound = llm.written_output_bound if llm is not None else None
        self._table = prices if self._bound is not None else None
        self.tool_calls = llm.written_tool_bound if llm is not None else None
        """The bound on billed hosted tool calls written into a request; ``None``: none."""

    def written(self, provider: str, model: str | None) -> int | None:
        """The bound to write for ``model`` on a ``provider`` upstream; ``None``: none."""
        if self._bound is None or self._table is None:
            return None
        return self._table.output_bound(provider, model, self._bound)


def _price(raw: Any, key: str) -> Price:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{key}: must be a mapping with input, cached_input and output")
    values: dict[str, float] = {}
    for name in ("input", "cached_input", "output"):
        value = raw.get(name, raw.get("input") if name == "cached_input" else None)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"{key}.{name}: must be a number of USD per million tokens, >= 0")
        values[name] = float(value)
    most = raw.get("max_output")
    if most is not None and (isinstance(most, bool) or not isinstance(most, int) or most < 1):
        raise ConfigError(f"{key}.max_output: must be a whole number of tokens, >= 1")
    extra = set(raw) - {"input", "cached_input", "output", "max_output"}
    if extra:
        raise ConfigError(f"{key}: unknown key {sorted(extra)[0]!r}")
    return Price(**values, max_output=most)
