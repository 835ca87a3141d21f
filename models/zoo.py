"""Architectures by name: the catalog of every model family, and torchvision's classifiers.

Importing this module registers every family the service can build (models.families): the project's
CIFAR families (their modules register themselves), the probability ensemble, torchvision's
classifiers, and the face and text builders (registered here, from their packages' public builders).
`build_model` builds any of them from a manifest's family and arch.

Pure PyTorch: builds modules and describes torchvision's published weights; never loads files
from the network by itself.

torchvision classifiers with published weights are built by torchvision's own builder,
`torchvision.models.get_model(name, weights=W)`, because builders apply some arguments only when they
are given weights (inception_v3 and googlenet: transform_input=True, aux_logits; vit_h_14: image_size
518; every one: num_classes from the weights' categories; vgg, inception, googlenet: init_weights).
Building with weights=None and loading afterwards silently gets those wrong. Only where the builder
fetches the state dict (`WeightsEnum.get_state_dict`, a download into the torch hub cache) is the
caller's verified local file read instead (see build_torchvision).
"""

from __future__ import annotations

import contextvars
import functools
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# the project's families register themselves when imported (ensemble imports the CIFAR member families)
from models import cifar_resnet, cifar_se_resnet, cifar_whitened, cifar_wide_resnet, ensemble  # noqa: F401
from models.families import arch_kwargs, build, list_families, register_family
from models.preprocess import ImageSpec
from models.text import TEXT_FAMILIES

# torch.hub's convention: the file name carries the first hex digits of the file's sha256
_HASH_PREFIX = re.compile(r"-([a-f0-9]*)\.")
_INTERP_NAMES = {"InterpolationMode.BILINEAR": "bilinear", "InterpolationMode.BICUBIC": "bicubic",
                 "InterpolationMode.NEAREST": "nearest"}


def torchvision_classifiers() -> list[str]:
    """Names of every torchvision classification architecture (torchvision.models.list_models)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


@dataclass(frozen=True)
class TorchvisionWeights:
    """What torchvision publishes about a model's default weights."""

    model: str
    enum: str
    url: str
    file_name: str
    hash_prefix: str
    labels: list[str]
    preprocessing: ImageSpec
    meta: dict[str, Any]


def torchvision_weights(name: str) -> TorchvisionWeights:
    """Default (best) weights of a torchvision classifier, with file name, hash prefix, labels, transforms."""
    import torchvision

    if name not in torchvision_classifiers():
        raise KeyError(f"{name!r} is not a torchvision classification model")
    enum_cls = torchvision.models.get_model_weights(name)
    weights = enum_cls.DEFAULT
    url = weights.url
    file_name = url.rsplit("/", 1)[-1]
    m = _HASH_PREFIX.search(file_name)
    t = weights.transforms()
    spec = ImageSpec(
        resize=int(t.resize_size[0]),
        crop=int(t.crop_size[0]),
        mean=tuple(float(v) for v in t.mean),  # type: ignore[arg-type]
        std=tuple(float(v) for v in t.std),  # type: ignore[arg-type]
        interpolation=_INTERP_NAMES.get(str(t.interpolation), "bilinear"),
    )
    meta = {k: v for k, v in weights.meta.items() if k != "categories"}
    return TorchvisionWeights(
        model=name, enum=f"{enum_cls.__name__}.{weights.name}", url=url, file_name=file_name,
        hash_prefix=m.group(1) if m else "", labels=list(weights.meta["categories"]), preprocessing=spec, meta=meta,
    )


