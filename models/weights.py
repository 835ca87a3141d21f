"""Weights files: the one sha256 helper, where a file is looked for, and how it is checked and fetched.

Resolution order (DESIGN.md, the same for every model): a file in the weights directory whose sha256
matches (torchvision files: the hash prefix their file name carries, the check torch.hub itself makes),
then the torch hub cache under the same name, then a download when downloads are allowed, failing fast
when the host cannot be reached. Pure library code: directories and switches come from the caller
(the service takes them from its settings).
"""

from __future__ import annotations

import hashlib
import socket
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch


def sha256_file(path: Path) -> str:
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
        digest = sha256_file(path)
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
    source: Literal["weights_dir", "hub_cache", "download", "runtime"]  # runtime: a file given to a running server


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


def download_weights(ref: WeightsRef, dest_dir: Path, *, progress: bool = True,
                     probe: Callable[[str], None] | None = None) -> Path:
    """Download a weights file into dest_dir with a progress bar, verifying its hash; fail fast offline
    (`probe(url)` raises WeightsUnavailable when the host cannot be reached; default: check_reachable)."""
    if not ref.url:
        raise WeightsUnavailable(f"{ref.file_name} has no download URL")
    (probe or check_reachable)(ref.url)
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
    # a damaged copy is not "not found": say that no verified copy exists (the problems above name the bad ones)
    missing = f"no verified copy of {ref.file_name}" if problems else f"weights file {ref.file_name} not found"
    raise WeightsUnavailable("; ".join([*problems, f"{missing}: {hint}"]))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a (verified) weights file: tensors only, never arbitrary pickled objects."""
    state: dict[str, torch.Tensor] = torch.load(path, map_location="cpu", weights_only=True)
    return state
