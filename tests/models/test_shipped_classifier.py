"""The shipped CIFAR-10 classifiers: manifest, sha256, accuracy on their real hold-out, served without any
untrained flag."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.cli import evaluate_classifier
from app.main import create_app
from app.runtime.registry import load_manifest, sha256_of
from app.settings import Settings
from models.manifest import ManifestEntry
from tests.conftest import ROOT, SHARED_DATA, wait_ready

NAME = "cifar10-resnet56"  # the default classifier of a fresh install
LIGHT = "cifar10-resnet20"  # the smallest, earliest model, still shipped
ENSEMBLE = "cifar10-ensemble"  # resnet56 + resnet32, probabilities averaged
WHITENED = "cifar10-whitened-convnet"  # the fast-training family, with a frozen test split; float16 weights
WHITENED_30 = "cifar10-whitened-convnet-30"  # the same network and recipe, 30 epochs
ENSEMBLE_40K = "cifar10-ensemble-40k"  # one member of each newer family, all on the frozen-test-split training set
WIDE = "cifar10-wrn-16-2"  # the wide-ResNet family, with a frozen test split
SE = "cifar10-se-resnet20"  # the squeeze-and-excitation family, with a frozen test split
# models trained with the frozen test split left out, each with the rule that decided whether it became the default:
# (name, how far above the default's served hold-out accuracy it had to be, whether equal to the bar was enough)
SPLIT_MODELS = [(WHITENED, 0.0, False), (WIDE, 0.005, True), (SE, 0.005, True), (WHITENED_30, 0.005, True)]
CIFAR_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


SPLIT_METRICS = ("val_accuracy", "val_accuracy_hflip_tta", "test_accuracy", "test_accuracy_hflip_tta")


def assert_card_quotes(entry: ManifestEntry, keys: tuple[str, ...]) -> None:
    """The model card quotes the manifest's numbers (which the accuracy tests below measure)."""
    card = (ROOT / "weights" / str(entry.card)).read_text()
    for key in keys:
        assert f"{100 * entry.metrics[key]:.2f}%" in card, key


def shipped_settings(tmp_path: Path, name: str = NAME) -> Settings:
    return Settings(weights_dir=ROOT / "weights", torch_home=tmp_path / "th", classifiers=[name], device="cpu",
                    allow_untrained=False, data_dir=tmp_path / "data", style_workers=0)


# Hold-out sample: the first 140 hold-out images of every class (1,400 of 5,000). Its accuracy differs from the
# full hold-out's by sampling alone; at ~90% that standard error is sqrt(p(1-p)/n * (N-n)/(N-1)) = 0.66 points,
# so the 2-point bound below is 3 standard errors: a model that really scores 2+ points off its card fails.
SAMPLE_PER_CLASS = 140
TOLERANCE = 0.02


@pytest.mark.parametrize(("name", "depth"), [(NAME, 56), ("cifar10-resnet32", 32), (LIGHT, 20)])
def test_manifest_entry_and_sha256(name: str, depth: int) -> None:
    entry = load_manifest(ROOT / "weights")[name]
    assert entry.labels == CIFAR_LABELS
    assert sha256_of(ROOT / "weights" / entry.file) == entry.sha256
    assert entry.preprocessing is not None and entry.preprocessing.crop == 32
    assert entry.arch["depth"] == depth and entry.card and (ROOT / "weights" / entry.card).is_file()
    assert (entry.model_extra or {}).get("test_time_augmentation") == "hflip"
    assert_card_quotes(entry, ("val_accuracy", "val_accuracy_hflip_tta"))
    # the hold-out can be rebuilt: its folder, size and split seed are recorded
    assert entry.training["train_images"] + entry.training["val_images"] == 50000
    assert entry.training["recipe"]["seed"] == 0


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


def test_ensemble_40k_is_built_from_the_shipped_members_and_passed_its_rule() -> None:
    manifest = load_manifest(ROOT / "weights")
    entry = manifest[ENSEMBLE_40K]
    assert entry.family == "cifar-resnet-ensemble" and entry.labels == CIFAR_LABELS
    assert sha256_of(ROOT / "weights" / entry.file) == entry.sha256
    names = [m["name"] for m in entry.training["members"]]
    assert names == [WHITENED_30, WIDE, SE]
    assert all(manifest[m["name"]].sha256 == m["sha256"] for m in entry.training["members"])  # not stale
    assert [a.get("family") for a in entry.arch["members"]] == [manifest[n].family for n in names]
    assert "weights" not in entry.arch  # equal weights, as the rule fixed
    assert all(manifest[n].preprocessing == entry.preprocessing for n in names)
    assert entry.training["test_split"] == manifest[WHITENED].training["test_split"]
    assert_card_quotes(entry, SPLIT_METRICS)
    # its rule: shipped only at its best member's served validation accuracy + 0.5 points; never the default
    decision = json.loads((ROOT / "weights" / "reports" / f"{ENSEMBLE_40K}-decision.json").read_text())
    best = max(manifest[n].metrics["val_accuracy_hflip_tta"] for n in names)
    assert decision["bar_to_ship"] == pytest.approx(best + 0.005, abs=1e-9)
    assert decision["ships_by_name"] is True and entry.metrics["val_accuracy_hflip_tta"] >= decision["bar_to_ship"]
    assert decision["becomes_default"] is False and decision["decided_before_the_test_split_was_scored"] is True
    configured = Settings().classifiers
    assert configured.index(NAME) < configured.index(ENSEMBLE_40K)


