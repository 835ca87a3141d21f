"""The model registry: manifest, weights resolution, loading, per-model status.

Weights resolution (the same for every model, DESIGN.md):
1. a file in the weights directory whose sha256 matches the manifest (torchvision files: the hash
   prefix their file name carries, the check torch.hub itself makes);
2. the torch hub cache ($TORCH_HOME/hub/checkpoints) under torchvision's own file name;
3. a download, only when downloads are enabled, failing fast when the network is unreachable;
4. otherwise the model is unavailable (503 naming the file), unless untrained weights are
   explicitly allowed, in which case it runs with random weights labelled "untrained".

Steps 1-3 and the manifest schema are library code in models.weights and models.manifest; the models are
built by family through the registry of models.families (filled by models.zoo).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from models.faces.identification import ImpostorTable

# the manifest schema and weights resolution live with the models (models/ never imports app/); re-exported
# here under the names the service and its tests use
from models.manifest import MANIFEST_NAME, Manifest, ManifestEntry, PreprocessingEntry, load_manifest
from models.preprocess import ImageSpec
from models.tta import TTA_MODES, tta_probabilities
from models.weights import (
    ResolvedWeights,
    WeightsRef,
    WeightsUnavailable,
    check_reachable,
    download_weights,
    hub_checkpoint_dir,
    read_state_dict,
    resolve_weights,
)
from models.weights import sha256_file as sha256_of
from models.zoo import build_model as build_family_model
from models.zoo import build_torchvision, fix_torchvision_state_dict, torchvision_classifiers, torchvision_weights

from .cuda_graphs import GraphedForward
from .device import inference_context, prepare_model, stack_inputs, to_device, to_device_batch

__all__ = [
    "MANIFEST_NAME", "LoadedClassifier", "LoadedFaceEmbedder", "LoadedModel", "LoadedOnnxFaceEmbedder",
    "LoadedTextClassifier", "Manifest", "ManifestEntry", "ModelRegistry", "ModelSpec", "ModelState",
    "PreprocessingEntry", "ResolvedWeights", "WeightsRef", "WeightsUnavailable", "build_model", "check_reachable",
    "download_weights", "fetch_torchvision_weights", "hub_checkpoint_dir", "load_manifest", "read_state_dict",
    "resolve_weights", "sha256_of", "spec_from_manifest", "spec_from_torchvision",
]

log = logging.getLogger(__name__)

# tasks whose inputs have fixed shapes per batch size (images of the model's size), so CNN_CUDA_GRAPHS records a
# few graphs per model; a text batch's shape follows its longest text
GRAPHED_TASKS = ("image-classification", "face-embedding")

Status = Literal["loading", "ready", "unavailable", "failed", "unloading"]


@dataclass
class ModelSpec:
    """Everything needed to build, load and describe one servable model."""

    name: str
    task: str
    family: str
    arch: dict[str, Any]
    labels: list[str]
    preprocessing: ImageSpec | None
    weights: WeightsRef
    source: str
    metrics: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    encoding: dict[str, Any] | None = None


def spec_from_manifest(entry: ManifestEntry) -> ModelSpec:
    """A ModelSpec from a manifest entry."""
    pre = ImageSpec.from_dict(entry.preprocessing.model_dump()) if entry.preprocessing else None
    extra = dict(entry.model_extra or {})
    encoding = extra.pop("encoding", None)
    info = {"training": entry.training, "card": entry.card, "license": entry.license, **extra}
    return ModelSpec(
        name=entry.name, task=entry.task, family=entry.family, arch=entry.arch, labels=entry.labels,
        preprocessing=pre, weights=WeightsRef(entry.file, sha256=entry.sha256, url=extra.get("url")),
        source=entry.source, metrics=entry.metrics, info=info, encoding=encoding,
    )


def spec_from_torchvision(name: str) -> ModelSpec:
    """A ModelSpec from torchvision's own weights metadata (file name, hash, transforms, categories)."""
    tw = torchvision_weights(name)
    metrics = {k: v for k, v in tw.meta.get("_metrics", {}).get("ImageNet-1K", {}).items()}
    return ModelSpec(
        name=name, task="image-classification", family="torchvision", arch={"name": name, "weights": tw.enum},
        labels=tw.labels,
        preprocessing=tw.preprocessing,
        weights=WeightsRef(tw.file_name, hash_prefix=tw.hash_prefix, url=tw.url),
        source=f"torchvision {tw.enum}", metrics=metrics,
        info={"recipe": tw.meta.get("recipe"), "num_params": tw.meta.get("num_params"),
              "license": "see torchvision's model documentation (ImageNet-1K, non-commercial terms may apply)"},
    )


