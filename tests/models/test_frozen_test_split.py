"""The frozen test split of an image folder: deterministic, independent of the run's seed and validation size,
stratified, disjoint from training and validation, recorded in the manifest, and scored by
`app.cli evaluate --test-split` only for models trained without it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app import cli
from app.settings import Settings
from models.preprocess import ImageSpec
from models.train import images as train_images
from models.train.images import FrozenTestSplit, frozen_test_files, split_folder
from tests.conftest import write_tiny_classifier
from tests.models.test_train_images import make_folder

RULE = FrozenTestSplit(0.2)


def test_test_split_is_deterministic_stratified_and_disjoint(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", per_class=10)
    sp = split_folder(data, 6, seed=0, test=RULE)
    assert np.bincount(sp.labels[sp.test]).tolist() == [2, 2, 2]  # 20% of every class
    assert np.bincount(sp.labels[sp.val]).tolist() == [2, 2, 2]
    train, val, test = set(sp.train), set(sp.val), set(sp.test)
    assert not train & val and not train & test and not val & test and len(train | val | test) == 30
    test_files = [sp.files[i] for i in sp.test]
    # the same images whatever the run's seed or validation size: the split is the folder's, not the run's
    for seed, val_size in ((1, 6), (7, 9), (0, 3)):
        other = split_folder(data, val_size, seed=seed, test=RULE)
        assert [other.files[i] for i in other.test] == test_files
        assert not set(other.train) & set(other.test) and not set(other.val) & set(other.test)
    # ... and whatever the folder is called or where it lives (relative paths are hashed)
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(data, moved)
    again = split_folder(moved, 6, seed=0, test=RULE)
    assert [f.relative_to(moved) for f in (again.files[i] for i in again.test)] == [
        f.relative_to(data) for f in test_files]
    # another salt chooses other images (the rule is the hash, not the listing order)
    salted = split_folder(data, 6, seed=0, test=FrozenTestSplit(0.2, salt="other"))
    assert [salted.files[i] for i in salted.test] != test_files


def test_the_test_split_is_chosen_by_the_path_hash_rule(tmp_path: Path) -> None:
    import hashlib

    data = make_folder(tmp_path / "data", per_class=10)
    sp = split_folder(data, 6, seed=0, test=RULE)
    for c, name in enumerate(sp.classes):
        files = sorted((data / name).iterdir())
        ranked = sorted(files, key=lambda f: hashlib.sha256(
            f"{RULE.salt}\0{f.relative_to(data).as_posix()}".encode()).digest())
        chosen = {sp.files[i] for i in sp.test if sp.labels[i] == c}
        assert chosen == set(ranked[:2])


def test_without_a_test_rule_the_split_is_the_old_one(tmp_path: Path) -> None:
    """Models trained before the frozen test split (the shipped CIFAR models) keep their exact hold-out."""
    from models.train.common import stratified_split

    data = make_folder(tmp_path / "data", per_class=10)
    _, _, labels = train_images.scan_image_folder(data)
    train, val = stratified_split(labels, 6, 0)
    for rule in (None, FrozenTestSplit(0.0)):
        sp = split_folder(data, 6, seed=0, test=rule)
        assert sp.train.tolist() == train.tolist() and sp.val.tolist() == val.tolist() and len(sp.test) == 0


def test_small_classes_keep_a_training_and_a_validation_image(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", per_class=3)
    sp = split_folder(data, 3, seed=0, test=FrozenTestSplit(0.9))
    assert np.bincount(sp.labels[sp.test]).tolist() == [1, 1, 1]
    assert np.bincount(sp.labels[sp.train]).min() >= 1 and np.bincount(sp.labels[sp.val]).min() >= 1
    with pytest.raises(ValueError, match="test fraction"):
        FrozenTestSplit(1.0)


def _train(data: Path, tmp_path: Path, *extra: str) -> dict:  # type: ignore[type-arg]
    return train_images.main(["--data", str(data), "--out", str(tmp_path / "run"), "--name", "tiny-rgb", "--depth",
                              "8", "--epochs", "2", "--batch-size", "8", "--val-size", "6", "--cache",
                              str(tmp_path / "cache"), "--threads", "1", "--install", str(tmp_path / "w"), *extra])


def test_trainer_leaves_the_test_split_out_and_records_it(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", per_class=10)
    report = _train(data, tmp_path, "--test-fraction", "0.2")
    entry = json.loads((tmp_path / "run" / "manifest_entry.json").read_text())
    info = entry["training"]["test_split"]
    assert info["images"] == 6 and info["fraction"] == 0.2 and info["salt"] == RULE.salt
    assert report["train_size"] == 18 and report["test_size"] == 6 and report["val_size"] == 6
    assert entry["training"]["train_images"] + entry["training"]["val_images"] + info["images"] == 30
    h = train_images.holdout_from_training(entry["training"], "tiny-rgb")
    _, files, labels = frozen_test_files(h, name="tiny-rgb")
    sp = split_folder(data, 6, 0, test=RULE)
    assert files == [sp.files[i] for i in sp.test] and labels.tolist() == sp.labels[sp.test].tolist()
    # the trainer's training and validation arrays hold none of the test images
    _, (x_train, _), (x_val, _) = train_images.load_split(data, 32, 6, 0, None, test=h.test)
    raw = ImageSpec(resize=32, crop=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    test_u8 = np.stack([train_images.to_uint8_array(Image.open(f), raw) for f in files])
    seen = {a.tobytes() for a in x_train.permute(0, 2, 3, 1).numpy()} | {
        a.tobytes() for a in x_val.permute(0, 2, 3, 1).numpy()}
    assert not any(a.tobytes() in seen for a in test_u8)
    assert len(x_train) == 18 and len(x_val) == 6

    # a changed folder is refused: a renamed test image keeps the counts but changes the chosen files
    victim = files[0]
    victim.rename(victim.with_name("renamed-" + victim.name))
    with pytest.raises(SystemExit, match="files_sha256 mismatch"):
        frozen_test_files(h, name="tiny-rgb")


def test_evaluate_test_split_scores_exactly_the_test_images(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_folder(tmp_path / "data", per_class=10)
    _train(data, tmp_path, "--test-fraction", "0.2")
    s = Settings(weights_dir=tmp_path / "w", torch_home=tmp_path / "th", device="cpu")
    out = cli.evaluate_classifier("tiny-rgb", None, test_split=True, one_view=True, settings=s)
    assert out["images"] == 6 and out["test_split"]["test_images"] == 6 and "holdout" not in out
    assert sum(map(sum, out["confusion_matrix"])) == 6
    assert out["measured"]["val_accuracy"]["total"] == 6
    assert set(out["test_minus_validation_points"]) == {"val_accuracy"}
    # the hold-out is another set of images
    held = cli.evaluate_classifier("tiny-rgb", None, holdout=True, settings=s)
    assert held["images"] == 6 and held["holdout"]["val_images"] == 6
    with pytest.raises(SystemExit, match="choose one"):
        cli.evaluate_classifier("tiny-rgb", None, holdout=True, test_split=True, settings=s)
    for key, value in (("WEIGHTS_DIR", tmp_path / "w"), ("TORCH_HOME", tmp_path / "th"), ("DEVICE", "cpu")):
        monkeypatch.setenv(f"CNN_{key}", str(value))
    capsys.readouterr()
    report_file = tmp_path / "reports" / "test.json"
    assert cli.main(["evaluate", "tiny-rgb", "--test-split", "--out", str(report_file)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["measured"] == out["measured"] and json.loads(report_file.read_text()) == printed
    assert cli.main(["evaluate", "tiny-rgb", "--test-split", "--holdout"]) == 2


def test_models_trained_without_a_test_split_are_refused(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", per_class=10)
    _train(data, tmp_path, "--test-fraction", "0")
    entry = json.loads((tmp_path / "run" / "manifest_entry.json").read_text())
    assert "test_split" not in entry["training"] and entry["training"]["train_images"] == 24
    s = Settings(weights_dir=tmp_path / "w", torch_home=tmp_path / "th", device="cpu")
    with pytest.raises(SystemExit, match=r"trained without a frozen test split.*6-image validation hold-out"):
        cli.evaluate_classifier("tiny-rgb", None, test_split=True, settings=s)
    write_tiny_classifier(tmp_path / "w2")  # no training info at all
    with pytest.raises(SystemExit, match="hold-out cannot be rebuilt"):
        cli.evaluate_classifier("tiny-cifar", data, test_split=True,
                                settings=Settings(weights_dir=tmp_path / "w2", torch_home=tmp_path / "th",
                                                  device="cpu"))