def test_default_settings_serve_the_stronger_model_first() -> None:
    configured = Settings().classifiers
    assert configured.index(NAME) < configured.index("cifar10-resnet32") < configured.index(LIGHT)
    assert ENSEMBLE in configured and configured.index(NAME) < configured.index(WHITENED)


@pytest.mark.parametrize("name", [WHITENED, WHITENED_30])
def test_whitened_convnet_entry_and_float16_weights(name: str) -> None:
    entry = load_manifest(ROOT / "weights")[name]
    assert entry.family == "cifar-whitened-convnet" and entry.labels == CIFAR_LABELS
    assert entry.arch == {"widths": [64, 256, 256], "convs": 2, "logit_scale": 1 / 9, "num_classes": 10}
    state = torch.load(ROOT / "weights" / entry.file, weights_only=True)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    assert entry.training["recipe"]["weights_dtype"] == "float16"
    assert entry.training["recipe"]["whitening"]["frozen"] is True


def test_whitened_30_is_the_same_recipe_twice_as_long_and_passed_its_shipping_bar() -> None:
    manifest = load_manifest(ROOT / "weights")
    short, long = manifest[WHITENED], manifest[WHITENED_30]
    assert (short.training["recipe"]["epochs"], long.training["recipe"]["epochs"]) == (15, 30)
    assert {k: v for k, v in long.training["recipe"].items() if k != "epochs"} == \
        {k: v for k, v in short.training["recipe"].items() if k != "epochs"}
    assert long.training["test_split"] == short.training["test_split"] and long.preprocessing == short.preprocessing
    # its rule: shipped by name only above the 15-epoch model's served validation accuracy on the same images
    decision = json.loads((ROOT / "weights" / "reports" / f"{WHITENED_30}-decision.json").read_text())
    assert decision["bar_to_ship"] == short.metrics["val_accuracy_hflip_tta"]
    assert decision["ships_by_name"] is True and long.metrics["val_accuracy_hflip_tta"] > decision["bar_to_ship"]


@pytest.mark.parametrize(("name", "family", "arch", "epochs"), [
    (WIDE, "cifar-wide-resnet", {"depth": 16, "width": 2, "dropout": 0.0, "num_classes": 10}, 50),
    (SE, "cifar-se-resnet", {"depth": 20, "shortcut": "A", "reduction": 16, "num_classes": 10}, 40),
])
def test_new_family_entries(name: str, family: str, arch: dict[str, object], epochs: int) -> None:
    entry = load_manifest(ROOT / "weights")[name]
    assert entry.family == family and entry.labels == CIFAR_LABELS
    assert entry.arch == arch
    assert entry.training["recipe"]["epochs"] == epochs and entry.training["recipe"]["precision"] == "bf16"


@pytest.mark.parametrize(("name", "margin", "equal_passes"), SPLIT_MODELS)
def test_frozen_split_models_and_their_decisions(name: str, margin: float, equal_passes: bool) -> None:
    manifest = load_manifest(ROOT / "weights")
    entry = manifest[name]
    assert sha256_of(ROOT / "weights" / entry.file) == entry.sha256
    # trained with the frozen test split left out: 40,000 train + 5,000 validation + 5,000 test
    split = entry.training["test_split"]
    assert (entry.training["train_images"], entry.training["val_images"], split["images"]) == (40000, 5000, 5000)
    assert split["files_sha256"] == manifest[WHITENED].training["test_split"]["files_sha256"]  # one frozen split
    assert (entry.model_extra or {}).get("test_time_augmentation") == "hflip"
    assert_card_quotes(entry, SPLIT_METRICS)
    # the rule written before training: default only at or above a bar set from the default's served accuracy
    decision = json.loads((ROOT / "weights" / "reports" / f"{name}-decision.json").read_text())
    bar = manifest[NAME].metrics["val_accuracy_hflip_tta"] + margin
    assert decision["bar_for_default"] == pytest.approx(bar, abs=1e-9)
    served = entry.metrics["val_accuracy_hflip_tta"]
    assert decision["validation_served_hflip"] == served
    assert decision["becomes_default"] is (served >= bar if equal_passes else served > bar)
    assert decision["decided_before_the_test_split_was_scored"] is True
    assert (Settings().classifiers.index(name) < Settings().classifiers.index(NAME)) is decision["becomes_default"]


