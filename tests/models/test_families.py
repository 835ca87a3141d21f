"""The family registry: every registered family builds (tiny args), every shipped manifest entry builds and
loads its weights strictly, and the model package has no import of app/ and no import cycle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from models import families, zoo
from models.manifest import load_manifest
from models.text import TEXT_FAMILIES, CharSpec
from models.weights import read_state_dict, sha256_file
from tests.conftest import ROOT
from tests.source import imports_of

IMAGE = "image-classification"
TEXT_SPEC = CharSpec.from_dict({"alphabet": "abc ", "length": 128, "lowercase": True})


def _image(side: int) -> torch.Tensor:
    return torch.randn(2, 3, side, side)


def _chars() -> torch.Tensor:
    return TEXT_SPEC.encode(["abc ab", "cab"])


# per family: (arch, num_classes, input, context). A new family must be added here: the test below fails otherwise
# (the same rule as torchvision's extended model tests).
TINY: dict[str, tuple[dict[str, Any], int, Any, dict[str, Any]]] = {
    "cifar-resnet": ({"depth": 8}, 3, lambda: _image(32), {}),
    "cifar-se-resnet": ({"depth": 8, "reduction": 4}, 3, lambda: _image(32), {}),
    "cifar-wide-resnet": ({"depth": 10, "width": 1, "dropout": 0.3}, 3, lambda: _image(32), {}),
    "cifar-whitened-convnet": ({"widths": [8, 8, 8], "convs": 1}, 3, lambda: _image(32), {}),
    "cifar-resnet-ensemble": ({"members": [{"depth": 8}, {"family": "cifar-wide-resnet", "depth": 10, "width": 1},
                                           {"family": "cifar-se-resnet", "depth": 8}]}, 3, lambda: _image(32), {}),
    "torchvision": ({"name": "squeezenet1_1"}, 3, lambda: _image(64), {}),
    "face-resnet": ({"size": 32, "dim": 16, "widths": [4, 8, 8, 8], "blocks": [1, 1, 1, 1]}, 0,
                    lambda: _image(32), {}),
    "face-ensemble": ({"members": [{"arch": {"size": 32, "dim": 8, "widths": [4, 8, 8, 8], "blocks": [1, 1, 1, 1]},
                                    "mean": [0.5] * 3, "std": [0.25] * 3},
                                   {"arch": {"size": 32, "dim": 4, "widths": [4, 4, 4, 4], "blocks": [1, 1, 1, 1]},
                                    "mean": [0.4] * 3, "std": [0.2] * 3}],
                       "mean": [0.5] * 3, "std": [0.25] * 3}, 0, lambda: _image(32), {}),
    "vdcnn": ({"depth": 9, "hidden": 16}, 3, _chars, {"encoding": TEXT_SPEC.to_dict()}),
    "char-cnn": ({"length": 128, "size": "small"}, 3, _chars, {"vocab_size": TEXT_SPEC.vocab_size}),
}


def test_every_registered_family_has_a_tiny_case() -> None:
    assert set(zoo.families()) >= set(TINY) - set(TEXT_FAMILIES)
    # families a test registers for its own toy application (tests/api/test_declared_application.py) are not the
    # project's
    ours = {f for f in zoo.families() if not families.get_family(f).builder.__module__.startswith("tests.")}
    missing = ours - set(TINY)
    # a text family added by models.text (its own tests build it) is allowed here only when it is a text family
    assert all(families.get_family(f).task == "text-classification" for f in missing), missing


def test_text_families_are_those_of_models_text() -> None:
    assert set(zoo.families("text-classification")) == set(TEXT_FAMILIES)


@pytest.mark.parametrize("family", sorted(TINY))
def test_every_registered_family_builds_and_runs(family: str) -> None:
    if family not in zoo.families():
        pytest.skip(f"{family} is not registered by this models.text")
    arch, num_classes, make_input, context = TINY[family]
    fam = families.get_family(family)
    assert fam.description, f"{family}: its builder needs a one-line docstring"
    torch.manual_seed(0)
    model = zoo.build_model(family, arch, num_classes, task=fam.task, **context).eval()
    assert isinstance(model, nn.Module)
    with torch.no_grad():
        out = model(make_input())
    width = (num_classes if fam.task != "face-embedding" else
             arch["dim"] if "dim" in arch else sum(m["arch"]["dim"] for m in arch["members"]))
    assert out.shape == (2, width) and torch.isfinite(out).all()


def test_family_lookup_refuses_unknown_names_tasks_and_duplicates() -> None:
    with pytest.raises(ValueError, match=r"unknown model family 'nope'.*cifar-resnet"):
        zoo.build_model("nope", {}, 3)
    with pytest.raises(ValueError, match="builds image-classification models, not text-classification"):
        zoo.build_model("cifar-resnet", {}, 3, task="text-classification")
    with pytest.raises(ValueError, match="face-embedding models, not image-classification"):
        zoo.build_classifier("face-resnet", {"size": 32}, 3)

    def other(arch: dict[str, Any], num_classes: int, **_: Any) -> nn.Module:
        return nn.Identity()

    with pytest.raises(ValueError, match="already registered"):
        families.register_family("cifar-resnet", task=IMAGE)(other)
    assert families.get_family("cifar-resnet").builder is not other


def test_registering_a_family_makes_it_buildable_by_name() -> None:
    @families.register_family("test-linear", task=IMAGE)
    def build_linear(arch: dict[str, Any], num_classes: int, **_: Any) -> nn.Module:
        """A linear probe (test only)."""
        kw = families.arch_kwargs("test-linear", arch, ("inputs",), num_classes)
        return nn.Linear(int(kw["inputs"]), num_classes)

    try:
        assert "test-linear" in families.list_families(IMAGE)
        model = zoo.build_classifier("test-linear", {"inputs": 5, "num_classes": 2}, 2)
        assert isinstance(model, nn.Linear) and model.out_features == 2
        assert families.register_family("test-linear", task=IMAGE)(build_linear) is build_linear  # re-import: fine
    finally:
        families._FAMILIES.pop("test-linear")


MANIFEST = load_manifest(ROOT / "weights")


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_every_manifest_entry_builds_and_loads_its_weights_strictly(name: str, tmp_path: Path) -> None:
    entry = MANIFEST[name]
    path = ROOT / "weights" / entry.file
    assert path.is_file() and sha256_file(path) == entry.sha256, name
    if entry.family == "onnx":  # not a PyTorch family: the registry serves it through onnxruntime
        from app.runtime.registry import ModelRegistry

        st = ModelRegistry(ROOT / "weights", tmp_path / "hub", torch.device("cpu"), allow_download=False,
                           allow_untrained=False).load(name, entry.task, warmup=False)
        assert st.status == "ready", st.reason
        return
    assert entry.family in families.list_families(entry.task), (name, entry.family)
    model = zoo.build_model(entry.family, entry.arch, len(entry.labels), task=entry.task,
                            encoding=(entry.model_extra or {}).get("encoding"))
    state = read_state_dict(path)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(model.state_dict()) == set(state)


def _module_graph() -> dict[str, set[str]]:
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "models").rglob("*.py")}
    return {m: {d for d in imports_of(p) if d in files and d != m} for m, p in files.items()}


def test_models_never_import_app() -> None:
    for p in (ROOT / "models").rglob("*.py"):
        assert not any(m.split(".")[0] == "app" for m in imports_of(p)), p


def test_family_modules_have_no_import_cycle() -> None:
    graph = _module_graph()
    assert "models.zoo" not in graph["models.ensemble"]  # the old loop: zoo <-> ensemble
    assert not graph["models.families"], "models.families must stay the leaf every family imports"
    mine = {"models.families", "models.zoo", "models.ensemble", "models.cifar_resnet", "models.cifar_se_resnet",
            "models.cifar_wide_resnet", "models.manifest", "models.weights", "models.train.images",
            "models.train.ensemble", "models.train.common"}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for d in graph.get(todo.pop(), set()) - seen:
                if d == goal:
                    return True
                seen.add(d)
                todo.append(d)
        return False

    cycles = [m for m in mine if reaches(m, m)]
    assert not cycles, cycles
