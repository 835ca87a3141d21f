"""PostgreSQL plumbing shared by the PostgreSQL stores: connections, a connection pool and versioned migrations.

Chosen by one setting, CNN_DATABASE_URL (for example postgresql://user@host/db); without it the stores are the
embedded SQLite ones. Each store names its component and lists its migrations in order; `migrate` applies the
missing ones at start-up, in one transaction under an advisory lock, so replicas starting together apply each
migration exactly once and never see a half-made schema.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
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


def _alive(conn: Any) -> bool:
    """Whether an idle connection still reaches its server (one empty query: a round trip, no work)."""
    try:
        conn.execute("")
        return True
    except Exception:
        return False


class Pool:
    """At most `size` autocommit connections shared by the threads, each lent to one thread at a time; a broken one
    (closed, or left inside a transaction) is dropped, not reused.

    Surviving a database restart: a connection that sat idle longer than `check_after` seconds is checked with an
    empty query before it is lent, and replaced when the check fails; when a lent connection comes back broken (the
    server went away under it), every idle connection is dropped too, since they died with it. So after a restart
    only the operations that were running on the old connections fail; later ones get new connections.

    `close_idle()` closes the connections nobody is using now and the pool stays usable (it reconnects when
    asked); `close()` also refuses every later `connection()` with RuntimeError(`closed_message`)."""

    def __init__(self, url: str, size: int, *, closed_message: str = "the connection pool is closed",
                 check_after: float = 1.0) -> None:
        self.url, self.size = url, size
        self.closed_message = closed_message
        self.check_after = check_after
        self._idle: list[tuple[Any, float]] = []  # (connection, monotonic time it was given back)
        self._count = 0  # connections open: idle or lent
        self._cond = threading.Condition()
        self._closed = False
        self.replaced = 0  # idle connections found dead (failed their check, or dropped after a broken one)

    @contextmanager
    def connection(self) -> Iterator[Any]:
        with self._cond:
            while not self._idle and self._count >= self.size and not self._closed:
                self._cond.wait()
            if self._closed:
                raise RuntimeError(self.closed_message)
            conn, since = self._idle.pop() if self._idle else (None, 0.0)
            if conn is None:
                self._count += 1
        if conn is not None and (conn.closed or (time.monotonic() - since > self.check_after and not _alive(conn))):
            # closed or dead while idle: a new one takes its place, and the other idle ones, which most likely
            # died with it (a restart), are dropped too
            self._drop_idle(also=conn)
            conn = None
        if conn is None:
            try:
                conn = connect(self.url, autocommit=True)
            except BaseException:
                self._give_back(None)
                raise
        try:
            yield conn
        finally:
            self._give_back(conn)

    def _give_back(self, conn: Any) -> None:
        from psycopg import pq

        keep = conn is not None and not conn.closed and not conn.broken and not self._closed
        if keep and conn.info.transaction_status != pq.TransactionStatus.IDLE:  # an interrupted transaction
            keep = False
        if conn is not None and not keep:
            with suppress(Exception):
                conn.close()
        with self._cond:
            if keep:
                self._idle.append((conn, time.monotonic()))
            else:
                self._count -= 1
            self._cond.notify()
        if conn is not None and conn.broken:  # the server went away under it: the idle ones went with it
            self._drop_idle()

    def _drop_idle(self, also: Any = None) -> None:
        """Close and forget the idle connections (and `also`, a lent one that is not coming back)."""
        with self._cond:
            stale = [c for c, _ in self._idle] + ([also] if also is not None else [])
            self._idle = []
            self._count -= len(stale) - (1 if also is not None else 0)  # `also` is still counted as lent
            self.replaced += len(stale)
            self._cond.notify_all()
        for old in stale:
            with suppress(Exception):
                old.close()

    def close_idle(self) -> None:
        """Close the connections nobody is using now (the pool stays usable: it reconnects when asked)."""
        with self._cond:
            idle, self._idle = self._idle, []
            self._count -= len(idle)
            self._cond.notify_all()
        for conn, _ in idle:
            with suppress(Exception):
                conn.close()

    def close(self) -> None:
        """Close the idle connections and refuse new loans; lent ones are closed when given back."""
        with self._cond:
            self._closed = True
        self.close_idle()
