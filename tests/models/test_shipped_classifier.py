"""The shipped CIFAR-10 classifier: manifest, sha256, real accuracy, served without any untrained flag."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.cli import evaluate_classifier
from app.main import create_app
from app.runtime.registry import load_manifest, sha256_of
from app.settings import Settings
from tests.conftest import ROOT, SHARED_DATA, wait_ready

NAME = "cifar10-resnet56"  # the default classifier of a fresh install
LIGHT = "cifar10-resnet20"  # the smallest, earliest model, still shipped
ENSEMBLE = "cifar10-ensemble"  # resnet56 + resnet32, probabilities averaged
CIFAR_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def shipped_settings(tmp_path: Path, name: str = NAME) -> Settings:
    return Settings(weights_dir=ROOT / "weights", torch_home=tmp_path / "th", classifiers=[name], device="cpu",
                    allow_untrained=False, data_dir=tmp_path / "data", style_workers=0)


@pytest.mark.parametrize(("name", "depth", "min_acc", "min_served"),
                         [(NAME, 56, 0.90, 0.90), ("cifar10-resnet32", 32, 0.89, 0.90), (LIGHT, 20, 0.87, 0.88)])
def test_manifest_entry_and_sha256(name: str, depth: int, min_acc: float, min_served: float) -> None:
    entry = load_manifest(ROOT / "weights")[name]
    assert entry.labels == CIFAR_LABELS
    assert sha256_of(ROOT / "weights" / entry.file) == entry.sha256
    assert entry.preprocessing is not None and entry.preprocessing.crop == 32
    assert entry.metrics["val_accuracy"] >= min_acc and entry.metrics["val_accuracy_hflip_tta"] >= min_served
    assert entry.arch["depth"] == depth and entry.card and (ROOT / "weights" / entry.card).is_file()
    assert (entry.model_extra or {}).get("test_time_augmentation") == "hflip"


def test_ensemble_is_built_from_the_shipped_members() -> None:
    manifest = load_manifest(ROOT / "weights")
    entry = manifest[ENSEMBLE]
    assert entry.family == "cifar-resnet-ensemble" and entry.labels == CIFAR_LABELS
    assert sha256_of(ROOT / "weights" / entry.file) == entry.sha256
    members = entry.training["members"]
    assert [m["name"] for m in members] == [NAME, "cifar10-resnet32"]
    assert all(manifest[m["name"]].sha256 == m["sha256"] for m in members)  # not stale after a member's retrain
    assert [a["depth"] for a in entry.arch["members"]] == [56, 32]
    assert entry.preprocessing == manifest[NAME].preprocessing
    assert entry.metrics["val_accuracy"] > max(manifest[m["name"]].metrics["val_accuracy"] for m in members)
    assert entry.card and (ROOT / "weights" / entry.card).is_file()


def test_default_settings_serve_the_stronger_model_first() -> None:
    configured = Settings().classifiers
    assert configured.index(NAME) < configured.index("cifar10-resnet32") < configured.index(LIGHT)
    assert ENSEMBLE in configured


def test_served_as_trained_default(tmp_path: Path) -> None:
    with TestClient(create_app(shipped_settings(tmp_path))) as c:
        wait_ready(c)
        assert c.get("/health/ready").status_code == 200
        m = c.get("/models").json()
        assert m["default_classifier"] == NAME
        assert m["models"][0]["metrics"]["val_accuracy_hflip_tta"] >= 0.90
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (40, 90, 200)).save(buf, "JPEG")
        r = c.post("/classify", files={"image": ("blue.jpg", buf.getvalue(), "image/jpeg")})
        assert r.status_code == 200
        assert r.json()["weights"] == "trained" and r.json()["weights_source"] == "weights_dir"


@pytest.mark.shared_data
def test_accuracy_on_200_training_folder_images(tmp_path: Path) -> None:
    report = evaluate_classifier(NAME, SHARED_DATA / "cifar10" / "train", limit_per_class=20,
                                 settings=shipped_settings(tmp_path))
    assert report["images"] == 200
    assert report["accuracy"] > 0.6, report  # chance is 0.1
    assert report["weights"] == "trained"


@pytest.mark.shared_data
@pytest.mark.parametrize(("label", "model"), [("ship", NAME), ("cat", NAME), ("truck", NAME), ("cat", ENSEMBLE)])
def test_real_photos_through_the_api(tmp_path: Path, label: str, model: str) -> None:
    """Ten real images per class: the majority get their CIFAR-10 label with a real probability."""
    files = sorted((SHARED_DATA / "cifar10" / "train" / label).glob("*.jpg"))[-10:]
    with TestClient(create_app(shipped_settings(tmp_path, model))) as c:
        wait_ready(c)
        uploads = [("image", (f.name, f.read_bytes(), "image/jpeg")) for f in files]
        r = c.post("/classify", files=uploads, data={"top_k": "3"})
        assert r.status_code == 200 and r.json()["model"] == model and r.json()["weights"] == "trained"
        tops = [x["top_k"][0] for x in r.json()["results"]]
        assert sum(t["label"] == label for t in tops) >= 6, tops
        assert all(0.0 < t["probability"] <= 1.0 for t in tops)