class LoadedModel:
    """A model ready to serve: one small contract, preprocess -> batched forward -> probabilities."""

    task = ""

    def __init__(self, spec: ModelSpec, model: nn.Module, device: torch.device, weights_tag: str,
                 weights_source: str) -> None:
        self.spec = spec
        self.model = model
        self.device = device
        self.weights_tag = weights_tag
        self.weights_source = weights_source

    def _probabilities(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self._probability_rows(x).unbind(0))

    def _probability_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax of the model's logits, on the CPU (one row per input)."""
        with inference_context(self.device):
            logits = self.model(x)
        return logits.float().softmax(-1).cpu()

    def forward(self, batch: list[Any]) -> list[torch.Tensor]:
        """Class probabilities, one row per input (runs off the event loop)."""
        raise NotImplementedError

    def warmup(self) -> None:
        """One forward at start-up so the first request does not pay for lazy initialisation."""
        raise NotImplementedError

    def warmup_input(self) -> Any | None:
        """One input of the model's kind for warm-up passes of any batch size (None: the adapter has none, and
        the first requests of each batch size pay for its tuning)."""
        return None


class LoadedClassifier(LoadedModel):
    """An image classifier; inputs are CHW tensors made by its ImageSpec."""

    task = "image-classification"

    def __init__(self, spec: ModelSpec, model: nn.Module, device: torch.device, weights_tag: str,
                 weights_source: str) -> None:
        super().__init__(spec, model, device, weights_tag, weights_source)
        if spec.preprocessing is None:
            raise ValueError(f"{spec.name}: an image classifier needs its preprocessing")
        self.preprocessing: ImageSpec = spec.preprocessing
        tta = spec.info.get("test_time_augmentation")
        if tta is not None and tta not in TTA_MODES:
            raise ValueError(f"{spec.name}: unknown test_time_augmentation {tta!r} (supported: {', '.join(TTA_MODES)})")
        self.tta: str | None = tta

    def forward(self, batch: list[torch.Tensor]) -> list[torch.Tensor]:
        """Class probabilities for a list of preprocessed CHW tensors (averaged over the views of the manifest's
        test-time augmentation, models.tta: all views in one batch, made where the batch is)."""
        x = to_device_batch(stack_inputs(batch), self.device)
        return list(tta_probabilities(self._probability_rows, x, self.tta).unbind(0))

    def warmup(self) -> None:
        """One forward on a black image of the model's input size."""
        self.forward([self.warmup_input()])

    def warmup_input(self) -> torch.Tensor:
        side = self.preprocessing.crop
        return torch.zeros(3, side, side)


class LoadedTextClassifier(LoadedModel):
    """A text classifier (character- or word-level); inputs are raw strings, encoded as the model was trained."""

    task = "text-classification"

    def __init__(self, spec: ModelSpec, model: nn.Module, device: torch.device, weights_tag: str,
                 weights_source: str) -> None:
        super().__init__(spec, model, device, weights_tag, weights_source)
        from models.text import TextEncoder, text_encoder

        if not spec.encoding:
            raise ValueError(f"{spec.name}: a text model needs its encoding")
        # a word model's vocabulary is in its state dict: the encoder is made from the manifest and the model
        self.encoding: TextEncoder = text_encoder(spec.encoding, model)

    def forward(self, batch: list[str]) -> list[torch.Tensor]:
        """Class probabilities for a list of texts."""
        return self._probabilities(to_device(self.encoding.encode(batch), self.device))

    def warmup(self) -> None:
        """One forward on a short text."""
        self.forward([self.warmup_input()])

    def warmup_input(self) -> str:
        return "warm-up"


