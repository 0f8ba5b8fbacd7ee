"""Open the configured decision index: PostgreSQL with the fleet backend, else SQLite.

The index follows ``state.url``: with ``postgresql://`` it lives in the
fleet's database (:class:`~warden.audit.pg_index.PgDecisionIndex`), beside the
budgets, approvals and kill switches that fleet already shares; otherwise it
is an SQLite file beside the log (``console.index``, default
``<audit.dir>-index.sqlite``). ``audit.ship`` does not decide it: the central
audit store is append-only evidence, possibly in another database, and the
index is a cache that ``warden audit reindex`` must be able to throw away.
"""

from __future__ import annotations

from pathlib import Path

from warden.audit.index import DecisionIndex, RecordIndex, default_index_path
from warden.config import Config

__all__ = ["index_in_postgres", "open_index"]


def index_in_postgres(config: Config) -> bool:
    """Whether the index lives in PostgreSQL (``state.url`` names one)."""
    return config.state.url.startswith(("postgresql://", "postgres://"))


def open_index(config: Config, audit_dir: Path | str, *, path: str | None = None) -> RecordIndex:
    """The index of the log at ``audit_dir`` (blocking: call from a thread).

    ``path`` overrides ``console.index`` for SQLite. With PostgreSQL the log
    must exist (its origin keys the rows) and the schema must be migrated.
    """
    if index_in_postgres(config):
        # Imported here: psycopg is needed only by fleets.
        from warden.audit.pg_index import PgDecisionIndex  # noqa: PLC0415
        from warden.state.postgres import PgTarget  # noqa: PLC0415

        return PgDecisionIndex.open(PgTarget.from_config(config.state), audit_dir)
    return DecisionIndex(Path(path or config.console.index or default_index_path(audit_dir)))
