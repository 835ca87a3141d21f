"""Named principals with scopes: who is calling, and what they may do.

With no keys configured the service is single-tenant: every caller is the anonymous principal with
every scope (it sees every job, as before). With keys, each key belongs to a named principal whose
scopes decide which routes it may call; jobs record their owner's name.
"""

from __future__ import annotations

from dataclasses import dataclass

SCOPES = ("read", "write", "admin", "metrics")


@dataclass(frozen=True)
class Principal:
    """An authenticated caller (or the anonymous one when keys are off)."""

    name: str
    scopes: frozenset[str]
    authenticated: bool = True

    @property
    def is_admin(self) -> bool:
        """Admins see and control every caller's jobs."""
        return "admin" in self.scopes

    def can(self, scope: str) -> bool:
        """Whether this principal holds `scope` (admin holds every scope; "" is any authenticated caller)."""
        return scope == "" or scope in self.scopes or self.is_admin

    @property
    def owner_filter(self) -> str | None:
        """The owner whose records this caller may see: None (all) for admins and when keys are off."""
        return None if self.is_admin else self.name


ANONYMOUS = Principal("anonymous", frozenset(SCOPES), authenticated=False)
SCOPE_KEY = "cnn.principal"  # where the auth middleware puts the Principal in the ASGI scope
