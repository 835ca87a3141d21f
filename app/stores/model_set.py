"""The run-time model set: what operators changed on a running server (models loaded or unloaded, weights
swapped in, batching, defaults) and when, kept in one JSON file beside the other stores so a restart serves the
same set. Uploaded weights files live next to it, named by their sha256."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

VERSION = 1
MAX_CHANGES = 200  # the history /models shows is bounded; the oldest entries go first


@dataclass
class ModelRecord:
    """One model's run-time state: loaded or unloaded, and what replaced its configuration."""

    state: str  # "loaded" | "unloaded"
    task: str
    weights_file: str | None = None  # a file under the store's weights folder, instead of the manifest's
    weights_sha256: str | None = None
    batching: dict[str, float] | None = None
    changed_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Change:
    """One operator action, as /models lists it."""

    at: float
    action: str
    model: str | None
    by: str
    detail: str


class ModelSetStore:
    """Reads and writes the run-time model set (thread-safe; every write replaces the file atomically)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "models.json"
        self.weights_dir = root / "weights"
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.models: dict[str, ModelRecord] = {}
        self.defaults: dict[str, str] = {}
        self.changes: list[Change] = []
        if self.path.exists():
            try:
                self._read()
            except (OSError, ValueError, TypeError, AttributeError) as exc:
                self._set_aside(exc)

    def _read(self) -> None:
        raw = json.loads(self.path.read_text())
        if raw.get("version") != VERSION:
            raise ValueError(f"version {raw.get('version')!r}, expected {VERSION}")
        self.models = {n: ModelRecord(**r) for n, r in raw.get("models", {}).items()}
        self.defaults = {str(k): str(v) for k, v in raw.get("defaults", {}).items()}
        self.changes = [Change(**c) for c in raw.get("changes", [])]

    def _set_aside(self, exc: BaseException) -> None:
        """A file this server cannot read is never half-applied, nor allowed to stop every application: it is kept
        beside (for the operator), the configured model set serves, and the first change /models lists says so."""
        kept = self.path.with_name(f"models.json.unreadable-{int(time.time())}")
        os.replace(self.path, kept)
        self.models, self.defaults, self.changes = {}, {}, []
        log.error("run-time model set %s unreadable (%s): moved to %s; serving the configured models", self.path,
                  exc, kept)
        self.record("set-aside", None, "server", f"{self.path.name} could not be read ({type(exc).__name__}: "
                    f"{exc}); kept as {kept.name}; the configured models serve")

    def _write(self) -> None:
        data = {"version": VERSION, "models": {n: asdict(r) for n, r in self.models.items()},
                "defaults": self.defaults, "changes": [asdict(c) for c in self.changes[-MAX_CHANGES:]]}
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".models-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def record(self, action: str, model: str | None, by: str, detail: str, *,
               update: dict[str, ModelRecord | None] | None = None,
               defaults: dict[str, str | None] | None = None) -> Change:
        """Apply a change (model records: None removes one; defaults: None removes one), log it, save."""
        with self._lock:
            for name, rec in (update or {}).items():
                if rec is None:
                    self.models.pop(name, None)
                else:
                    self.models[name] = rec
            for task, default in (defaults or {}).items():
                if default is None:
                    self.defaults.pop(task, None)
                else:
                    self.defaults[task] = default
            change = Change(time.time(), action, model, by, detail)
            self.changes = [*self.changes, change][-MAX_CHANGES:]
            self._write()
            return change

    def save_weights(self, data: bytes) -> tuple[Path, str]:
        """Keep an uploaded weights file under its sha256; returns (path, sha256)."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.weights_dir / f"{digest}.pt"
        if not path.exists():
            fd, tmp = tempfile.mkstemp(dir=self.weights_dir, suffix=".part")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        return path, digest

    def history(self, model: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """The newest changes first (of one model, or all)."""
        rows = [c for c in self.changes if model is None or c.model == model]
        return [asdict(c) for c in reversed(rows[-limit:])]