class LoadedFaceEmbedder(LoadedModel):
    """A face embedder; inputs are face crops as CHW tensors made by its ImageSpec, outputs unit vectors.

    The manifest gives the crop (size, margin), the threshold on squared L2 distances calibrated for
    this model (1:1 verification), the impostor-distance table that 1:N identification thresholds are
    calibrated from (`identification`, optional), and whether embeddings average the face with its mirror image."""

    task = "face-embedding"

    def __init__(self, spec: ModelSpec, model: nn.Module | None, device: torch.device, weights_tag: str,
                 weights_source: str) -> None:
        super().__init__(spec, model, device, weights_tag, weights_source)  # type: ignore[arg-type]
        if spec.preprocessing is None:
            raise ValueError(f"{spec.name}: a face embedder needs its preprocessing")
        self.preprocessing: ImageSpec = spec.preprocessing
        crop = spec.info.get("face_crop") or {}
        self.crop_size = int(crop.get("size", self.preprocessing.crop))
        self.crop_margin = float(crop.get("margin", 0.1))
        self.crop_align = str(crop.get("align", "none"))  # "eyes": level the eye line before embedding
        emb = spec.info.get("embedding") or {}
        self.dim = int(emb.get("dim", spec.arch.get("dim", 0)))
        self.flip_average = bool(emb.get("flip_average", False))
        self.threshold = float(spec.info.get("threshold", 1.0))
        ident = spec.info.get("identification")
        # the impostor-distance table that 1:N thresholds are calibrated from (None: identify falls back to tau)
        self.identification: ImpostorTable | None = ImpostorTable.from_manifest(ident) if ident else None
        self.sha256 = spec.weights.sha256 or spec.weights.hash_prefix or ""
        if weights_tag != "trained":
            self.sha256 = "untrained"
            self.identification = None  # calibrated on the trained weights, not on random ones

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        with inference_context(self.device):
            out = self.model(x)
        return out.float()

    def forward(self, batch: list[torch.Tensor]) -> list[torch.Tensor]:
        """Unit embeddings for a list of preprocessed CHW face crops."""
        x = to_device_batch(stack_inputs(batch), self.device)
        n = len(batch)
        if self.flip_average:
            e = self._embed(torch.cat([x, x.flip(-1)]))  # mirrored where the batch is: copied once
            e = e[:n] + e[n:]
        else:
            e = self._embed(x)
        e = torch.nn.functional.normalize(e, dim=-1).cpu()
        if e.shape[-1] != self.dim:
            raise RuntimeError(f"{self.spec.name} returned {e.shape[-1]}-d embeddings, its manifest says {self.dim}")
        return list(e.unbind(0))

    def warmup(self) -> None:
        """One forward on a grey face crop."""
        self.forward([self.warmup_input()])

    def warmup_input(self) -> torch.Tensor:
        side = self.preprocessing.crop
        return torch.zeros(3, side, side)


ONNX_INSTALL_HINT = ("pip install 'cnn-apps[onnx]' for onnxruntime's CPU build, or 'cnn-apps[onnx-gpu]' for its CUDA "
                     "build (one or the other: both install the module onnxruntime)")


