"""Shared fixtures: tiny real models, settings pointing at temporary directories, a client through the lifespan."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.settings import Settings
from models.cifar_resnet import cifar_resnet
from models.train.common import sha256_file

# one intra-op thread: tests use tiny models, and oversubscribed OpenMP threads are slower on 2 cores
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
TINY_LABELS = ["red", "green", "blue"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests whose data or hardware is absent, saying why."""
    no_data = pytest.mark.skip(reason=f"{SHARED_DATA} is not present")
    no_cuda = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "shared_data" in item.keywords and not SHARED_DATA.is_dir():
            item.add_marker(no_data)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)


def write_tiny_classifier(weights_dir: Path, name: str = "tiny-cifar", *, corrupt_sha: bool = False) -> Path:
    """A real ResNet-8 checkpoint (random init, seeded) with a manifest entry in weights_dir."""
    weights_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = cifar_resnet(8, len(TINY_LABELS))
    path = weights_dir / f"{name}.pt"
    torch.save(model.state_dict(), path)
    entry = {
        "name": name, "task": "image-classification", "family": "cifar-resnet",
        "arch": {"depth": 8, "shortcut": "A", "num_classes": 3}, "file": path.name,
        "sha256": "0" * 64 if corrupt_sha else sha256_file(path), "labels": TINY_LABELS,
        "preprocessing": {"resize": 32, "crop": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        "source": "project", "metrics": {"val_accuracy": 0.5},
    }
    manifest = weights_dir / "manifest.json"
    models = json.loads(manifest.read_text())["models"] if manifest.exists() else []
    models = [m for m in models if m["name"] != name] + [entry]
    manifest.write_text(json.dumps({"models": models}))
    return path


def write_tiny_face_model(weights_dir: Path, name: str = "tiny-face", *, threshold: float = 1.0, seed: int = 0) -> Path:
    """A real (random-init, seeded) 16-px FaceEmbedder making 8-d embeddings, with its manifest entry."""
    from models.faces.net import FaceEmbedder

    weights_dir.mkdir(parents=True, exist_ok=True)
    arch = {"size": 16, "dim": 8, "widths": [8, 8], "blocks": [1, 1]}
    torch.manual_seed(seed)
    model = FaceEmbedder(16, 8, (8, 8), (1, 1))
    path = weights_dir / f"{name}.pt"
    torch.save(model.state_dict(), path)
    entry = {
        "name": name, "task": "face-embedding", "family": "face-resnet", "arch": arch, "file": path.name,
        "sha256": sha256_file(path), "source": "project", "threshold": threshold,
        "preprocessing": {"resize": 16, "crop": 16, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        "face_crop": {"size": 16, "margin": 0.1}, "embedding": {"dim": 8, "normalised": True, "flip_average": True},
    }
    manifest = weights_dir / "manifest.json"
    models = json.loads(manifest.read_text())["models"] if manifest.exists() else []
    manifest.write_text(json.dumps({"models": [m for m in models if m["name"] != name] + [entry]}))
    return path


@pytest.fixture
def weights_dir(tmp_path: Path) -> Path:
    d = tmp_path / "weights"
    write_tiny_classifier(d)
    return d


@pytest.fixture
def base_settings(weights_dir: Path, tmp_path: Path) -> Settings:
    return Settings(
        weights_dir=weights_dir, torch_home=tmp_path / "torch_home", classifiers=["tiny-cifar"],
        allow_untrained=False, allow_downloads=False, device="cpu", warmup=False,
        data_dir=tmp_path / "data", style_workers=0, text_models=[], face_models=[],
    )


def wait_ready(client: TestClient, timeout: float = 60.0) -> None:
    """Poll /health/ready until start-up has finished (loaded or failed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get("/health/ready")
        if r.json().get("status") != "loading":
            return
        time.sleep(0.02)
    raise TimeoutError("service did not finish loading")


@pytest.fixture
def client_factory() -> Callable[[Settings], object]:
    @contextmanager
    def make(settings: Settings) -> Iterator[TestClient]:
        with TestClient(create_app(settings)) as client:
            wait_ready(client)
            yield client

    return make


@pytest.fixture
def client(base_settings: Settings, client_factory: Callable[[Settings], object]) -> Iterator[TestClient]:
    with client_factory(base_settings) as c:  # type: ignore[attr-defined]
        yield c


def image_bytes(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (40, 30),
                fmt: str = "PNG") -> bytes:
    """A small solid-colour image file."""
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


TEXT_LABELS = ["World", "Sports", "Business"]


def write_tiny_text_model(weights_dir: Path, name: str = "tiny-text", length: int = 64) -> Path:
    """A real (random-init, seeded) VDCNN-9 with a small head and window, with its manifest entry."""
    from models.text import build_text_model
    from models.text.encoding import CharSpec

    weights_dir.mkdir(parents=True, exist_ok=True)
    spec = CharSpec(length=length)
    arch = {"depth": 9, "pool": "max", "shortcut": False, "hidden": 32}
    torch.manual_seed(0)
    model = build_text_model("vdcnn", arch, len(TEXT_LABELS), spec.vocab_size)
    path = weights_dir / f"{name}.pt"
    torch.save(model.state_dict(), path)
    entry = {"name": name, "task": "text-classification", "family": "vdcnn", "arch": arch, "file": path.name,
             "sha256": sha256_file(path), "labels": TEXT_LABELS, "encoding": spec.to_dict(), "source": "project"}
    manifest = weights_dir / "manifest.json"
    models = json.loads(manifest.read_text())["models"] if manifest.exists() else []
    manifest.write_text(json.dumps({"models": [m for m in models if m["name"] != name] + [entry]}))
    return path


NEWS_KEYWORDS = {1: "football match goal", 2: "stocks market shares", 3: "election vote senate"}


def write_news_csvs(root: Path, filler: list[str]) -> tuple[Path, Path, Path]:
    """A gold CSV and a title-less extra CSV in AG News' layout that repeats half the gold stories under another
    title and an agency tag (AG News' near-duplicates), and their class list; stories are seeded draws of each
    class's keywords and `filler`."""
    import csv
    import random

    rng = random.Random(0)
    gold, extra = [], []
    for c, kw in NEWS_KEYWORDS.items():
        for i in range(20):
            story = " ".join(rng.choice([*kw.split(), *filler]) for _ in range(14)) + f" number {c}{i}"
            gold.append([str(c), f"Title {c}-{i}", story])
            if i % 2 == 0:
                extra.append([str(c), "", f"Other title {c}-{i} (Reuters) Reuters - {story}"])
    root.mkdir(parents=True, exist_ok=True)
    paths = (root / "gold.csv", root / "extra.csv", root / "classes.txt")
    for path, rows in zip(paths[:2], (gold, extra), strict=True):
        with open(path, "w", newline="") as fh:
            csv.writer(fh, quoting=csv.QUOTE_ALL).writerows(rows)
    paths[2].write_text("Sports\nBusiness\nPolitics\n")
    return paths


@contextmanager
def _pg_server_or_skip() -> Iterator[object]:
    from tests.pgserver import running_server, unavailable_reason

    why = unavailable_reason()
    if why:
        pytest.skip(f"POSTGRES TESTS SKIPPED: {why}")
    with running_server() as server:
        yield server


@pytest.fixture(scope="session")
def pg_server() -> Iterator[object]:
    """A throwaway PostgreSQL server for the whole test run (tests/pgserver.py); skips where one cannot start."""
    with _pg_server_or_skip() as server:
        yield server


@pytest.fixture
def own_pg_server() -> Iterator[object]:
    """A throwaway PostgreSQL server of this test's own (to restart or stop without disturbing the others)."""
    with _pg_server_or_skip() as server:
        yield server


@pytest.fixture
def pg_url(pg_server: object) -> str:
    """A fresh empty database on the throwaway server."""
    from tests.pgserver import PgServer

    assert isinstance(pg_server, PgServer)
    return pg_server.new_database()
