"""Train a CIFAR-style network (ResNet, SE-ResNet, wide ResNet) on any ImageFolder directory.

    python -m models.train.images --data ../shared/data/cifar10/train --out runs/cifar10-resnet56 --depth 56
    python -m models.train.images --data DIR --out runs/se56 --family cifar-se-resnet --depth 56
    python -m models.train.images --data DIR --out runs/wrn --family cifar-wide-resnet --depth 16 --width 8

The folder is split three ways: a frozen test split (--test-fraction of every class, chosen by a salted
hash of each file's path: the same images for every run on the folder, whatever the seed or validation
size), never trained on and never used to choose anything; then a stratified validation hold-out
(--val-size, --seed) for model selection; the rest trains. `python -m app.cli evaluate MODEL
--test-split` scores a finished model on the test split, once. Models trained before the test split
existed (--test-fraction 0) trained on every image outside their validation hold-out.

The images are decoded once through the same preprocessing spec the service uses and kept as
uint8 in memory (cached on disk), so an epoch costs only the augmentation and the network.
Every epoch writes a resumable checkpoint and a line of metrics; rerunning the same command
resumes. When training ends the command writes a report (validation accuracy, per-class
accuracy, confusion matrix as a table and a PNG, wall time, hardware), the weights file and
the manifest entry that describes it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.cifar_resnet import count_parameters
from models.cifar_whitened import WHITEN_KERNEL, WhitenedConvNet, set_whitening
from models.preprocess import ImageSpec, normalize_uint8, to_uint8_array
from models.train.common import (
    atomic_save,
    confusion_matrix,
    confusion_table,
    hardware_description,
    plot_confusion,
    progress,
    round_to_storage,
    save_weights,
    sha256_file,
    start_run,
    stratified_split,
)
from models.tta import metric_key, tta_probabilities
from models.zoo import build_classifier

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def scan_image_folder(root: Path) -> tuple[list[str], list[Path], np.ndarray]:
    """Classes (sorted folder names), file paths and integer labels of an ImageFolder tree."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise SystemExit(f"{root}: need at least two class folders, found {classes}")
    files: list[Path] = []
    labels: list[int] = []
    for idx, name in enumerate(classes):
        for f in sorted((root / name).rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                files.append(f)
                labels.append(idx)
    return classes, files, np.asarray(labels, dtype=np.int64)


def load_images(files: list[Path], size: int, cache: Path | None) -> np.ndarray:
    """Decode every file to an NHWC uint8 array at size x size, through the serving spec."""
    key = hashlib.sha256(("\n".join(str(f) for f in files) + f"|{size}").encode()).hexdigest()[:16]
    if cache is not None:
        cached = cache / f"images-{key}.npy"
        if cached.exists():
            return np.load(cached)
    spec = ImageSpec(resize=size, crop=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, f in enumerate(progress(files, desc="decode", unit="img")):
        with Image.open(f) as im:
            out[i] = to_uint8_array(im, spec)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f"images-{key}.tmp.npy"
        np.save(tmp, out)
        os.replace(tmp, cache / f"images-{key}.npy")
    return out


Split = tuple[torch.Tensor, torch.Tensor]

TEST_SPLIT_SALT = "frozen-test-split-v1"
DEFAULT_TEST_FRACTION = 0.1
TEST_SPLIT_RULE = "per-class-path-sha256"  # the id a manifest records; what it means:
TEST_SPLIT_DESCRIPTION = ("in every class, the round(n * fraction) images (at most n - 2) with the smallest "
                          "sha256(salt + NUL + path relative to the folder)")


@dataclass(frozen=True)
class FrozenTestSplit:
    """The rule choosing a folder's frozen test split: a fraction of every class, picked by a salted hash of
    each file's relative path, so it depends on nothing but the folder (not the seed, the validation size,
    the input size or the order files are listed in)."""

    fraction: float
    salt: str = TEST_SPLIT_SALT

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"the test fraction must be in [0, 1), got {self.fraction}")

    def to_dict(self) -> dict[str, Any]:
        """The rule as the manifest records it."""
        return {"rule": TEST_SPLIT_RULE, "description": TEST_SPLIT_DESCRIPTION, "fraction": self.fraction,
                "salt": self.salt}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FrozenTestSplit:
        """The rule a manifest entry records (refusing another rule than this code's)."""
        if d.get("rule") not in (None, TEST_SPLIT_RULE):
            raise ValueError(f"unknown test split rule {d.get('rule')!r}")
        return cls(float(d["fraction"]), str(d.get("salt", TEST_SPLIT_SALT)))


def _path_key(root: Path, f: Path, salt: str) -> bytes:
    return hashlib.sha256(f"{salt}\0{f.relative_to(root).as_posix()}".encode()).digest()


def frozen_test_indices(root: Path, files: list[Path], labels: np.ndarray, rule: FrozenTestSplit | None
                        ) -> np.ndarray:
    """Sorted indices (into files) of the frozen test split of an ImageFolder (see TEST_SPLIT_DESCRIPTION)."""
    if rule is None or rule.fraction == 0.0:
        return np.zeros(0, dtype=np.int64)
    chosen: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = min(round(len(idx) * rule.fraction), max(0, len(idx) - 2))  # training and validation keep one each
        keys = [_path_key(root, files[i], rule.salt) for i in idx]
        chosen.append(idx[np.argsort(np.array(keys, dtype=object), kind="stable")[:k]])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def files_digest(root: Path, files: list[Path]) -> str:
    """sha256 of the sorted relative paths of a set of files (what proves a split is the same images)."""
    return hashlib.sha256("\n".join(sorted(f.relative_to(root).as_posix() for f in files)).encode()).hexdigest()


@dataclass(frozen=True)
class FolderSplit:
    """An ImageFolder split three ways: frozen test, validation (hold-out for selection) and training."""

    root: Path
    classes: list[str]
    files: list[Path]
    labels: np.ndarray
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def test_info(self, rule: FrozenTestSplit | None) -> dict[str, Any] | None:
        """What a manifest entry records about the test split (None without one)."""
        if rule is None or rule.fraction == 0.0:
            return None
        return rule.to_dict() | {"images": len(self.test),
                                 "files_sha256": files_digest(self.root, [self.files[i] for i in self.test])}


def split_folder(data: Path, val_size: int, seed: int, limit_per_class: int = 0,
                 test: FrozenTestSplit | None = None) -> FolderSplit:
    """The trainer's split of an ImageFolder: the frozen test split first (by `test`'s rule), then a stratified
    validation split of the rest (val_size, seed). Without a test rule it is the split of the models trained
    before the test split existed: the same validation images for the same folder, val_size and seed."""
    classes, files, labels = scan_image_folder(data)
    if limit_per_class:
        keep = np.concatenate([np.flatnonzero(labels == c)[:limit_per_class] for c in range(len(classes))])
        files = [files[i] for i in keep]
        labels = labels[keep]
    test_idx = frozen_test_indices(data, files, labels, test)
    rest = np.setdiff1d(np.arange(len(files)), test_idx)
    train, val = stratified_split(labels[rest], val_size, seed)
    return FolderSplit(data, classes, files, labels, rest[train], rest[val], test_idx)


def split_files(data: Path, val_size: int, seed: int, limit_per_class: int = 0, test: FrozenTestSplit | None = None
                ) -> tuple[list[str], list[Path], np.ndarray, np.ndarray, np.ndarray]:
    """Classes, files, labels and the (train, validation) indices of the trainer's stratified split of an
    ImageFolder: the same split for the same folder, val_size, seed and test rule (the input size plays no part)."""
    sp = split_folder(data, val_size, seed, limit_per_class, test)
    return sp.classes, sp.files, sp.labels, sp.train, sp.val


@dataclass(frozen=True)
class ImageHoldout:
    """Where a trained classifier's hold-out comes from, read from its manifest entry's training info."""

    data: Path
    val_size: int
    seed: int
    train_size: int
    test: FrozenTestSplit | None = None  # None: trained before the frozen test split (no test images)
    test_size: int = 0
    test_files_sha256: str | None = None


def holdout_from_training(training: dict[str, Any], name: str) -> ImageHoldout:
    """The hold-out parameters a model was validated with (folder, validation size, split seed, test split),
    refusing when the manifest entry does not record them: without them no split can be proved to be its
    hold-out."""
    seed: Any = (training.get("recipe") or {}).get("seed")
    data: Any = training.get("data")
    val_size: Any = training.get("val_images")
    train_size: Any = training.get("train_images")
    missing = [k for k, v in (("data", data), ("val_images", val_size), ("train_images", train_size),
                              ("recipe.seed", seed)) if v is None]
    if missing:
        raise SystemExit(f"{name}: its manifest entry's training info lacks {', '.join(missing)}, so its hold-out "
                         "cannot be rebuilt")
    info = training.get("test_split")
    if info is None:
        return ImageHoldout(Path(str(data)), int(val_size), int(seed), int(train_size))
    try:
        rule = FrozenTestSplit.from_dict(info)
    except (KeyError, TypeError, ValueError) as exc:
        raise SystemExit(f"{name}: its manifest entry's test_split cannot be read ({exc})") from exc
    return ImageHoldout(Path(str(data)), int(val_size), int(seed), int(train_size), rule, int(info.get("images", 0)),
                        info.get("files_sha256"))


def _model_split(holdout: ImageHoldout, data: Path | None) -> FolderSplit:
    """The split a model was trained with, refusing a folder whose counts differ from the manifest's."""
    root = data if data is not None else holdout.data
    if not root.is_dir():
        raise SystemExit(f"{root}: no such folder (the model's training folder; give it with --data)")
    sp = split_folder(root, holdout.val_size, holdout.seed, test=holdout.test)
    if (len(sp.train), len(sp.val), len(sp.test)) != (holdout.train_size, holdout.val_size, holdout.test_size):
        tested = f" and left {holdout.test_size} out as its test split" if holdout.test_size else ""
        raise SystemExit(f"{root} holds {len(sp.files)} images, but the model trained on {holdout.train_size} and was "
                         f"validated on {holdout.val_size}{tested}: not its training folder, so not its hold-out")
    return sp


def holdout_files(holdout: ImageHoldout, data: Path | None = None) -> tuple[list[str], list[Path], np.ndarray]:
    """Classes, files and labels of exactly the images a model was validated on (`data` overrides the folder
    recorded in the manifest, e.g. the same images elsewhere). Refuses a folder whose image count differs from
    the model's training + validation (+ test) count: the split would not be the model's hold-out."""
    sp = _model_split(holdout, data)
    return sp.classes, [sp.files[i] for i in sp.val], sp.labels[sp.val]


def frozen_test_files(holdout: ImageHoldout, data: Path | None = None, name: str = "the model"
                     ) -> tuple[list[str], list[Path], np.ndarray]:
    """Classes, files and labels of a model's frozen test split, checked against the file digest its manifest
    entry records. Refused for models trained before the test split: they trained on every image outside their
    validation hold-out, so they have no test split (their only unseen images are the hold-out)."""
    if holdout.test is None or holdout.test_size == 0:
        raise SystemExit(f"{name} was trained without a frozen test split: it trained on every image of its folder "
                         f"outside its {holdout.val_size}-image validation hold-out, so the hold-out (--holdout) is "
                         "the only data it has not seen, and it also served for model selection")
    sp = _model_split(holdout, data)
    files = [sp.files[i] for i in sp.test]
    if holdout.test_files_sha256 and files_digest(sp.root, files) != holdout.test_files_sha256:
        raise SystemExit(f"{sp.root}: the test split's files differ from those {name} was trained without "
                         "(files_sha256 mismatch)")
    return sp.classes, files, sp.labels[sp.test]


def load_split(data: Path, size: int, val_size: int, seed: int, cache: Path | None,
               limit_per_class: int = 0, test: FrozenTestSplit | None = None) -> tuple[list[str], Split, Split]:
    """Class names and the stratified (train, validation) split of an ImageFolder as uint8 NCHW images and
    labels, the frozen test split (by `test`'s rule) left out of both: the same split for the same folder, size,
    val_size, seed and test rule (the trainer's hold-out)."""
    sp = split_folder(data, val_size, seed, limit_per_class, test)
    images = load_images(sp.files, size, cache)  # every file (the test ones too): one cache for any split

    def part(idx: np.ndarray) -> Split:
        return torch.from_numpy(images[idx]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(sp.labels[idx])

    return sp.classes, part(sp.train), part(sp.val)


def holdout_metrics(model: torch.nn.Module, x_val: torch.Tensor, y_val: torch.Tensor,
                    classes: list[str], extra_tta: str | None = None) -> dict[str, Any]:
    """One-view and h-flip-averaged accuracy, per-class accuracy and confusion matrix on a hold-out; with
    extra_tta (a models.tta mode other than hflip) also that mode's accuracy, as `val_accuracy_<mode>`."""
    probs = predict(model, x_val, 512, None).cpu()
    probs_tta = predict(model, x_val, 512, "hflip").cpu()
    pred = probs.argmax(-1).numpy()
    y = y_val.cpu().numpy()
    cm = confusion_matrix(y, pred, len(classes))
    m = {"val_accuracy": float((pred == y).mean()),
         "val_accuracy_hflip_tta": float((probs_tta.argmax(-1).numpy() == y).mean()),
         "per_class_accuracy": {c: float(cm[i, i] / max(1, cm[i].sum())) for i, c in enumerate(classes)},
         "confusion_matrix": cm}
    if extra_tta not in (None, "hflip"):
        probs_x = predict(model, x_val, 512, extra_tta).cpu()
        m[metric_key(extra_tta)] = float((probs_x.argmax(-1).numpy() == y).mean())
    return m


def report_markdown(name: str, m: dict[str, Any], classes: list[str], lines: list[str]) -> str:
    """The Markdown report of holdout_metrics, with extra lines after the headline."""
    n = int(m["confusion_matrix"].sum())
    md = [f"# {name} report", "",
          f"- validation accuracy: **{m['val_accuracy']:.4f}** (with horizontal-flip averaging: "
          f"{m['val_accuracy_hflip_tta']:.4f}) on {n} held-out images", *lines, "",
          "| class | accuracy |", "|---|---|"]
    md += [f"| {c} | {a:.4f} |" for c, a in m["per_class_accuracy"].items()]
    md += ["", "Confusion matrix (rows: true class, columns: predicted):", "",
           confusion_table(m["confusion_matrix"], classes)]
    return "\n".join(md) + "\n"


def augment(batch: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Pad-and-random-crop plus random horizontal flip on an NCHW batch (He et al. 2016)."""
    n, _, h, w = batch.shape
    padded = F.pad(batch, (pad, pad, pad, pad))
    xs = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
    ys = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
    flips = (torch.rand(n, generator=gen) < 0.5).tolist()
    out = torch.empty_like(batch)
    for i in range(n):
        crop = padded[i, :, ys[i] : ys[i] + h, xs[i] : xs[i] + w]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out


def lr_at(step: int, total: int, peak: float, warmup_frac: float, schedule: str = "cosine",
          start_frac: float = 0.0) -> float:
    """The learning rate of a step. "cosine": linear warm-up to `peak`, then cosine decay to zero (a one-cycle-style
    schedule). "linear": a triangle, from start_frac * peak up to `peak` at the end of the warm-up, then linearly
    down to zero at the last step (the schedule of the CIFAR speed-runs)."""
    warm = max(1, int(total * warmup_frac))
    if schedule == "linear":
        if step < warm:
            return peak * (start_frac + (1.0 - start_frac) * step / warm)
        return peak * max(0.0, (total - step) / max(1, total - warm))
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float, decay_per_step: float | None,
                 bias_lr_scale: float) -> list[dict[str, Any]]:
    """The optimizer's two groups: weights (dim > 1), and biases and batch-norm parameters at bias_lr_scale x
    the learning rate ("lr_scale": the factor on the schedule's rate). Weight decay: `weight_decay` on the
    weights only, or, with decay_per_step, torch's decay set per group so that every weight and bias shrinks by
    that fraction per step at the peak rate (torch's SGD shrinks by lr x weight_decay). Frozen parameters are
    left out."""
    weights = [p for p in model.parameters() if p.dim() > 1 and p.requires_grad]
    others = [p for p in model.parameters() if p.dim() <= 1 and p.requires_grad]
    if decay_per_step is not None:
        wds = (decay_per_step / lr, decay_per_step / (lr * bias_lr_scale))
    else:
        wds = (weight_decay, 0.0)
    return [{"params": weights, "weight_decay": wds[0], "lr_scale": 1.0},
            {"params": others, "weight_decay": wds[1], "lr_scale": bias_lr_scale}]


class Lookahead:
    """Slow weights for the fast ones of the optimizer (Zhang et al. 2019, "Lookahead optimizer"): every `every`
    steps the slow weights move towards the fast ones, slow += (1 - decay) * (fast - slow), and the fast weights
    restart from them. `decay` grows with the cube of the training progress up to `max_decay`, so early training
    is unchanged and the last steps average more and more. `finish` leaves the slow weights in the model."""

    def __init__(self, params: list[torch.nn.Parameter], every: int, max_decay: float) -> None:
        if every < 1 or not 0.0 <= max_decay < 1.0:
            raise ValueError(f"lookahead needs every >= 1 and 0 <= decay < 1, got {every}, {max_decay}")
        self.params, self.every, self.max_decay = params, every, max_decay
        self.slow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def step(self, step: int, total: int) -> None:
        """Call after optimizer step number `step` (0-based) of `total`."""
        if (step + 1) % self.every:
            return
        self._sync(self.max_decay * min(1.0, (step + 1) / total) ** 3)

    @torch.no_grad()
    def _sync(self, decay: float) -> None:
        for slow, p in zip(self.slow, self.params, strict=True):
            slow.lerp_(p.detach(), 1.0 - decay)
            p.copy_(slow)

    @torch.no_grad()
    def finish(self) -> None:
        for slow, p in zip(self.slow, self.params, strict=True):
            p.copy_(slow)

    def state_dict(self) -> list[torch.Tensor]:
        return self.slow

    def load_state_dict(self, slow: list[torch.Tensor]) -> None:
        for mine, saved in zip(self.slow, slow, strict=True):
            mine.copy_(saved)


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch: int, tta: str | None) -> torch.Tensor:
    """Class probabilities for a normalised NCHW tensor: one view (tta None) or averaged over the views of a
    models.tta mode ("hflip", "hflip-translate")."""
    model.eval()
    outs = []
    for i in range(0, len(x), batch):
        outs.append(tta_probabilities(lambda v: model(v).softmax(-1), x[i : i + batch], tta))
    return torch.cat(outs)


@torch.no_grad()
def recompute_bn_statistics(model: torch.nn.Module, x: torch.Tensor, batch: int, device: torch.device) -> None:
    """Batch-norm running statistics from scratch over `x` (an exact average over all batches): averaged
    weights need statistics of their own, those of the averaged models do not fit them."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    for i in range(0, len(x), batch):
        model(x[i : i + batch].to(device))
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
    model.eval()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="ImageFolder root (one folder per class)")
    p.add_argument("--out", type=Path, required=True, help="run directory (checkpoint, log, report)")
    p.add_argument("--name", default=None, help="model name for the manifest (default: <folder>-resnet<depth>, "
                                                 "<folder>-se-resnet<depth>, <folder>-wrn-<depth>-<width>)")
    p.add_argument("--family", choices=list(FAMILY_DEFAULTS), default="cifar-resnet",
                   help="cifar-resnet (He et al. 2016), cifar-se-resnet (the same with squeeze-and-excitation "
                        "blocks, Hu et al. 2018), cifar-wide-resnet (WRN-d-k, Zagoruyko & Komodakis 2016)")
    p.add_argument("--depth", type=int, default=None,
                   help="ResNet and SE-ResNet: 6n+2 (20, 32, 44, 56, 110; default 20); wide ResNet: 6n+4 "
                        "(16, 22, 28, 40; default 16)")
    p.add_argument("--shortcut", choices=["A", "B"], default=None,
                   help="ResNet and SE-ResNet: A (identity + zero padding, default) or B (1x1 projections)")
    p.add_argument("--se-reduction", type=int, default=None, help="SE-ResNet: the SE blocks' reduction r (default 16)")
    p.add_argument("--width", type=int, default=None, help="wide ResNet: the widening factor k (default 4)")
    p.add_argument("--dropout", type=float, default=None,
                   help="wide ResNet: dropout between the two convolutions of every block (default 0; the paper: 0.3)")
    p.add_argument("--widths", type=int, nargs="+", default=None,
                   help="whitened convnet: the conv groups' widths (default 64 256 256)")
    p.add_argument("--convs", type=int, default=None,
                   help="whitened convnet: convolutions per group (default 2)")
    p.add_argument("--logit-scale", type=float, default=None,
                   help="whitened convnet: factor on the logits (default 1/9: keeps the max-pooled features' large "
                        "logit steps small early in training)")
    p.add_argument("--size", type=int, default=32, help="input side in pixels")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.2, help="peak learning rate")
    p.add_argument("--warmup", type=float, default=0.15, help="fraction of steps for warm-up")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--decay-per-step", type=float, default=None,
                   help="instead of --weight-decay: every weight and bias shrinks by this fraction per step at the "
                        "peak learning rate (the decay follows the schedule), whatever its group's learning rate")
    p.add_argument("--schedule", choices=["cosine", "linear"], default="cosine",
                   help="cosine: linear warm-up then cosine decay to zero; linear: from --lr-start x peak up to the "
                        "peak over the warm-up, then linearly to zero")
    p.add_argument("--lr-start", type=float, default=0.0, help="linear schedule: first step's fraction of the peak")
    p.add_argument("--bias-lr-scale", type=float, default=1.0,
                   help="learning-rate factor for biases and batch-norm shifts (the CIFAR speed-runs use 64)")
    p.add_argument("--bn-weights", choices=["learn", "frozen"], default="learn",
                   help="frozen: batch-norm scales stay 1 (only their shifts learn)")
    p.add_argument("--bn-momentum", type=float, default=None,
                   help="batch-norm running-statistics momentum during training (default: torch's 0.1)")
    p.add_argument("--lookahead", type=int, default=0,
                   help="every N steps pull the weights towards slow weights (Lookahead; 0: off); the slow weights "
                        "are the model that is saved")
    p.add_argument("--lookahead-decay", type=float, default=0.95 ** 5,
                   help="lookahead: the slow weights' decay at the end of training (grows as progress^3)")
    p.add_argument("--tta", choices=["hflip", "hflip-translate"], default=None,
                   help="test-time augmentation to record in the manifest entry (how the service will serve the "
                        "model): hflip (image + mirror image) or hflip-translate (also shifted by one pixel, 6 views; "
                        "its accuracy is added to the report). Default: none recorded (served one view); the "
                        "report always has the one-view and h-flip numbers")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--crop-pad", type=int, default=4,
                   help="augmentation: pad by this many pixels, then crop at random (He et al.: 4)")
    p.add_argument("--val-size", type=int, default=5000, help="stratified hold-out size")
    p.add_argument("--test-fraction", type=float, default=DEFAULT_TEST_FRACTION,
                   help="the frozen test split: this fraction of every class, chosen by a salted hash of the file "
                        "paths (the same images for every run on the folder), left out of training and validation "
                        "and scored only by `app.cli evaluate --test-split`; 0 gives the split of the models "
                        "trained before it existed")
    p.add_argument("--val-every", type=int, default=1,
                   help="measure validation accuracy every N epochs (always after the last); the per-epoch "
                        "check costs about 10%% of an epoch for a ResNet-56 on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    p.add_argument("--cache", type=Path, default=Path(".cache/datasets"), help="decoded-image cache")
    p.add_argument("--limit-per-class", type=int, default=0, help="use at most N images per class (smoke runs)")
    p.add_argument("--install", type=Path, default=None, help="copy weights + merge the manifest entry into this dir")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: mixed precision (autocast) for the training steps; validation stays fp32. "
                        "About 2x faster on CPUs with AVX512-BF16 and on recent GPUs")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC memory format for the network (faster convolutions on CPU and GPU)")
    p.add_argument("--swa-epochs", type=int, default=0,
                   help="stochastic weight averaging (Izmailov et al. 2018): the last N epochs run at the constant "
                        "--swa-lr and their end-of-epoch weights are averaged; batch-norm statistics are then "
                        "recomputed on the training images and the average is the model that is saved")
    p.add_argument("--swa-lr", type=float, default=0.02, help="learning rate of the SWA epochs")
    p.add_argument("--save-dtype", choices=["float32", "float16"], default="float32",
                   help="how the weights file stores floating-point tensors: float16 halves its size; the "
                        "report's numbers are then measured with the float16-rounded weights, as served")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from these weights (a .pt state dict) with a fresh schedule: a warm restart "
                        "(SGDR, Loshchilov & Hutter 2017) or fine-tuning; recorded in the manifest recipe")
    args = p.parse_args(argv)
    try:
        args.arch = arch_from_args(args)
    except ValueError as exc:
        p.error(str(exc))
    if args.lookahead and args.swa_epochs:
        p.error("--lookahead and --swa-epochs both average weights: choose one")
    if args.lookahead < 0 or not 0.0 <= args.lookahead_decay < 1.0:
        p.error("--lookahead needs N >= 0 and 0 <= --lookahead-decay < 1")
    return args