def test_served_as_trained_default(tmp_path: Path) -> None:
    with TestClient(create_app(shipped_settings(tmp_path))) as c:
        wait_ready(c)
        assert c.get("/health/ready").status_code == 200
        m = c.get("/models").json()
        assert m["default_classifier"] == NAME
        assert m["models"][0]["metrics"] == load_manifest(ROOT / "weights")[NAME].metrics  # the card's numbers
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (40, 90, 200)).save(buf, "JPEG")
        r = c.post("/classify", files={"image": ("blue.jpg", buf.getvalue(), "image/jpeg")})
        assert r.status_code == 200
        assert r.json()["weights"] == "trained" and r.json()["weights_source"] == "weights_dir"


@pytest.mark.shared_data
@pytest.mark.parametrize("name", [NAME, "cifar10-resnet32", LIGHT, ENSEMBLE, WHITENED, WHITENED_30, WIDE, SE,
                                  ENSEMBLE_40K])
def test_accuracy_on_the_holdout(tmp_path: Path, name: str) -> None:
    """A fixed sample of the images the model was validated on (never trained on), through the service's
    decoding, preprocessing and flip averaging: within 2 points of the served accuracy its card states."""
    report = evaluate_classifier(name, SHARED_DATA / "cifar10" / "train", holdout=True,
                                 limit_per_class=SAMPLE_PER_CLASS, batch_size=128,
                                 settings=shipped_settings(tmp_path, name))
    assert report["images"] == 10 * SAMPLE_PER_CLASS and report["weights"] == "trained"
    assert report["holdout"]["val_images"] == 5000 and report["served_with"] == "hflip"
    card = load_manifest(ROOT / "weights")[name].metrics["val_accuracy_hflip_tta"]
    assert abs(report["accuracy"] - card) <= TOLERANCE, (report["accuracy"], card)


@pytest.mark.shared_data
@pytest.mark.parametrize("name", [WHITENED, WHITENED_30, WIDE, SE, ENSEMBLE_40K])
def test_frozen_test_split_accuracy(tmp_path: Path, name: str) -> None:
    """The card's test-split number reproduces on a fixed sample of it (the first 140 test images per class),
    within the same 2 points as the hold-out check."""
    report = evaluate_classifier(name, SHARED_DATA / "cifar10" / "train", test_split=True,
                                 limit_per_class=SAMPLE_PER_CLASS, batch_size=128,
                                 settings=shipped_settings(tmp_path, name))
    assert report["images"] == 10 * SAMPLE_PER_CLASS and report["test_split"]["test_images"] == 5000
    card = load_manifest(ROOT / "weights")[name].metrics["test_accuracy_hflip_tta"]
    assert abs(report["accuracy"] - card) <= TOLERANCE, (report["accuracy"], card)


@pytest.mark.shared_data
def test_holdout_is_disjoint_from_the_training_images() -> None:
    """The hold-out the evaluation rebuilds is the trainer's: its 5,000 images are the ones training left out."""
    from models.train.images import holdout_files, holdout_from_training, split_files

    h = holdout_from_training(load_manifest(ROOT / "weights")[NAME].training, NAME)
    _, files, labels = holdout_files(h, SHARED_DATA / "cifar10" / "train")
    _, all_files, _, train_idx, val_idx = split_files(SHARED_DATA / "cifar10" / "train", h.val_size, h.seed)
    assert len(files) == 5000 and sorted(labels.tolist()) == sorted(list(range(10)) * 500)
    assert not {all_files[i] for i in train_idx} & set(files)
    assert files == [all_files[i] for i in val_idx]


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


@pytest.mark.parametrize("name", [NAME, "cifar10-resnet32", LIGHT, ENSEMBLE])
def test_shipped_models_have_no_frozen_test_split(name: str) -> None:
    """Trained before the frozen test split existed, on every image outside their hold-out: their split is the
    old one (no test images) and `evaluate --test-split` refuses them, pointing at the hold-out."""
    from models.train.images import frozen_test_files, holdout_from_training

    entry = load_manifest(ROOT / "weights")[name]
    assert "test_split" not in entry.training
    h = holdout_from_training(entry.training, name)
    assert h.test is None and h.test_size == 0
    with pytest.raises(SystemExit, match="only data it has not seen"):
        frozen_test_files(h, SHARED_DATA / "cifar10" / "train", name)


@pytest.mark.shared_data
def test_the_frozen_test_split_of_cifar10_is_mostly_shipped_training_data() -> None:
    """Why the shipped models cannot be scored on the frozen test split: 90% of it is in their training set.
    New runs leave its 5,000 images (500 per class) out of training and validation."""
    from models.train.images import DEFAULT_TEST_FRACTION, FrozenTestSplit, split_folder

    root = SHARED_DATA / "cifar10" / "train"
    new = split_folder(root, 5000, 0, test=FrozenTestSplit(DEFAULT_TEST_FRACTION))
    old = split_folder(root, 5000, 0)
    assert len(new.test) == 5000 and np.bincount(new.labels[new.test]).tolist() == [500] * 10
    assert (len(new.train), len(new.val)) == (40000, 5000)
    assert len(set(new.test) & set(old.val)) + len(set(new.test) & set(old.train)) == 5000
    assert len(set(new.test) & set(old.train)) > 4000
