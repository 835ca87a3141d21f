"""Reading the project's source for layering tests: which modules a file imports."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    """The dotted module name of a file under the repository root."""
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def imports_of(path: Path, *, top_level: bool = False) -> set[str]:
    """Absolute names of the modules a file imports (`from models import zoo` counts as models.zoo too).
    top_level: only what runs when the file is imported (not inside functions, not under `if TYPE_CHECKING:`),
    which is what can make an import loop."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    package = parts[:-1]  # the package a relative import starts from (for __init__.py: its own package)
    tree = ast.parse(path.read_text())
    if top_level:
        nodes: list[ast.AST] = []
        todo: list[ast.stmt] = list(tree.body)
        while todo:
            node = todo.pop()
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                todo.extend(node.orelse)
            elif isinstance(node, ast.If | ast.Try):
                todo.extend(n for n in ast.iter_child_nodes(node) if isinstance(n, ast.stmt))
            else:
                nodes.append(node)
    else:
        nodes = list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found
