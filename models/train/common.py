"""Helpers shared by the training commands: splits, checkpoints, reports."""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from models.weights import sha256_file  # the one sha256 helper, re-exported for the trainers

__all__ = ["atomic_save", "confusion_matrix", "confusion_table", "hardware_description", "plot_confusion",
           "progress", "resolve_device", "save_weights", "sha256_file", "start_run", "stratified_split"]

T = TypeVar("T")


def progress(it: Iterable[T], **kw: Any) -> Iterator[T]:
    """A tqdm progress bar on stderr (plain iteration when tqdm is missing)."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return iter(it)
    return iter(tqdm(it, mininterval=2.0, dynamic_ncols=True, **kw))


def stratified_split(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a stratified (train, validation) split with about val_size validation items."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    frac = val_size / len(labels)
    train, val = [], []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = round(len(idx) * frac)
        k = min(max(k, 1 if val_size > 0 else 0), len(idx) - 1)
        val.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save through a temporary file so a crash never leaves a torn checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_weights(model: torch.nn.Module, path: Path, dtype: torch.dtype | None = None) -> str:
    """The model's state dict as plain contiguous CPU tensors (whatever layout or device it trained in), so the
    registry loads it anywhere; `dtype` stores the floating-point tensors in that type (float16 halves the file;
    loading casts them back to the model's float32). Returns the file's sha256."""
    def plain(v: torch.Tensor) -> torch.Tensor:
        v = v.detach().cpu()
        return (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()

    torch.save({k: plain(v) for k, v in model.state_dict().items()}, path)
    return sha256_file(path)


@torch.no_grad()
def round_to_storage(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Round the model's floating-point parameters and buffers through `dtype` in place, so that what is measured
    after it is exactly what a file saved in `dtype` serves."""
    for v in [*model.parameters(), *model.buffers()]:
        if v.is_floating_point():
            v.copy_(v.to(dtype).to(v.dtype))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    """n x n counts; rows are true classes, columns predictions."""
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def confusion_table(cm: np.ndarray, labels: list[str]) -> str:
    """Markdown table of a confusion matrix."""
    head = "| true \\ pred | " + " | ".join(labels) + " |"
    sep = "|---" * (len(labels) + 1) + "|"
    rows = [f"| {labels[i]} | " + " | ".join(str(int(v)) for v in cm[i]) + " |" for i in range(len(labels))]
    return "\n".join([head, sep, *rows])


def plot_confusion(cm: np.ndarray, labels: list[str], path: Path, title: str) -> None:
    """Save the confusion matrix as a PNG heat map (skipped quietly without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * n, 0.8 + 0.6 * n))
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def hardware_description(device: torch.device) -> str:
    """A short description of the hardware that ran the training."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def resolve_device(name: str) -> torch.device:
    """The training device: "auto" picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but no CUDA device is available")
    return device


def start_run(threads: int, device: str, seed: int) -> torch.device:
    """What every training command does first: CPU threads (0: torch's default), the device, the seeds."""
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    torch.manual_seed(seed)
    np.random.seed(seed)
    return dev
