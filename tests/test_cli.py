"""The command line: evaluation commands through the service's own preprocessing, fetch-weights offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from app import cli
from app.settings import Settings
from tests.conftest import TEXT_LABELS, TINY_LABELS, write_tiny_classifier, write_tiny_text_model
from tests.models.test_train_images import make_folder


def test_evaluate_image_classifier(tmp_path: Path) -> None:
    wd = tmp_path / "w"
    write_tiny_classifier(wd)
    data = tmp_path / "data"
    make_folder(tmp_path / "gen")  # class folders alpha, beta, gamma of generated PNGs
    data.mkdir()
    (tmp_path / "gen" / "alpha").rename(data / "red")
    (tmp_path / "gen" / "beta").rename(data / "green")
    s = Settings(weights_dir=wd, torch_home=tmp_path / "th", device="cpu")
    report = cli.evaluate_classifier("tiny-cifar", data, batch_size=5, settings=s)
    assert report["images"] == 16 and 0.0 <= report["accuracy"] <= 1.0
    assert set(report["per_class_accuracy"]) == set(TINY_LABELS[:2]) and report["images_per_second"] > 0


def test_evaluate_rejects_folders_with_unknown_classes(tmp_path: Path) -> None:
    wd = tmp_path / "w"
    write_tiny_classifier(wd)
    data = make_folder(tmp_path / "data")
    s = Settings(weights_dir=wd, torch_home=tmp_path / "th", device="cpu")
    with pytest.raises(SystemExit, match="not labels"):
        cli.evaluate_classifier("tiny-cifar", data, settings=s)


def test_evaluate_text_model(tmp_path: Path) -> None:
    wd = tmp_path / "w"
    write_tiny_text_model(wd)
    csv_path = tmp_path / "rows.csv"
    rows = [f'"{1 + i % 3}","Title {i}","Some description\\nwith an escaped newline {i}"' for i in range(30)]
    csv_path.write_text("\n".join(rows) + "\n")
    s = Settings(weights_dir=wd, torch_home=tmp_path / "th", device="cpu")
    report = cli.evaluate_text_model("tiny-text", csv_path, batch_size=7, settings=s)
    assert report["texts"] == 30 and 0.0 <= report["accuracy"] <= 1.0
    assert set(report["per_class"]) == set(TEXT_LABELS)
    assert sum(map(sum, report["confusion_matrix"])) == 30 and report["texts_per_second"] > 0


def test_fetch_weights_fails_fast_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from app.runtime import registry

    def unreachable(url: str, timeout: float = 4.0) -> None:
        raise registry.WeightsUnavailable(f"cannot reach host for {url}: offline")

    monkeypatch.setattr(registry, "check_reachable", unreachable)
    monkeypatch.setenv("CNN_WEIGHTS_DIR", str(tmp_path))
    code = cli.main(["fetch-weights", "resnet18", "resnet50", "--quiet"])
    out = capsys.readouterr().out
    assert code == 1 and "resnet18: FAILED" in out and "offline" in out
    assert list(tmp_path.iterdir()) == []


def test_cli_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("serve", "fetch-weights", "train", "evaluate", "evaluate-text"):
        assert cmd in out


def test_evaluate_faces_reports_metrics_and_a_threshold(tmp_path: Path) -> None:
    from app.cli import evaluate_face_model
    from tests.conftest import write_tiny_face_model
    from tests.models.test_train_faces import make_tree

    data, pairs = make_tree(tmp_path / "lfw")
    write_tiny_face_model(tmp_path / "w")
    s = Settings(weights_dir=tmp_path / "w", torch_home=tmp_path / "th", device="cpu")
    out = evaluate_face_model("tiny-face", pairs, data, roc=tmp_path / "roc.png", settings=s)
    assert out["pairs"] == 8 and out["same_pairs"] == 4 and out["images"] == 9
    assert out["images_without_face"] == 9  # noise images: the centred fallback box is used
    assert 0 < out["threshold"] < 4 and 0 <= out["kfold_accuracy"]["mean"] <= 1 and out["manifest_threshold"] == 1.0
    assert (tmp_path / "roc.png").stat().st_size > 0
    assert evaluate_face_model("tiny-face", pairs, data, holdout_max_images=4, settings=s)["pairs"] == 8
    with pytest.raises(SystemExit, match="no pairs"):  # everyone has 3 images: nobody is held out
        evaluate_face_model("tiny-face", pairs, data, holdout_max_images=3, settings=s)
