"""The gate in front of every route: which route a request is for, who sends it, and whether there is room.

Everything here happens from the request line and headers alone, before a byte of the body is read
(nginx/Envoy admission control: reject before doing work):
- route policy: one table says, for every route, the scope a caller needs and the application whose
  capacity the request uses; a route missing from the table needs `admin` (fail closed);
- authentication: API keys belong to named principals with scopes; keys are kept and compared as
  sha256 hashes;
- admission: a bounded number of requests in flight per application; a full application answers
  503 at once, with `Retry-After` computed from the measured drain rate (when the next slot frees);
- deadline: a per-request time budget (header or setting) that the batcher honours, so work whose
  caller has given up is dropped rather than computed.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.routing import compile_path

from app.auth import SCOPES, Principal

# -- route policy -----------------------------------------------------------------------------------------

OPEN = None  # no key needed


@dataclass(frozen=True)
class RoutePolicy:
    """What a route needs: a scope (None: open) and, for expensive routes, the application it loads."""

    scope: str | None
    application: str | None = None


FAIL_CLOSED = RoutePolicy("admin")

# (method, route template) -> policy for the routes of the core (health, docs, models); each application declares
# its own routes' policies (app/apps/) and create_app joins them into one table. HEAD is looked up as GET.
# Inference is `read` (it changes nothing); anything that stores or deletes is `write`; changing which models
# serve is `admin`.
CORE_POLICIES: dict[tuple[str, str], RoutePolicy] = {
    ("GET", "/health/live"): RoutePolicy(OPEN),
    ("GET", "/health/ready"): RoutePolicy(OPEN),
    ("GET", "/metrics"): RoutePolicy("metrics"),
    ("GET", "/openapi.json"): RoutePolicy(OPEN),
    ("GET", "/docs"): RoutePolicy(OPEN),
    ("GET", "/docs/oauth2-redirect"): RoutePolicy(OPEN),
    ("GET", "/redoc"): RoutePolicy(OPEN),
    ("GET", "/"): RoutePolicy(OPEN),  # the playground page; it sends the key the user types with each API call
    ("GET", "/static/{asset}"): RoutePolicy(OPEN),  # the page's and the docs' scripts and styles
    ("GET", "/models"): RoutePolicy("read"),
    ("GET", "/models/defaults"): RoutePolicy("read"),
    ("PUT", "/models/defaults"): RoutePolicy("admin"),
    ("GET", "/models/{name}"): RoutePolicy("read"),
    ("POST", "/models/{name}/load"): RoutePolicy("admin"),
    ("POST", "/models/{name}/unload"): RoutePolicy("admin"),
    ("POST", "/models/{name}/reload"): RoutePolicy("admin"),
    ("GET", "/models/{name}/batching"): RoutePolicy("read"),
    ("PUT", "/models/{name}/batching"): RoutePolicy("admin"),
}


AUTHENTICATED = RoutePolicy("")  # paths no route serves: any valid key (so a 404 reveals nothing to strangers)


def policy_for(method: str, template: str, policies: dict[tuple[str, str], RoutePolicy]) -> RoutePolicy:
    """The policy of a route template (admin-only for a method the table does not know: fail closed)."""
    return policies.get(("GET" if method == "HEAD" else method, template), FAIL_CLOSED)


class RouteTable:
    """Matches a request path against the policy table's templates, from the path alone (no routing yet)."""

    def __init__(self, policies: dict[tuple[str, str], RoutePolicy]) -> None:
        self.policies = policies
        templates = dict.fromkeys(t for _, t in policies)
        # literal templates before parametrised ones, so /faces/subjects is not taken for /faces/{face_id}
        ordered = sorted(templates, key=lambda t: ("{" in t, t))
        self._compiled = [(compile_path(t)[0], t) for t in ordered]

    def match(self, method: str, path: str) -> tuple[str | None, RoutePolicy]:
        """(route template or None, the policy that applies)."""
        for regex, template in self._compiled:
            if regex.match(path):
                return template, policy_for(method, template, self.policies)
        return None, AUTHENTICATED


# -- principals and keys ----------------------------------------------------------------------------------