# torchvision's DenseNet checkpoints predate a rename: "norm.1" was "norm1" and so on
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def fix_torchvision_state_dict(name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply the key renames torchvision itself applies when loading old checkpoints."""
    if not name.startswith("densenet"):
        return state
    fixed: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        m = _DENSENET_OLD_KEY.match(k)
        fixed[m.group(1) + m.group(2) if m else k] = v
    return fixed


# returns a fresh state dict on each call, as torch.load does: builders may rename its keys in place
# (densenet), and its `_metadata` (layer versions, which mnasnet needs) must be kept
StateDictSource = Callable[[], dict[str, torch.Tensor]]


@dataclass
class _LocalStateDict:
    """The state dict torchvision's builder gets, in place of a download, while build_torchvision runs."""

    weights: Any  # the torchvision WeightsEnum member being built
    load: StateDictSource
    calls: int = 0


# per thread and per asyncio task: another thread building (or downloading) meanwhile is unaffected
_LOCAL_STATE_DICT: contextvars.ContextVar[_LocalStateDict | None] = contextvars.ContextVar(
    "models.zoo.local_state_dict", default=None)
_HOOK_LOCK = threading.Lock()


def _local_state_dict_hook() -> Callable[..., Any]:
    """Route torchvision's `WeightsEnum.get_state_dict` to the caller's local file inside build_torchvision.

    Installed once (idempotent, under a lock). Outside a build_torchvision call, that is in every other
    thread and task, it calls torchvision's own method unchanged."""
    from torchvision.models._api import WeightsEnum

    with _HOOK_LOCK:
        current = WeightsEnum.__dict__.get("get_state_dict")
        if current is None:
            raise RuntimeError("this torchvision has no WeightsEnum.get_state_dict: cannot give its builders "
                               "a local weights file")
        if getattr(current, "_models_zoo_local", False):
            return current
        original = current

        @functools.wraps(original)
        def get_state_dict(self: Any, *args: Any, **kwargs: Any) -> Any:
            local = _LOCAL_STATE_DICT.get()
            if local is None:
                return original(self, *args, **kwargs)
            if self is not local.weights:
                raise RuntimeError(f"torchvision asked for the state dict of {self!r} while {local.weights!r} "
                                   "was being built")
            local.calls += 1
            return local.load()

        get_state_dict._models_zoo_local = True  # type: ignore[attr-defined]
        WeightsEnum.get_state_dict = get_state_dict  # type: ignore[method-assign]
        return get_state_dict


def _checkpoint_shape_kwargs(name: str, weights: Any) -> dict[str, Any]:
    """Builder arguments (weights=None) giving a module whose state dict has the keys and shapes of the
    published file of `weights`, which torchvision's builder loads (strictly) before its own adjustments."""
    kwargs: dict[str, Any] = {"num_classes": len(weights.meta["categories"])}
    if name in ("googlenet", "inception_v3"):
        # the files carry the auxiliary heads (the builder drops googlenet's after loading);
        # init_weights given explicitly: both classes warn when it is left unset
        kwargs.update(aux_logits=True, init_weights=True)
    elif name.startswith("vit_"):
        kwargs["image_size"] = int(weights.meta["min_size"][0])
    elif name.startswith("maxvit_"):
        kwargs["input_size"] = tuple(weights.meta["min_size"])
    return kwargs


def build_torchvision(name: str, weights: str, state_dict: StateDictSource | None, *,
                      num_classes: int | None = None) -> nn.Module:
    """`torchvision.models.get_model(name, weights=weights)`, exactly, with the state dict from
    `state_dict()` (the caller's verified local file) instead of a download.

    With `state_dict` None the module is the same (same builder arguments, same adjustments after
    loading) with random weights. `num_classes`, when given, must equal the weights' category count.
    torchvision's downloader is not reached from here: its builders get their state dict through
    `WeightsEnum.get_state_dict`, routed to `state_dict` for this call only (and this thread or task only);
    tests/runtime/test_torchvision_parity.py checks that for every classifier torchvision lists."""
    import torchvision

    w = torchvision.models.get_weight(weights)
    if w not in list(torchvision.models.get_model_weights(name)):
        raise ValueError(f"{weights} are not weights of torchvision's {name}")
    categories = len(w.meta["categories"])
    if num_classes is not None and num_classes != categories:
        raise ValueError(f"{weights} has {categories} categories, not {num_classes}")
    if state_dict is None:  # random weights, shaped like the published file
        state_dict = torchvision.models.get_model(name, weights=None, **_checkpoint_shape_kwargs(name, w)).state_dict
    hook = _local_state_dict_hook()
    if type(w).get_state_dict is not hook:  # a subclass overriding it would download: refuse instead
        raise RuntimeError(f"{type(w).__name__} loads its state dict by itself: cannot give it a local file")
    local = _LocalStateDict(w, state_dict)
    token = _LOCAL_STATE_DICT.set(local)
    try:
        model: nn.Module = torchvision.models.get_model(name, weights=w)
    finally:
        _LOCAL_STATE_DICT.reset(token)
    if local.calls != 1:
        raise RuntimeError(f"torchvision's {name} builder read its state dict {local.calls} times, expected once")
    return model


@register_family("torchvision", task="image-classification")
def build_torchvision_family(arch: dict[str, Any], num_classes: int, **_: Any) -> nn.Module:
    """A torchvision classifier; arch: name, weights (optional "<Enum>.<member>" it is built for).

    An arch naming its weights is built as torchvision builds it with those weights (build_torchvision),
    random weights included."""
    kw = arch_kwargs("torchvision", arch, ("name", "weights"), num_classes)
    if "name" not in kw:
        raise ValueError("a torchvision arch needs the model's 'name'")
    if kw.get("weights"):
        return build_torchvision(str(kw["name"]), str(kw["weights"]), None, num_classes=num_classes)
    import torchvision

    return torchvision.models.get_model(str(kw["name"]), weights=None, num_classes=num_classes)


@register_family("face-resnet", task="face-embedding")
def build_face_resnet(arch: dict[str, Any], num_classes: int = 0, **_: Any) -> nn.Module:
    """The project's face embedder (models.faces.net); arch: size, dim, widths, blocks, dropout."""
    from models.faces.net import build_embedder

    return build_embedder(arch)


@register_family("face-ensemble", task="face-embedding")
def build_face_ensemble_family(arch: dict[str, Any], num_classes: int = 0, **_: Any) -> nn.Module:
    """Face embedders sharing one crop, embeddings concatenated (models.faces.ensemble); arch: members, mean, std."""
    from models.faces.ensemble import build_face_ensemble

    return build_face_ensemble(arch)


def _text_vocab_size(encoding: dict[str, Any]) -> int:
    """The vocabulary size a text model's manifest encoding gives (character or, where models.text reads
    them, word encodings)."""
    try:
        from models.text import text_encoding_from_dict
    except ImportError:  # a models.text with character encodings only
        from models.text import CharSpec

        return CharSpec.from_dict(encoding).vocab_size
    return int(text_encoding_from_dict(encoding).vocab_size)


def _register_text_family(family: str) -> None:
    def build_text(arch: dict[str, Any], num_classes: int, *, vocab_size: int | None = None,
                   encoding: dict[str, Any] | None = None, **_: Any) -> nn.Module:
        from models.text import build_text_model

        if vocab_size is None:
            if not encoding:
                raise ValueError(f"a {family} model needs its encoding (or vocab_size)")
            vocab_size = _text_vocab_size(encoding)
        return build_text_model(family, arch, num_classes, vocab_size)

    build_text.__doc__ = f"Text CNN {family!r} (models.text.build_text_model); context: encoding or vocab_size."
    build_text.__qualname__ = f"build_text[{family}]"
    register_family(family, task="text-classification")(build_text)


for _family in TEXT_FAMILIES:
    _register_text_family(_family)


def build_model(family: str, arch: dict[str, Any], num_classes: int, *, task: str | None = None,
                **context: Any) -> nn.Module:
    """An untrained model of any registered family (see models.families.build; context: e.g. a text model's
    `encoding`)."""
    return build(family, arch, num_classes, task=task, **context)


def families(task: str | None = None) -> list[str]:
    """Every family this catalog can build (of one task)."""
    return list_families(task)


def build_classifier(family: str, arch: dict[str, Any], num_classes: int) -> nn.Module:
    """An untrained image classifier of a registered family ("cifar-resnet", "cifar-se-resnet",
    "cifar-wide-resnet", "cifar-resnet-ensemble", "torchvision", ...)."""
    return build(family, arch, num_classes, task="image-classification")
