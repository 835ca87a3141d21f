"""Model families by name: builders registered with a decorator, looked up by a manifest's `family`.

In the spirit of torchvision's `register_model`: a module that defines a family decorates its builder
with `@register_family("name", task=...)`, and importing the module registers it. This module is the
leaf of the model package (it imports no family), so no family module imports another one through it;
`models.zoo` imports every family module of the project (and registers the face and text builders),
which is what callers that build from a manifest import.

A builder is called as ``builder(arch, num_classes, **context)``: `arch` is the manifest entry's arch
dict, `num_classes` the number of its labels (0 for embedders), and `context` what a task adds (text
models: ``vocab_size`` from the character encoding).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

Builder = Callable[..., nn.Module]
B = TypeVar("B", bound=Builder)


@dataclass(frozen=True)
class ModelFamily:
    """One registered family: its name, the task its models serve and its builder."""

    name: str
    task: str
    builder: Builder
    description: str


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(name: str, *, task: str) -> Callable[[B], B]:
    """Decorator: register `builder(arch, num_classes, **context) -> nn.Module` as the family `name`."""

    def wrap(builder: B) -> B:
        old = _FAMILIES.get(name)
        # the same function registered again (a module re-imported) is fine; two families with one name are not
        if old is not None and (old.builder.__module__, old.builder.__qualname__) != (
                builder.__module__, builder.__qualname__):
            raise ValueError(f"model family {name!r} is already registered by {old.builder.__module__}")
        doc = (builder.__doc__ or "").strip().splitlines()
        _FAMILIES[name] = ModelFamily(name, task, builder, doc[0] if doc else "")
        return builder

    return wrap


def get_family(name: str) -> ModelFamily:
    """The registered family `name`; ValueError naming the registered ones when it is unknown."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; registered: {', '.join(sorted(_FAMILIES))}") from None


def list_families(task: str | None = None) -> list[str]:
    """Names of the registered families (of one task), sorted."""
    return sorted(n for n, f in _FAMILIES.items() if task is None or f.task == task)


def build(family: str, arch: Mapping[str, Any], num_classes: int, *, task: str | None = None,
          **context: Any) -> nn.Module:
    """An untrained model of a registered family (refused when the family serves another task than `task`)."""
    fam = get_family(family)
    if task is not None and fam.task != task:
        raise ValueError(f"model family {family!r} builds {fam.task} models, not {task} models")
    return fam.builder(dict(arch), num_classes, **context)


def arch_kwargs(family: str, arch: Mapping[str, Any], known: Iterable[str], num_classes: int) -> dict[str, Any]:
    """The builder arguments of an arch dict: unknown keys refused (a typo must not silently build a default
    model), an informational `num_classes` checked against the labels and dropped."""
    kwargs = dict(arch)
    recorded = kwargs.pop("num_classes", None)
    if recorded is not None and int(recorded) != num_classes:
        raise ValueError(f"{family} arch says num_classes={recorded} but the model has {num_classes} labels")
    unknown = set(kwargs) - set(known)
    if unknown:
        raise ValueError(f"unknown {family} arch keys: {sorted(unknown)} (known: {sorted(known)})")
    return kwargs