# per family: its arch options (with defaults) and how a run is named by default
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "cifar-resnet": {"depth": 20, "shortcut": "A"},
    "cifar-se-resnet": {"depth": 20, "shortcut": "A", "reduction": 16},
    "cifar-wide-resnet": {"depth": 16, "width": 4, "dropout": 0.0},
    "cifar-whitened-convnet": {"widths": [64, 256, 256], "convs": 2, "logit_scale": 1.0 / 9.0},
}
_ARCH_OPTIONS = {"depth": "--depth", "shortcut": "--shortcut", "reduction": "--se-reduction", "width": "--width",
                 "dropout": "--dropout", "widths": "--widths", "convs": "--convs",
                 "logit_scale": "--logit-scale"}


def arch_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The manifest arch of the chosen family from the command line (defaults filled in); ValueError for an option
    the family does not take (a --width given to a ResNet must not be silently ignored)."""
    given = {"depth": args.depth, "shortcut": args.shortcut, "reduction": args.se_reduction, "width": args.width,
             "dropout": args.dropout, "widths": args.widths, "convs": args.convs,
             "logit_scale": args.logit_scale}
    defaults = FAMILY_DEFAULTS[args.family]
    foreign = [_ARCH_OPTIONS[k] for k, v in given.items() if v is not None and k not in defaults]
    if foreign:
        raise ValueError(f"{', '.join(foreign)} do(es) not apply to {args.family}")
    arch = {k: given[k] if given[k] is not None else v for k, v in defaults.items()}
    build_classifier(args.family, arch, 2)  # invalid depth, width, ... refused before any data is read
    return arch


def default_name(data: Path, family: str, arch: dict[str, Any]) -> str:
    """The run's model name when --name is not given."""
    folder = data.name.rstrip("/") or "images"
    if family == "cifar-wide-resnet":
        return f"{folder}-wrn-{arch['depth']}-{arch['width']}"
    if family == "cifar-whitened-convnet":
        return f"{folder}-whitened-convnet"
    return f"{folder}-{'se-' if family == 'cifar-se-resnet' else ''}resnet{arch['depth']}"