class OnnxModule:
    """An onnxruntime session behind a callable like an nn.Module's forward (NCHW float32 in, float32 out).

    The batch is handed to onnxruntime where it lies, through an I/O binding: on CUDA with onnxruntime's CUDA
    provider (the `onnx-gpu` extra) the input is read from, and the output written to, torch's device memory, with
    no copy through the host; otherwise the batch is copied to host memory once. onnxruntime is an optional
    dependency (extras `onnx` / `onnx-gpu`): without it the model fails to load with a message saying how to get it.
    """

    def __init__(self, path: Path, device: torch.device) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeError(f"ONNX models need onnxruntime, which is not installed: {ONNX_INSTALL_HINT}") from exc

        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))  # type: ignore[arg-type]
            else:
                log.warning("%s: onnxruntime has no CUDA provider here, so this ONNX model runs on the CPU (%s)",
                            path.name, ONNX_INSTALL_HINT)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        # where the session runs: CUDA only if onnxruntime could start its CUDA provider (it falls back to the CPU,
        # with a warning of its own, when the CUDA or cuDNN libraries it was built for are missing)
        self.device = (torch.device("cuda", device.index or 0)
                       if self.session.get_providers()[0] == "CUDAExecutionProvider" else torch.device("cpu"))
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input_name, self.output_name = inp.name, out.name
        # the output's shape after the batch dimension, when the model states it and both ends are float32 (else
        # session.run, which allocates the output itself)
        tail = list(out.shape)[1:]
        bindable = inp.type == out.type == "tensor(float)" and all(isinstance(d, int) and d > 0 for d in tail)
        self.output_tail: list[int] | None = tail if bindable else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # onnxruntime reads the buffer as NCHW: a channels_last batch must be made C-contiguous first
        x = x.detach().to(self.device, torch.float32).contiguous()
        if self.output_tail is None:
            out = self.session.run(None, {self.input_name: x.cpu().numpy()})[0]
            return torch.from_numpy(out)
        y = torch.empty([x.shape[0], *self.output_tail], dtype=torch.float32, device=self.device)
        kind, index = self.device.type, self.device.index or 0
        if kind == "cuda":  # onnxruntime runs on its own stream: the batch must be complete before it reads it
            torch.cuda.current_stream(self.device).synchronize()
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, kind, index, np.float32, list(x.shape), x.data_ptr())
        binding.bind_output(self.output_name, kind, index, np.float32, list(y.shape), y.data_ptr())
        self.session.run_with_iobinding(binding)  # returns once the outputs are written (it synchronises its stream)
        return y


class LoadedOnnxFaceEmbedder(LoadedFaceEmbedder):
    """A third-party face model exported to ONNX (family "onnx"): input size, normalisation, output size
    and threshold come from its manifest entry; the output is L2-normalised here."""

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.float()).float()  # type: ignore[operator]


_LOADERS: dict[str, type[LoadedModel]] = {
    c.task: c for c in (LoadedClassifier, LoadedTextClassifier, LoadedFaceEmbedder)}


def build_model(spec: ModelSpec, weights_path: Path | None = None) -> nn.Module:
    """The module for a spec (family and arch from the manifest or torchvision) with the weights of
    `weights_path` (a verified file), or random weights without one.

    A torchvision arch naming its weights is built exactly as `torchvision.models.get_model(name,
    weights=...)` builds it, the file read from here instead of downloaded: builders set some arguments
    only with weights (inception_v3 and googlenet: transform_input=True) and fix old checkpoint keys."""
    if spec.family == "torchvision" and spec.arch.get("weights"):
        source = None if weights_path is None else functools.partial(read_state_dict, weights_path)
        return build_torchvision(str(spec.arch["name"]), str(spec.arch["weights"]), source,
                                 num_classes=len(spec.labels))
    model = _build_untrained(spec)
    if weights_path is not None:
        sd = read_state_dict(weights_path)
        if spec.family == "torchvision":
            sd = fix_torchvision_state_dict(str(spec.arch["name"]), sd)
        model.load_state_dict(sd)
    return model


def _build_untrained(spec: ModelSpec) -> nn.Module:
    """A module with random weights: the manifest's family, looked up in the family registry (models.zoo),
    which must build models of the spec's task."""
    return build_family_model(spec.family, spec.arch, len(spec.labels), task=spec.task, encoding=spec.encoding)


