"""The applications this service ships, each declared in its own module."""

from __future__ import annotations

from app.application import Application, route_policies
from app.apps import classification, faces, style, text
from app.gate import CORE_POLICIES

BUILTIN: tuple[Application, ...] = (classification.APP, text.APP, faces.APP, style.APP)

# the gate's table of the shipped server: the core routes and every shipped application's
ROUTE_POLICIES = route_policies(CORE_POLICIES, BUILTIN)