def describe_arch(family: str, arch: dict[str, Any]) -> str:
    """A short human name of the architecture (for logs)."""
    if family == "cifar-wide-resnet":
        return f"WRN-{arch['depth']}-{arch['width']}" + (f" (dropout {arch['dropout']})" if arch["dropout"] else "")
    if family == "cifar-se-resnet":
        return f"SE-ResNet-{arch['depth']} (r={arch['reduction']})"
    if family == "cifar-whitened-convnet":
        return f"whitened convnet (widths {'/'.join(str(w) for w in arch['widths'])}, {arch['convs']} convs per group)"
    return f"ResNet-{arch['depth']}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = time.time()
    device = start_run(args.threads, args.device, args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or default_name(args.data, args.family, args.arch)

    test_rule = FrozenTestSplit(args.test_fraction) if args.test_fraction > 0 else None
    folder_split = split_folder(args.data, args.val_size, args.seed, args.limit_per_class, test_rule)
    classes, (train_u8, y_train), (val_u8, y_val) = load_split(
        args.data, args.size, args.val_size, args.seed, args.cache, args.limit_per_class, test_rule)
    mean = tuple(float(v) for v in (train_u8.float().mean(dim=(0, 2, 3)) / 255.0))
    std = tuple(float(v) for v in (train_u8.float().std(dim=(0, 2, 3)) / 255.0))
    spec = ImageSpec(resize=args.size, crop=args.size, mean=mean, std=std)  # type: ignore[arg-type]
    x_train = normalize_uint8(train_u8, spec)
    x_val = normalize_uint8(val_u8, spec).to(device)

    model = build_classifier(args.family, args.arch, len(classes)).to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    whitening = None
    if isinstance(model, WhitenedConvNet):
        # the first layer is set from (a sample of) the training images and frozen: not learned, like the mean/std
        sample = x_train[torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed))[:5000]]
        set_whitening(model, sample)
        whitening = {"images": len(sample), "kernel": WHITEN_KERNEL, "frozen": True}
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if args.bn_weights == "frozen":
        for bn in bns:
            if bn.weight is not None:
                bn.weight.requires_grad_(False)  # stays 1: only the shift learns
    if args.bn_momentum is not None:
        for bn in bns:
            bn.momentum = args.bn_momentum
    groups = param_groups(model, args.lr, args.weight_decay, args.decay_per_step, args.bias_lr_scale)
    opt = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=True)
    trained = [p for g in groups for p in g["params"]]
    lookahead = Lookahead(trained, args.lookahead, args.lookahead_decay) if args.lookahead else None
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    swa_epochs = min(args.swa_epochs, args.epochs)
    total_steps = steps_per_epoch * (args.epochs - swa_epochs)  # the cosine part; SWA epochs come after it
    swa_model = torch.optim.swa_utils.AveragedModel(model) if swa_epochs else None
    start_epoch, history, train_seconds = 0, [], 0.0
    ckpt_path = out / "checkpoint.pt"
    init_from = None
    if args.init_from is not None:
        state = torch.load(args.init_from, map_location=device, weights_only=True)
        model.load_state_dict(state)
        init_from = {"file": args.init_from.name, "sha256": sha256_file(args.init_from)}
        print(f"initialised from {args.init_from} ({init_from['sha256'][:12]})", file=sys.stderr)
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start_epoch, history, train_seconds = ck["epoch"], ck["history"], ck["train_seconds"]
        if swa_model is not None and ck.get("swa") is not None:
            swa_model.load_state_dict(ck["swa"])
        if lookahead is not None and ck.get("lookahead") is not None:
            lookahead.load_state_dict(ck["lookahead"])
        print(f"resumed from {ckpt_path} at epoch {start_epoch}", file=sys.stderr)

    print(f"{name}: {len(classes)} classes, {len(x_train)} train / {len(x_val)} val / {len(folder_split.test)} "
          f"frozen test (left out), {describe_arch(args.family, args.arch)} ({count_parameters(model):,} params) "
          f"on {device}", file=sys.stderr)
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        model.train()
        gen = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        perm = torch.randperm(len(x_train), generator=gen)
        seen = correct = 0
        loss_sum = 0.0
        bar = progress(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch")
        for b in bar:
            step = epoch * steps_per_epoch + b
            lr = args.swa_lr if step >= total_steps else lr_at(step, total_steps, args.lr, args.warmup,
                                                                 args.schedule, args.lr_start)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            idx = perm[b * args.batch_size : (b + 1) * args.batch_size]
            xb = augment(x_train[idx], gen, args.crop_pad).to(device, non_blocking=True, memory_format=memory_format)
            yb = y_train[idx].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                logits = model(xb)
                loss = F.cross_entropy(logits.float(), yb, label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if lookahead is not None:
                lookahead.step(step, total_steps)
            seen += len(yb)
            loss_sum += float(loss.detach()) * len(yb)
            correct += int((logits.argmax(-1) == yb).sum())
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        val_acc: float | None = None
        if (epoch + 1) % max(1, args.val_every) == 0 or epoch + 1 == args.epochs:
            probs = predict(model, x_val, 512, None)
            val_acc = float((probs.argmax(-1).cpu() == y_val).float().mean())
        if swa_model is not None and epoch >= args.epochs - swa_epochs:
            swa_model.update_parameters(model)
        train_seconds += time.time() - t0
        rec = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
               "val_acc": val_acc, "lr_end": opt.param_groups[0]["lr"], "seconds": time.time() - t0}
        history.append(rec)
        with open(out / "log.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), file=sys.stderr)
        atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                     "history": history, "train_seconds": train_seconds,
                     "swa": swa_model.state_dict() if swa_model is not None else None,
                     "lookahead": lookahead.state_dict() if lookahead is not None else None, "args": vars(args) | {
                         "data": str(args.data), "out": str(args.out), "cache": str(args.cache),
                         "install": str(args.install)}}, ckpt_path)

    final: torch.nn.Module = model
    if lookahead is not None:
        lookahead.finish()  # the slow weights are the model; their batch-norm statistics are measured afresh
        recompute_bn_statistics(model, x_train, 512, device)
    if swa_model is not None:
        final = swa_model.module
        recompute_bn_statistics(final, x_train, 512, device)
        print(f"SWA: averaged the weights of the last {int(swa_model.n_averaged)} epochs", file=sys.stderr)
    return finish(args, name, final, classes, spec, x_val, y_val, history, train_seconds, t_start, device,
                  n_train=len(x_train), init_from=init_from, test_split=folder_split.test_info(test_rule),
                  whitening=whitening)


