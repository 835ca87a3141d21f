"""The service's layering, checked on the source: no import loop in app/ or models/, models/ never imports app/,
routers never reach stores or torch, services never import FastAPI, no core module names a shipped application."""

from __future__ import annotations

from tests.source import ROOT, imports_of, module_name


def _graph(*packages: str) -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in packages for p in (ROOT / pkg).rglob("*.py")}
    return {m: {d for d in imports_of(p, top_level=True) if d in files and d != m} for m, p in files.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, set()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_no_import_loop_in_app_or_models() -> None:
    assert _cycles(_graph("app", "models")) == []


def test_the_cycle_finder_finds_a_loop() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_layers() -> None:
    for p in (ROOT / "models").rglob("*.py"):
        assert not any(m.split(".")[0] == "app" for m in imports_of(p)), p
    for p in (ROOT / "app" / "api").glob("*.py"):
        bad = {m for m in imports_of(p) if m.startswith("app.stores") or m.split(".")[0] == "torch"}
        assert not bad, (p, bad)
    for p in (ROOT / "app" / "services").glob("*.py"):
        bad = {m for m in imports_of(p) if m.split(".")[0] in ("fastapi", "starlette") or m.startswith("app.api")}
        assert not bad, (p, bad)


def test_core_modules_name_no_shipped_application() -> None:
    """create_app and the lifespan iterate over declarations: the core never imports an application's router,
    service or declaration module."""
    shipped = {"app.api.classify", "app.api.text", "app.api.faces", "app.api.style", "app.services.classification",
               "app.services.text", "app.services.faces", "app.services.style", "app.apps.classification",
               "app.apps.text", "app.apps.faces", "app.apps.style"}
    for name in ("main", "gate", "middleware", "application"):
        imported = imports_of(ROOT / "app" / f"{name}.py")
        assert not imported & shipped, (name, imported & shipped)
