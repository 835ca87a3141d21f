"""The model registry: manifest, weights resolution, loading, per-model status.

Weights resolution (the same for every model, DESIGN.md):
1. a file in the weights directory whose sha256 matches the manifest (torchvision files: the hash
   prefix their file name carries, the check torch.hub itself makes);
2. the torch hub cache ($TORCH_HOME/hub/checkpoints) under torchvision's own file name;
3. a download, only when downloads are enabled, failing fast when the network is unreachable;
4. otherwise the model is unavailable (503 naming the file), unless untrained weights are
   explicitly allowed, in which case it runs with random weights labelled "untrained".
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import socket
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from models.faces.identification import ImpostorTable
from models.preprocess import ImageSpec
from models.zoo import (
    build_classifier,
    build_torchvision,
    fix_torchvision_state_dict,
    torchvision_classifiers,
    torchvision_weights,
)

from .device import inference_context, prepare_model, to_device_batch

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
Status = Literal["loading", "ready", "unavailable", "failed"]


class PreprocessingEntry(BaseModel):
    """How images are prepared for the model (see models.preprocess.ImageSpec)."""

    model_config = ConfigDict(extra="forbid")
    resize: int = Field(gt=0)
    crop: int = Field(gt=0)
    mean: list[float] = Field(min_length=3, max_length=3)
    std: list[float] = Field(min_length=3, max_length=3)
    interpolation: Literal["nearest", "bilinear", "bicubic"] = "bilinear"


class ManifestEntry(BaseModel):
    """One model in weights/manifest.json."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    task: Literal["image-classification", "face-embedding", "text-classification", "style-features"]
    family: str
    arch: dict[str, Any] = Field(default_factory=dict)
    file: str = Field(pattern=r"^[^/\\]+$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    labels: list[str] = Field(default_factory=list)
    preprocessing: PreprocessingEntry | None = None
    source: str = "project"
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    card: str | None = None
    license: str | None = None

    @model_validator(mode="after")
    def _task_fields(self) -> ManifestEntry:
        if self.task in ("image-classification", "text-classification") and len(self.labels) < 2:
            raise ValueError(f"a {self.task} model needs at least two labels")
        if self.task == "image-classification" and self.preprocessing is None:
            raise ValueError("an image classifier needs its preprocessing")
        if self.task == "text-classification" and not isinstance((self.model_extra or {}).get("encoding"), dict):
            raise ValueError("a text classifier needs its character encoding ('encoding')")
        if self.task == "face-embedding":
            extra = self.model_extra or {}
            if self.preprocessing is None:
                raise ValueError("a face embedder needs its preprocessing (input size, mean, std)")
            threshold = extra.get("threshold")
            if not isinstance(threshold, int | float) or not 0.0 < float(threshold) < 4.0:
                raise ValueError("a face embedder needs its calibrated 'threshold' (squared L2 on unit vectors, "
                                 "between 0 and 4)")
            if extra.get("identification") is not None:
                ImpostorTable.from_manifest(extra["identification"])  # ValueError names what is wrong
        return self


class Manifest(BaseModel):
    """weights/manifest.json."""

    model_config = ConfigDict(extra="forbid")
    models: list[ManifestEntry]


def load_manifest(weights_dir: Path) -> dict[str, ManifestEntry]:
    """Entries of the manifest in weights_dir by name (empty when there is no manifest)."""
    path = weights_dir / MANIFEST_NAME
    if not path.exists():
        return {}
    try:
        manifest = Manifest.model_validate(json.loads(path.read_text()))
    except (ValueError, ValidationError) as exc:
        raise RuntimeError(f"{path}: invalid manifest: {exc}") from exc
    names = [m.name for m in manifest.models]
    if len(set(names)) != len(names):
        raise RuntimeError(f"{path}: duplicate model names")
    return {m.name: m for m in manifest.models}


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hub_checkpoint_dir(torch_home: Path | None = None) -> Path:
    """torch.hub's checkpoint cache ($TORCH_HOME/hub/checkpoints), honouring an override."""
    if torch_home is not None:
        return Path(torch_home) / "hub" / "checkpoints"
    return Path(torch.hub.get_dir()) / "checkpoints"


@dataclass(frozen=True)
class WeightsRef:
    """Where a model's weights should come from and how to check them."""

    file_name: str
    sha256: str | None = None  # full digest (project weights)
    hash_prefix: str | None = None  # torchvision's file-name prefix
    url: str | None = None

    def matches(self, path: Path) -> bool:
        """Whether the file's sha256 is the expected one."""
        digest = sha256_of(path)
        if self.sha256:
            return digest == self.sha256
        if self.hash_prefix:
            return digest.startswith(self.hash_prefix)
        return True


class WeightsUnavailable(Exception):
    """No verified weights file could be found (or fetched)."""


@dataclass(frozen=True)
class ResolvedWeights:
    """A verified weights file and where it was found."""

    path: Path
    source: Literal["weights_dir", "hub_cache", "download"]


def check_reachable(url: str, timeout: float = 4.0) -> None:
    """Fail fast (instead of hanging) when the weights host cannot be reached."""
    parts = urllib.parse.urlparse(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise WeightsUnavailable(f"cannot reach {host}:{port} to download {url} ({exc}); this machine is offline "
                                 "or the host is blocked: copy the file in by hand instead") from exc


def download_weights(ref: WeightsRef, dest_dir: Path, *, progress: bool = True) -> Path:
    """Download a weights file into dest_dir with a progress bar, verifying its hash; fail fast offline."""
    if not ref.url:
        raise WeightsUnavailable(f"{ref.file_name} has no download URL")
    check_reachable(ref.url)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / ref.file_name
    try:
        # torch.hub's own downloader: temp file, progress bar, sha256-prefix check, atomic rename
        torch.hub.download_url_to_file(ref.url, str(dest), hash_prefix=ref.hash_prefix, progress=progress)
    except Exception as exc:  # network or hash failure: never leave a half file behind
        dest.unlink(missing_ok=True)
        raise WeightsUnavailable(f"download of {ref.url} failed: {exc}") from exc
    if not ref.matches(dest):
        dest.unlink(missing_ok=True)
        raise WeightsUnavailable(f"downloaded {ref.file_name} does not match its expected sha256")
    return dest


def resolve_weights(ref: WeightsRef, weights_dir: Path, hub_dir: Path, *, allow_download: bool) -> ResolvedWeights:
    """Find a verified file for `ref` in the weights dir, then the hub cache, then (if allowed) by download."""
    problems: list[str] = []
    for where, directory in (("weights_dir", weights_dir), ("hub_cache", hub_dir)):
        path = directory / ref.file_name
        if path.is_file():
            if ref.matches(path):
                return ResolvedWeights(path, where)  # type: ignore[arg-type]
            problems.append(f"{path} exists but its sha256 does not match")
    if allow_download and ref.url:
        return ResolvedWeights(download_weights(ref, hub_dir), "download")
    hint = f"put {ref.file_name} in {weights_dir} or {hub_dir}"
    if ref.url:
        hint += " (fetch it with `python -m app.cli fetch-weights` on a machine with internet)"
    raise WeightsUnavailable("; ".join([*problems, f"weights file {ref.file_name} not found: {hint}"]))


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
        with inference_context(self.device):
            logits = self.model(x)
        return list(logits.float().softmax(-1).cpu().unbind(0))

    def forward(self, batch: list[Any]) -> list[torch.Tensor]:
        """Class probabilities, one row per input (runs off the event loop)."""
        raise NotImplementedError

    def warmup(self) -> None:
        """One forward at start-up so the first request does not pay for lazy initialisation."""
        raise NotImplementedError


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
        if tta not in (None, "hflip"):
            raise ValueError(f"{spec.name}: unknown test_time_augmentation {tta!r} (supported: 'hflip')")
        self.hflip_tta = tta == "hflip"

    def forward(self, batch: list[torch.Tensor]) -> list[torch.Tensor]:
        """Class probabilities for a list of preprocessed CHW tensors (averaged with the mirror image when
        the manifest asks for horizontal-flip test-time augmentation)."""
        x = torch.stack(batch)
        if not self.hflip_tta:
            return self._probabilities(to_device_batch(x, self.device))
        probs = self._probabilities(to_device_batch(torch.cat([x, x.flip(-1)]), self.device))
        n = len(batch)
        return [(probs[i] + probs[n + i]) / 2 for i in range(n)]

    def warmup(self) -> None:
        """One forward on a black image of the model's input size."""
        side = self.preprocessing.crop
        self.forward([torch.zeros(3, side, side)])


class LoadedTextClassifier(LoadedModel):
    """A character-level text classifier; inputs are raw strings, encoded as the model was trained."""

    task = "text-classification"

    def __init__(self, spec: ModelSpec, model: nn.Module, device: torch.device, weights_tag: str,
                 weights_source: str) -> None:
        super().__init__(spec, model, device, weights_tag, weights_source)
        from models.text.encoding import CharSpec

        if not spec.encoding:
            raise ValueError(f"{spec.name}: a text model needs its character encoding")
        self.encoding = CharSpec.from_dict(spec.encoding)

    def forward(self, batch: list[str]) -> list[torch.Tensor]:
        """Class probabilities for a list of texts."""
        return self._probabilities(self.encoding.encode(batch).to(self.device))

    def warmup(self) -> None:
        """One forward on a short text."""
        self.forward(["warm-up"])


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
        x = torch.stack(batch)
        n = len(batch)
        if self.flip_average:
            e = self._embed(to_device_batch(torch.cat([x, x.flip(-1)]), self.device))
            e = e[:n] + e[n:]
        else:
            e = self._embed(to_device_batch(x, self.device))
        e = torch.nn.functional.normalize(e, dim=-1).cpu()
        if e.shape[-1] != self.dim:
            raise RuntimeError(f"{self.spec.name} returned {e.shape[-1]}-d embeddings, its manifest says {self.dim}")
        return list(e.unbind(0))

    def warmup(self) -> None:
        """One forward on a grey face crop."""
        side = self.preprocessing.crop
        self.forward([torch.zeros(3, side, side)])


class OnnxModule:
    """An onnxruntime session behind a callable like an nn.Module's forward (NCHW float32 in)."""

    def __init__(self, path: Path, device: torch.device) -> None:
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        opts = ort.SessionOptions()
        threads = torch.get_num_threads()
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # onnxruntime reads the buffer as NCHW: a channels_last batch must be made C-contiguous first
        out = self.session.run(None, {self.input_name: x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out)


class LoadedOnnxFaceEmbedder(LoadedFaceEmbedder):
    """A third-party face model exported to ONNX (family "onnx"): input size, normalisation, output size
    and threshold come from its manifest entry; the output is L2-normalised here."""

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.float()).float()  # type: ignore[operator]


_LOADERS: dict[str, type[LoadedModel]] = {
    c.task: c for c in (LoadedClassifier, LoadedTextClassifier, LoadedFaceEmbedder)}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a (verified) weights file: tensors only, never arbitrary pickled objects."""
    state: dict[str, torch.Tensor] = torch.load(path, map_location="cpu", weights_only=True)
    return state


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
    """A module with random weights (family and arch from the manifest)."""
    if spec.task == "text-classification":
        from models.text import build_text_model
        from models.text.encoding import CharSpec

        vocab = CharSpec.from_dict(spec.encoding or {}).vocab_size
        return build_text_model(spec.family, spec.arch, len(spec.labels), vocab)
    if spec.task == "face-embedding":
        from models.faces.net import build_embedder

        return build_embedder(spec.arch)
    return build_classifier(spec.family, spec.arch, len(spec.labels))


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


class ModelRegistry:
    """Configured models, their status and the loaded instances."""

    def __init__(self, weights_dir: Path, hub_dir: Path, device: torch.device, *, allow_download: bool,
                 allow_untrained: bool, compile_model: bool = False) -> None:
        self.weights_dir = weights_dir
        self.hub_dir = hub_dir
        self.device = device
        self.allow_download = allow_download
        self.allow_untrained = allow_untrained
        self.compile_model = compile_model
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

    def load(self, name: str, task: str, *, warmup: bool = True) -> ModelState:
        """Resolve, build and load one model of the given task, recording its status (never raises)."""
        t0 = time.perf_counter()
        state = ModelState(name=name, task=task)
        self.states[name] = state
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
        try:
            resolved: ResolvedWeights | None = resolve_weights(
                spec.weights, self.weights_dir, self.hub_dir, allow_download=self.allow_download)
        except WeightsUnavailable as exc:
            if not self.allow_untrained:
                state.status, state.reason = "unavailable", str(exc)
                return state
            log.warning("%s: %s; serving UNTRAINED random weights (allow_untrained is on)", name, exc)
            resolved = None
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
                loaded = _LOADERS[task](
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
            got = download_weights(ref, dest, progress=progress)
        except WeightsUnavailable as exc:
            echo(f"{name}: FAILED: {exc}")
            failures += 1
            if "cannot reach" in str(exc):
                echo("offline: stopping here")
                return failures + len(names) - names.index(name) - 1
            continue
        echo(f"{name}: {got} (sha256 {sha256_of(got)})")
    return failures