def finish(args: argparse.Namespace, name: str, model: torch.nn.Module, classes: list[str], spec: ImageSpec,
           x_val: torch.Tensor, y_val: torch.Tensor, history: list[dict[str, Any]], train_seconds: float,
           t_start: float, device: torch.device, n_train: int,
           init_from: dict[str, str] | None = None, test_split: dict[str, Any] | None = None,
           whitening: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the weights, the report (JSON, Markdown, confusion PNG) and the manifest entry."""
    out: Path = args.out
    save_dtype = torch.float16 if args.save_dtype == "float16" else None
    if save_dtype is not None:
        round_to_storage(model, save_dtype)  # the metrics below are those of the stored weights
    m = holdout_metrics(model, x_val, y_val, classes, extra_tta=args.tta)
    acc, acc_tta, cm = m["val_accuracy"], m["val_accuracy_hflip_tta"], m["confusion_matrix"]
    extra = {k: v for k, v in m.items() if k.startswith("val_accuracy_") and k != "val_accuracy_hflip_tta"}
    y = y_val.numpy()
    weights_file = out / f"{name}.pt"
    digest = save_weights(model, weights_file, save_dtype)
    plot_confusion(cm, classes, out / "confusion.png", f"{name}: validation confusion matrix")
    report = {
        "model": name, "val_accuracy": acc, "val_accuracy_hflip_tta": acc_tta, **extra,
        "test_time_augmentation": args.tta, "per_class_accuracy": m["per_class_accuracy"],
        "confusion_matrix": cm.tolist(), "epochs": len(history), "train_seconds": round(train_seconds, 1),
        "wall_seconds_this_run": round(time.time() - t_start, 1), "hardware": hardware_description(device),
        "torch": torch.__version__, "python": platform.python_version(), "val_size": len(y),
        "train_size": n_train, "test_size": test_split["images"] if test_split else 0, "history": history,
        "init_from": init_from, "family": args.family, "arch": args.arch,
        "num_params": count_parameters(model),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(report_markdown(f"{name} training", m, classes, [
        f"- epochs: {len(history)}, training time: {train_seconds / 60:.1f} min on {report['hardware']}"]))
    entry = {
        "name": name, "task": "image-classification", "family": args.family,
        "arch": args.arch | {"num_classes": len(classes)},
        "file": weights_file.name, "sha256": digest, "labels": classes,
        "preprocessing": spec.to_dict(), "source": "project",
        "training": {"data": str(args.data), "train_images": n_train, "val_images": len(y)}
        | ({"test_split": test_split} if test_split else {}) | {"recipe": {
            "epochs": args.epochs, "batch_size": args.batch_size, "optimizer": "SGD nesterov",
            "peak_lr": args.lr, "warmup": args.warmup,
            "schedule": "linear warm-up + cosine" if args.schedule == "cosine" else
            f"linear from {args.lr_start} x peak up to the peak, then linear to zero",
            "momentum": args.momentum}
            | ({"decay_per_step": args.decay_per_step} if args.decay_per_step is not None
               else {"weight_decay": args.weight_decay})
            | ({"bias_lr_scale": args.bias_lr_scale} if args.bias_lr_scale != 1.0 else {})
            | ({"bn_weights": "frozen at 1"} if args.bn_weights == "frozen" else {})
            | ({"bn_momentum": args.bn_momentum} if args.bn_momentum is not None else {})
            | ({"lookahead_every": args.lookahead, "lookahead_decay": args.lookahead_decay} if args.lookahead
               else {}) | {
            "label_smoothing": args.label_smoothing, "augmentation": f"pad {args.crop_pad} + random crop, h-flip",
            "precision": args.precision,
            "seed": args.seed} | ({"init_from": init_from} if init_from else {})
            | ({"whitening": whitening} if whitening else {})
            | ({"weights_dtype": "float16"} if save_dtype is not None else {})
            | ({"swa_epochs": args.swa_epochs, "swa_lr": args.swa_lr} if args.swa_epochs else {})},
        "metrics": {"val_accuracy": round(acc, 4), "val_accuracy_hflip_tta": round(acc_tta, 4),
                    **{k: round(v, 4) for k, v in extra.items()}, "val_images": len(y)},
    } | ({"test_time_augmentation": args.tta} if args.tta else {})
    publish_run(out, entry, weights_file, args.install)
    return report


def publish_run(out: Path, entry: dict[str, Any], weights_file: Path, install: Path | None) -> None:
    """End of a run: write its manifest entry next to the weights, install both when asked, print the report."""
    (out / "manifest_entry.json").write_text(json.dumps(entry, indent=2))
    if install:
        install_entry(entry, weights_file, install)
    print((out / "report.md").read_text())


def install_entry(entry: dict[str, Any], weights_file: Path, weights_dir: Path) -> None:
    """Copy a weights file into a weights dir and add or replace its manifest entry."""
    weights_dir.mkdir(parents=True, exist_ok=True)
    dest = weights_dir / weights_file.name
    dest.write_bytes(weights_file.read_bytes())
    manifest_path = weights_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"models": []}
    old: dict[str, Any] = next((m for m in manifest["models"] if m.get("name") == entry["name"]), {})
    # hand-written fields (model card, licence, serving options) survive a retrain
    kept = {k: old[k] for k in ("card", "license", "test_time_augmentation") if k in old and k not in entry}
    manifest["models"] = [m for m in manifest["models"] if m.get("name") != entry["name"]] + [entry | kept]
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, manifest_path)


if __name__ == "__main__":
    main()