@dataclass
class ModelState:
    """Status of one configured model, as /models and /health/ready report it."""

    name: str
    task: str
    status: Status = "loading"
    reason: str | None = None
    spec: ModelSpec | None = None
    loaded: LoadedModel | None = None
    load_seconds: float | None = None
    weights_override: WeightsOverride | None = None


@dataclass(frozen=True)
class WeightsOverride:
    """Weights given to a running server for a model (instead of its manifest file): file and its sha256."""

    path: Path
    sha256: str


class ModelRegistry:
    """Configured models, their status and the loaded instances."""

    def __init__(self, weights_dir: Path, hub_dir: Path, device: torch.device, *, allow_download: bool,
                 allow_untrained: bool, compile_model: bool = False, cuda_graphs: bool = False,
                 adapters: dict[str, type[LoadedModel]] | None = None) -> None:
        self.adapters = dict(_LOADERS if adapters is None else adapters)  # task -> its loaded-model adapter
        self.weights_dir = weights_dir
        self.hub_dir = hub_dir
        self.device = device
        self.allow_download = allow_download
        self.allow_untrained = allow_untrained
        self.compile_model = compile_model
        self.cuda_graphs = cuda_graphs
        self.manifest = load_manifest(weights_dir)
        self.states: dict[str, ModelState] = {}

    def spec_for(self, name: str) -> ModelSpec:
        """The spec of a manifest model or a torchvision classifier; KeyError when unknown."""
        if name in self.manifest:
            return spec_from_manifest(self.manifest[name])
        if name in torchvision_classifiers():
            return spec_from_torchvision(name)
        raise KeyError(name)

    def load_classifier(self, name: str, *, warmup: bool = True) -> ModelState:
        """Load an image classifier (see load)."""
        return self.load(name, "image-classification", warmup=warmup)

    def refresh_manifest(self) -> None:
        """Read the manifest again (a reload picks up an edited entry)."""
        self.manifest = load_manifest(self.weights_dir)

    def load(self, name: str, task: str, *, warmup: bool = True, weights: WeightsOverride | None = None) -> ModelState:
        """Resolve, build and load one model of the given task, recording its status (never raises)."""
        state = self.build(name, task, warmup=warmup, weights=weights)
        self.states[name] = state
        return state

    def build(self, name: str, task: str, *, warmup: bool = True, weights: WeightsOverride | None = None) -> ModelState:
        """Resolve, build and load one model without installing it (a reload builds the new copy beside the old
        one); never raises. `weights` replaces the manifest's file with a verified other one."""
        t0 = time.perf_counter()
        state = ModelState(name=name, task=task, weights_override=weights)
        try:
            spec = self.spec_for(name)
        except KeyError:
            where = " and not a torchvision classifier" if task == "image-classification" else ""
            state.status, state.reason = "failed", (
                f"unknown model {name!r}: not in {self.weights_dir / MANIFEST_NAME}{where}")
            return state
        state.spec = spec
        if spec.task != task:
            state.status, state.reason = "failed", f"{name} is a {spec.task} model, not a {task} model"
            return state
        if task not in self.adapters:
            state.status, state.reason = "failed", f"no application of this server serves {task} models"
            return state
        try:
            resolved: ResolvedWeights | None
            if weights is not None:
                ref = WeightsRef(weights.path.name, sha256=weights.sha256)
                resolved = ResolvedWeights(resolve_weights(ref, weights.path.parent, self.hub_dir,
                                                           allow_download=False).path, "runtime")
                spec.weights = ref
            else:
                resolved = resolve_weights(spec.weights, self.weights_dir, self.hub_dir,
                                           allow_download=self.allow_download)
        except WeightsUnavailable as exc:
            if not self.allow_untrained:
                state.status, state.reason = "unavailable", str(exc)
                return state
            # str(exc), not exc: a log record kept by a handler would keep its traceback, this frame and the model
            log.warning("%s: %s; serving UNTRAINED random weights (allow_untrained is on)", name, str(exc))
            resolved = None
        if weights is not None and resolved is None:
            state.status, state.reason = "failed", "the given weights file is missing or its sha256 does not match"
            return state
        if spec.family == "onnx" and resolved is None:  # no random weights to fall back on
            state.status, state.reason = "unavailable", f"ONNX file {spec.weights.file_name} not found"
            return state
        if spec.family == "onnx" and task != "face-embedding":
            state.status, state.reason = "failed", "ONNX models are supported for face embedding only"
            return state
        try:
            if spec.family == "onnx":
                assert resolved is not None
                loaded: LoadedModel = LoadedOnnxFaceEmbedder(
                    spec, OnnxModule(resolved.path, self.device), self.device,  # type: ignore[arg-type]
                    weights_tag="trained", weights_source=resolved.source)
            else:
                model = build_model(spec, resolved.path if resolved is not None else None)
                model = prepare_model(model, self.device, compile_model=self.compile_model)
                if self.cuda_graphs and self.device.type == "cuda" and task in GRAPHED_TASKS:
                    model = GraphedForward(model)
                loaded = self.adapters[task](
                    spec, model, self.device,
                    weights_tag="trained" if resolved else "untrained",
                    weights_source=resolved.source if resolved else "untrained",
                )
            if warmup:
                loaded.warmup()
        except Exception as exc:  # a corrupt or mismatched checkpoint must not take the service down
            log.exception("loading %s failed", name)
            state.status, state.reason = "failed", f"loading failed: {type(exc).__name__}: {exc}"
            return state
        state.loaded, state.status, state.reason = loaded, "ready", None
        state.load_seconds = round(time.perf_counter() - t0, 3)
        return state

    def names(self, task: str) -> list[str]:
        """Configured models of one task, in configuration order."""
        return [n for n, s in self.states.items() if s.task == task]

    def describe(self, name: str) -> dict[str, Any]:
        """The /models view of one model."""
        st = self.states[name]
        out: dict[str, Any] = {"name": name, "task": st.task, "status": st.status, "reason": st.reason}
        spec = st.spec
        if spec is not None:
            out.update({
                "family": spec.family, "source": spec.source, "weights_file": spec.weights.file_name,
                "sha256": spec.weights.sha256, "num_labels": len(spec.labels),
                "input_size": spec.preprocessing.crop if spec.preprocessing else (spec.encoding or {}).get("length"),
                "metrics": spec.metrics, "info": spec.info,
            })
        if st.loaded is not None:
            out.update({"weights": st.loaded.weights_tag, "weights_source": st.loaded.weights_source,
                        "device": str(self.device), "load_seconds": st.load_seconds})
        else:
            out.update({"weights": None, "weights_source": None})
        return out


def fetch_torchvision_weights(names: list[str], dest: Path, *, progress: bool = True,
                              echo: Callable[[str], None] = print) -> int:
    """Download the default torchvision weights of `names` into dest; returns the number of failures."""
    failures = 0
    for name in names:
        try:
            ref = spec_from_torchvision(name).weights
        except KeyError:
            echo(f"{name}: not a torchvision classifier, skipped")
            failures += 1
            continue
        path = dest / ref.file_name
        if path.is_file() and ref.matches(path):
            echo(f"{name}: {path} already present and verified")
            continue
        try:
            # probe looked up here at call time: tests replace this module's check_reachable
            got = download_weights(ref, dest, progress=progress, probe=lambda url: check_reachable(url))
        except WeightsUnavailable as exc:
            echo(f"{name}: FAILED: {exc}")
            failures += 1
            if "cannot reach" in str(exc):
                echo("offline: stopping here")
                return failures + len(names) - names.index(name) - 1
            continue
        echo(f"{name}: {got} (sha256 {sha256_of(got)})")
    return failures
