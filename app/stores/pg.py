"""PostgreSQL plumbing shared by the PostgreSQL stores: connections and versioned schema migrations.

Chosen by one setting, CNN_DATABASE_URL (for example postgresql://user@host/db); without it the stores are the
embedded SQLite ones. Each store names its component and lists its migrations in order; `migrate` applies the
missing ones at start-up, in one transaction under an advisory lock, so replicas starting together apply each
migration exactly once and never see a half-made schema.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    component TEXT NOT NULL,
    version INTEGER NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version)
)"""


class DatabaseUnavailable(RuntimeError):
    """PostgreSQL cannot be reached or psycopg is not installed (the message says which)."""


def connect(url: str, *, autocommit: bool = False, **kwargs: Any) -> Any:
    """A psycopg connection with dict rows; DatabaseUnavailable with the reason when it cannot connect."""
    try:
        import psycopg
        from psycopg.rows import dict_row
    except ImportError as exc:
        raise DatabaseUnavailable("CNN_DATABASE_URL needs psycopg: pip install 'psycopg[binary]' "
                                  "(the 'postgres' extra)") from exc
    try:
        return psycopg.connect(url, autocommit=autocommit, row_factory=dict_row, connect_timeout=10, **kwargs)
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"cannot connect to PostgreSQL ({redact(url)}): {exc}".strip()) from exc


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}{':***' if ':' in creds else ''}@{host}"


def migrate(url: str, component: str, steps: Sequence[str]) -> int:
    """Apply the component's migrations not applied yet (steps[i] is version i + 1); returns the version now.
    A database at a newer version than this code knows is refused (an older replica must not write to it)."""
    lock = zlib.crc32(f"cnn-apps:{component}".encode())
    with connect(url) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock,))
        conn.execute(MIGRATIONS_TABLE)
        row = conn.execute("SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations WHERE component = %s",
                           (component,)).fetchone()
        current = int(row["v"])
        if current > len(steps):
            raise DatabaseUnavailable(f"the {component} schema is at version {current}, newer than this server's "
                                      f"{len(steps)}: upgrade the server")
        for version, sql in enumerate(steps[current:], start=current + 1):
            conn.execute(sql)
            conn.execute("INSERT INTO schema_migrations (component, version) VALUES (%s, %s)", (component, version))
        conn.commit()
        return len(steps)
