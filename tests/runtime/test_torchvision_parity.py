"""torchvision classifiers are built exactly as `torchvision.models.get_model(name, weights=W)` builds them.

torchvision's builders apply some arguments only when given weights (inception_v3 and googlenet:
transform_input=True and aux_logits; vit_h_14: image_size 518; num_classes, init_weights). A model
built with weights=None and loaded afterwards gets those wrong without any error, so these tests
compare our builds with torchvision's own, for every classifier torchvision lists, and never download.

Every-model checks run with parameters on the meta device (no memory, no initialisation cost) and
torchvision's state-dict loading made a no-op; real (small, random) files check a few models end to end.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
import torchvision.models._api as tv_api
from torch import nn

from app.runtime.registry import ModelRegistry, sha256_of
from models.zoo import build_classifier, build_torchvision, torchvision_classifiers

NAMES = sorted(torchvision.models.list_models(module=torchvision.models))


class _NotLoaded(dict):  # type: ignore[type-arg]
    """What torchvision's patched downloader returns in these tests; loading it is a no-op."""


@dataclasses.dataclass
class Offline:
    """Records what reached torchvision's downloader (which, patched, returns _NotLoaded)."""

    urls: list[str] = dataclasses.field(default_factory=list)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[Offline]:
    """torchvision's downloader patched to record and return _NotLoaded (a no-op to load)."""
    rec = Offline()

    def fake_download(url: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        rec.urls.append(url)
        return _NotLoaded()

    original_load = nn.Module.load_state_dict

    def load(self: nn.Module, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(state_dict, _NotLoaded):
            return None
        return original_load(self, state_dict, *args, **kwargs)

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", fake_download)
    monkeypatch.setattr(nn.Module, "load_state_dict", load)
    yield rec


@pytest.fixture
def meta_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parameters are created on the meta device: building vit_h_14 or regnet_y_128gf costs no memory and
    no initialisation (torch.device("meta") as a whole does not do: regnet computes widths with tensors)."""
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    monkeypatch.setattr(nn.Module, "register_parameter", register)


def signature(model: nn.Module) -> tuple[str, dict[str, Any], dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """What the builder arguments decide: classes, every plain attribute of every submodule (transform_input,
    aux_logits, image_size, eps, ...), and the state dict's keys, shapes and dtypes."""
    attrs: dict[str, Any] = {}
    for qual, module in model.named_modules():
        attrs[f"{qual}:class"] = type(module).__qualname__
        for k, v in vars(module).items():
            if not k.startswith("_") and k != "training" and isinstance(v, bool | int | float | str | tuple | list):
                attrs[f"{qual}.{k}"] = v
            elif v is None and not k.startswith("_"):
                attrs[f"{qual}.{k}"] = None
    state = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    return type(model).__qualname__, attrs, state


def _diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [f"{k}: ours {a.get(k, '<absent>')!r}, torchvision {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


def test_every_torchvision_classifier_is_covered() -> None:
    assert torchvision_classifiers() == NAMES and len(NAMES) >= 80


@pytest.mark.parametrize("name", NAMES)
def test_builder_argument_parity(name: str, offline: Offline, meta_parameters: None) -> None:
    """Our build (random weights, the registry's `untrained` path, through torchvision's builder with the
    local-file hook) has the classes, attributes and state-dict shapes of get_model(name, weights=DEFAULT)."""
    w = torchvision.models.get_model_weights(name).DEFAULT
    theirs = torchvision.models.get_model(name, weights=w)
    assert offline.urls == [w.url]  # torchvision's own path asked its downloader (patched here)
    ours = build_classifier("torchvision", {"name": name, "weights": f"{type(w).__name__}.{w.name}"}, 1000)
    assert offline.urls == [w.url], "our build reached torchvision's downloader"
    ours_sig, their_sig = signature(ours), signature(theirs)
    assert ours_sig[0] == their_sig[0]
    assert not _diff(ours_sig[1], their_sig[1]), _diff(ours_sig[1], their_sig[1])[:10]
    assert ours_sig[2] == their_sig[2]


@pytest.mark.filterwarnings("ignore:The default weight initialization:FutureWarning")  # the old build's
def test_old_build_differs_where_torchvision_sets_arguments_only_with_weights(
        offline: Offline, meta_parameters: None) -> None:
    """The bug this guards against: weights=None then loading misses what builders set only with weights."""
    for name, attr, expected in (("inception_v3", "transform_input", True), ("googlenet", "transform_input", True),
                                 ("googlenet", "aux_logits", False), ("vit_h_14", "image_size", 518)):
        w = torchvision.models.get_model_weights(name).DEFAULT
        old = torchvision.models.get_model(name, weights=None, num_classes=1000)
        ours = build_torchvision(name, f"{type(w).__name__}.{w.name}", None)
        assert getattr(ours, attr) == expected != getattr(old, attr), (name, attr)
    assert offline.urls == []


def test_trained_path_reads_the_given_state_dict_not_the_network(offline: Offline, meta_parameters: None) -> None:
    calls: list[int] = []

    def source() -> dict[str, Any]:
        calls.append(1)
        return _NotLoaded()

    model = build_torchvision("inception_v3", "Inception_V3_Weights.IMAGENET1K_V1", source)
    assert calls == [1] and offline.urls == []
    assert model.transform_input is True and model.AuxLogits is not None  # type: ignore[union-attr]


def test_wrong_weights_or_class_count_are_refused() -> None:
    with pytest.raises(ValueError, match="not weights of"):
        build_torchvision("resnet18", "ResNet50_Weights.IMAGENET1K_V2", None)
    with pytest.raises(ValueError, match="1000 categories, not 10"):
        build_torchvision("resnet18", "ResNet18_Weights.IMAGENET1K_V1", None, num_classes=10)


def test_local_file_hook_is_scoped_to_the_building_thread(offline: Offline, meta_parameters: None) -> None:
    """While one thread builds from a local file, another thread's torchvision calls are torchvision's own."""
    w = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    inside, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def source() -> dict[str, Any]:
        inside.set()
        release.wait(10)
        return _NotLoaded()

    def build() -> None:
        try:
            build_torchvision("resnet18", "ResNet18_Weights.IMAGENET1K_V1", source)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=build)
    t.start()
    try:
        assert inside.wait(10)
        assert isinstance(w.get_state_dict(progress=False), _NotLoaded)  # this thread: torchvision's downloader
        assert offline.urls == [w.url]
    finally:
        release.set()
        t.join(10)
    assert not errors and offline.urls == [w.url]


# --- end to end, real tensors: a random "published" file, loaded by the registry and by torchvision itself

def _published_like(name: str) -> dict[str, torch.Tensor]:
    """A random state dict shaped like torchvision's published file (aux heads included; densenet's old keys)."""
    torch.manual_seed(0)
    if name in ("googlenet", "inception_v3"):
        model = torchvision.models.get_model(name, weights=None, aux_logits=True, init_weights=False)
    else:
        model = torchvision.models.get_model(name, weights=None)
    # batch-norm statistics of real activations, so that outputs depend on the input (random layers with
    # default statistics mostly die out); eval mode elsewhere: the auxiliary heads do not run
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
            m.train()
    with torch.no_grad():
        model(torch.rand(4, 3, 96, 96))
    state = model.state_dict()
    if name.startswith("densenet"):  # the published files predate a rename ("norm.1" for "norm1")
        state = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v for k, v in state.items()
                 if not k.endswith("num_batches_tracked")}
    return state


@pytest.mark.parametrize("name", ["inception_v3", "googlenet", "densenet121"])
def test_registry_matches_torchvision_loading_the_same_file(name: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import app.runtime.registry as registry
    from models import zoo

    w = torchvision.models.get_model_weights(name).DEFAULT
    file_name = w.url.rsplit("/", 1)[-1]
    hub = tmp_path / "torch-home" / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    path = hub / "checkpoints" / file_name
    torch.save(_published_like(name), path)
    # torchvision's real path, untouched: its hub cache holds the file, so get_model reads it (no download)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))
    theirs = torchvision.models.get_model(name, weights=w).eval()

    # the registry: the same file in its weights dir, the name's hash prefix made to match this random file
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    (weights_dir / file_name).write_bytes(path.read_bytes())
    real = zoo.torchvision_weights(name)
    monkeypatch.setattr(registry, "torchvision_weights",
                        lambda n: dataclasses.replace(real, hash_prefix=sha256_of(path)[:10]))
    reg = ModelRegistry(weights_dir, tmp_path / "no-hub", torch.device("cpu"), allow_download=False,
                        allow_untrained=False)
    st = reg.load_classifier(name, warmup=False)
    assert st.status == "ready", st.reason
    assert st.loaded is not None and st.loaded.weights_tag == "trained" and st.loaded.weights_source == "weights_dir"
    ours = st.loaded.model
    assert signature(ours) == signature(theirs)
    if name != "densenet121":
        assert ours.transform_input is True  # type: ignore[union-attr]

    x = torch.rand(2, 3, 96, 96)
    with torch.inference_mode():
        expected = theirs(x)
        got = ours(x.contiguous(memory_format=torch.channels_last))
        scale = expected.abs().max().item()  # random logits reach the hundreds
        assert (got - expected).abs().max().item() <= 1e-5 * scale  # channels_last changes the rounding only
        if name != "densenet121":  # what the registry used to build: weights=None, then the file
            old = torchvision.models.get_model(name, weights=None, num_classes=1000, init_weights=False)
            old.load_state_dict(_published_like(name))
            assert (old.eval()(x) - expected).abs().max().item() > 1e-2 * scale


def test_untrained_registry_model_has_the_trained_architecture(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "w", tmp_path / "hub", torch.device("cpu"), allow_download=False,
                        allow_untrained=True)
    st = reg.load_classifier("googlenet", warmup=False)
    assert st.status == "ready" and st.loaded is not None and st.loaded.weights_tag == "untrained"
    model = st.loaded.model
    assert model.transform_input is True and model.aux_logits is False  # type: ignore[union-attr]
    assert model.aux1 is None and model.aux2 is None  # type: ignore[union-attr]