def hash_key(key: str) -> str:
    """The sha256 hex digest a key is stored and compared as."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeyFileError(ValueError):
    """The keys file is unreadable or malformed (start-up refuses to run with it)."""


@dataclass(frozen=True)
class KeyRing:
    """Every configured key (as a hash) and the principal it belongs to; empty means keys are off."""

    entries: tuple[tuple[bytes, Principal], ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.entries)

    def principal(self, key: str) -> Principal | None:
        """The principal whose key this is, comparing against every hash so timing tells nothing."""
        digest = hash_key(key).encode()
        found: Principal | None = None
        for stored, principal in self.entries:
            if hmac.compare_digest(digest, stored) and found is None:
                found = principal
        return found

    @classmethod
    def build(cls, plain_keys: Iterable[str], keys_file: Path | None) -> KeyRing:
        """Keys from the legacy list (principals key-1, key-2..., scopes read+write+metrics) and the keys file."""
        entries: list[tuple[bytes, Principal]] = []
        for i, key in enumerate(plain_keys, 1):
            entries.append((hash_key(key).encode(), Principal(f"key-{i}", frozenset({"read", "write", "metrics"}))))
        if keys_file is not None:
            entries.extend(_read_keys_file(keys_file))
        names = [p.name for _, p in entries]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise KeyFileError(f"principal names must be unique: {', '.join(dupes)}")
        return cls(tuple(entries))


def _read_keys_file(path: Path) -> list[tuple[bytes, Principal]]:
    """Parse the keys file: a JSON list of {name, key_sha256, scopes}."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read the keys file {path}: {exc}") from exc
    if not isinstance(raw, list):
        raise KeyFileError(f"{path}: expected a JSON list of {{name, key_sha256, scopes}}")
    out: list[tuple[bytes, Principal]] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise KeyFileError(f"{path}: entry {i} is not an object")
        name, digest, scopes = item.get("name"), item.get("key_sha256"), item.get("scopes")
        if not isinstance(name, str) or not name or len(name) > 64:
            raise KeyFileError(f"{path}: entry {i}: name must be a string of 1-64 characters")
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise KeyFileError(f"{path}: entry {i} ({name}): key_sha256 must be 64 lower-case hex digits")
        if not isinstance(scopes, list) or not scopes or any(s not in SCOPES for s in scopes):
            raise KeyFileError(f"{path}: entry {i} ({name}): scopes must be a non-empty list of {', '.join(SCOPES)}")
        out.append((digest.encode(), Principal(name, frozenset(scopes))))
    return out


def presented_key(headers: dict[bytes, bytes]) -> str | None:
    """The key a request carries: X-API-Key, or Authorization: Bearer."""
    key = headers.get(b"x-api-key")
    if key is not None:
        return key.decode("latin-1")
    auth = headers.get(b"authorization")
    if auth is not None:
        scheme, _, token = auth.decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


# -- admission ----------------------------------------------------------------------------------------------

_DRAIN_WINDOW_S = 10.0  # completions within this window give the drain rate
_LATENCY_ALPHA = 0.2


@dataclass
class Lane:
    """The in-flight bound of one application and what it has measured about draining."""

    limit: int
    in_flight: int = 0
    rejected: int = 0
    _done: deque[float] = field(default_factory=deque)  # completion times (monotonic) within the window
    _latency: float = 0.0  # running average of a request's time in flight

    def try_acquire(self) -> bool:
        if self.in_flight >= self.limit:
            self.rejected += 1
            return False
        self.in_flight += 1
        return True

    def release(self, seconds: float, now: float | None = None) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        now = time.monotonic() if now is None else now
        self._done.append(now)
        self._trim(now)
        self._latency = seconds if self._latency == 0.0 else (
            _LATENCY_ALPHA * seconds + (1 - _LATENCY_ALPHA) * self._latency)

    def _trim(self, now: float) -> None:
        while self._done and now - self._done[0] > _DRAIN_WINDOW_S:
            self._done.popleft()

    def drain_rate(self, now: float | None = None) -> float | None:
        """Completions per second recently, or None before enough were seen."""
        now = time.monotonic() if now is None else now
        self._trim(now)
        if len(self._done) < 2:
            return None
        span = max(now - self._done[0], 1e-3)
        return len(self._done) / span

    def expected_wait(self, now: float | None = None) -> float:
        """Seconds until a slot frees: one over the measured drain rate (slots free one at a time at that rate;
        measured against a retrying client, bench/abuse.py), else the mean latency spread over the slots."""
        rate = self.drain_rate(now)
        if rate is not None:
            return 1.0 / rate
        return (self._latency or 1.0) / max(1, self.in_flight)


class Admission:
    """One Lane per application."""

    def __init__(self, limits: dict[str, int]) -> None:
        self.lanes = {app: Lane(limit) for app, limit in limits.items()}

    def lane(self, application: str | None) -> Lane | None:
        return self.lanes.get(application) if application else None

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """In-flight counts, limits and rejections per application (for /metrics)."""
        return {a: {"in_flight": ln.in_flight, "limit": ln.limit, "rejected": ln.rejected}
                for a, ln in self.lanes.items()}


def retry_after_header(seconds: float) -> str:
    """Retry-After as delta-seconds (an integer, at least 1)."""
    return str(max(1, math.ceil(seconds)))


# -- deadlines ------------------------------------------------------------------------------------------------

# The monotonic time after which a request's queued work is not worth computing (None: no deadline).
# A context variable, so the batcher sees the deadline of whichever request submitted the work.
request_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("request_deadline", default=None)
DEADLINE_HEADER = b"x-request-timeout"


def parse_timeout(value: bytes | None, default: float | None) -> float | str | None:
    """Seconds a request may take (header, else the server's default), or an error message."""
    if value is None:
        return default
    try:
        seconds = float(value.decode("latin-1"))
    except ValueError:
        return "X-Request-Timeout must be a number of seconds"
    if not math.isfinite(seconds) or seconds <= 0 or seconds > 3600:
        return "X-Request-Timeout must be a number of seconds in (0, 3600]"
    return seconds if default is None else min(seconds, default)
