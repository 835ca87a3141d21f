"""The TF-IDF + logistic-regression baseline (`baseline-text`) on a tiny generated split in AG News' layout."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from app import cli
from models.train import text as train_text
from models.train import text_baseline
from tests.conftest import write_news_csvs

needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                                   reason="scikit-learn (the dev extra the TF-IDF baseline needs) is not installed")

FILLER = ["the", "a", "new", "report", "said", "week", "after", "local"]


def news_csvs(root: Path) -> tuple[Path, Path, Path]:
    return write_news_csvs(root, FILLER)


def old_split_holdout(gold: Path, extra: Path, classes: list[str]) -> train_text.TextHoldout:
    """The hold-out description of a model trained before the near-duplicate rule (as agnews-vdcnn9 was)."""
    rows = [train_text.TextRows(p, texts, train_text.map_labels(raw, classes, 1, p), keys)
            for p in (gold, extra)
            for raw, texts, keys in [train_text.read_csv_with_keys(p, label_column="1", text_columns=["2", "3"],
                                                                   header=False, unescape=True, encoding="utf-8-sig")]]
    split = train_text.split_rows(rows, "12", True, 0, dedup=False)
    training = {"data": [str(gold), str(extra)], "rows": {str(gold): 60, str(extra): 30},
                "train_rows": len(split.train_texts), "val_rows": len(split.val_texts), "val_from": str(gold),
                "recipe": {"seed": 0}}
    return train_text.holdout_from_training(training, "tiny-old")


@needs_sklearn
def test_baseline_trains_on_the_training_rows_and_scores_both_holdouts(tmp_path: Path) -> None:
    gold, extra, classes_file = news_csvs(tmp_path / "news")
    classes = train_text.read_classes(classes_file)
    h = old_split_holdout(gold, extra, classes)
    report = text_baseline.run_baseline(h, classes, batch_sizes=(1, 4))
    split = train_text.holdout_split(h, classes)
    info = report["split"]
    # exactly the model's split: the same sizes, no hold-out text among the training texts
    assert (info["train_rows"], info["val_rows"]) == (h.train_rows, 12) == (len(split.train_texts), 12)
    assert info["holdout_texts_also_in_training"] == 0 and not set(split.val_texts) & set(split.train_texts)
    near = info["val_rows_with_near_duplicate_in_training"]
    # the generated extra file (all of it training) repeats the stories of the even-numbered gold rows: exactly
    # the hold-out rows titled "Title <class>-<even i>" have a near-duplicate in training
    numbers = [int(re.match(r"Title \d+-(\d+) ", t).group(1)) for t in split.val_texts]  # type: ignore[union-attr]
    assert near == sum(i % 2 == 0 for i in numbers) and 0 < near < 12, numbers
    for variant in text_baseline.VARIANTS:
        r = report["variants"][variant]
        old, dedup = r["holdout_as_validated"], r["deduplicated_holdout"]
        assert old["total"] == 12 and dedup["total"] == 12 - near
        assert old["correct"] == sum(old["confusion_matrix"][i][i] for i in range(3))
        assert old["accuracy"] == old["correct"] / 12 and set(old["per_class_accuracy"]) == set(classes)
        assert r["features"] > 0 and r["fit_seconds"] >= 0 and set(r["prediction_speed"]) == {"1", "4"}
    assert report["variants"]["words+chars"]["features"] > report["variants"]["words"]["features"]
    assert report["config"]["word_ngrams"] == [1, 2] and report["config"]["char_ngrams"] == [2, 5]


@needs_sklearn
def test_baseline_text_command_on_a_trained_models_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    gold, extra, classes = news_csvs(tmp_path / "news")
    wd = tmp_path / "w"
    train_text.main(["--train", str(gold), "--train", str(extra), "--classes", str(classes), "--out",
                     str(tmp_path / "run"), "--name", "tiny-news", "--length", "64", "--hidden", "8", "--epochs", "1",
                     "--batch-size", "16", "--val-size", "12", "--threads", "1", "--device", "cpu",
                     "--install", str(wd)])
    entry = json.loads((wd / "manifest.json").read_text())["models"][0]
    monkeypatch.setenv("CNN_WEIGHTS_DIR", str(wd))
    monkeypatch.setenv("CNN_DEVICE", "cpu")
    out = tmp_path / "reports" / "baseline.json"
    capsys.readouterr()  # the trainer's output
    assert cli.main(["baseline-text", "tiny-news", "--out", str(out), "--batch-size", "4"]) == 0
    report = json.loads(out.read_text())
    assert set(json.loads(capsys.readouterr().out)) == {"words", "words+chars", "tiny-news"}
    # a new-split model: its hold-out has no near-duplicate in training, so only that one is scored
    assert report["split"]["train_rows"] == entry["training"]["train_rows"]
    assert report["split"]["val_rows"] == entry["training"]["val_rows"]
    assert report["split"]["val_rows_with_near_duplicate_in_training"] == 0
    assert report["split"]["holdout_texts_also_in_training"] == 0
    for r in report["variants"].values():
        assert "holdout_as_validated" not in r and r["deduplicated_holdout"]["total"] == entry["training"]["val_rows"]
    # the model itself on the same rows, next to the baseline
    assert report["cnn"]["deduplicated_holdout"]["texts"] == entry["training"]["val_rows"]
    assert report["cnn"]["deduplicated_holdout"]["accuracy"] == pytest.approx(entry["metrics"]["val_accuracy"],
                                                                             abs=1e-4)
    assert set(report["side_by_side"]["tiny-news"]["texts_per_second"]) == {"1", "4"}
    # unknown or non-text models are refused
    assert cli.main(["baseline-text", "no-such-model", "--no-compare"]) == 2


def test_baseline_without_scikit_learn_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn raises ImportError
    with pytest.raises(SystemExit, match="scikit-learn is not installed"):
        text_baseline.require_sklearn()
    with pytest.raises(SystemExit, match="dev extra"):
        cli.main(["baseline-text", "--no-compare"])


def test_the_service_and_the_cli_do_not_import_scikit_learn() -> None:
    """scikit-learn is a dev extra: importing the app, the CLI or the baseline module must not need it."""
    import subprocess

    code = ("import sys; import app.main, app.cli, models.train.text_baseline; "
            "sys.exit(1 if 'sklearn' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2]).returncode == 0


@needs_sklearn
def test_out_of_fold_probabilities_never_come_from_a_model_that_saw_the_row() -> None:
    """Rows whose label follows a keyword are predicted well out of fold; rows with random labels and texts of
    their own cannot be, because no model that saw them predicts them (a model fitted on all rows memorises them)."""
    import numpy as np

    rng = np.random.default_rng(0)
    keywords = ["football goal match", "shares market profit", "election vote minister"]
    texts, labels = [], []
    for i in range(90):
        c = i % 3
        texts.append(f"{keywords[c]} {' '.join(rng.choice(FILLER, 5))}")
        labels.append(c)
    noise_texts = [f"zq{i}x uniq{i}w token{i}k" for i in range(60)]
    noise_labels = rng.integers(0, 3, 60).tolist()
    all_texts, all_labels = texts + noise_texts, np.array(labels + noise_labels)
    probs = text_baseline.out_of_fold_probabilities(all_texts, all_labels, 3, folds=3)
    assert probs.shape == (150, 3) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (probs[:90].argmax(1) == all_labels[:90]).mean() > 0.95
    in_sample = text_baseline.make_pipeline("words+chars", text_baseline.BaselineConfig())
    in_sample.fit(all_texts, all_labels)
    assert (in_sample.predict(noise_texts) == all_labels[90:]).mean() > 0.95  # memorised when seen
    assert (probs[90:].argmax(1) == all_labels[90:]).mean() < 0.6  # out of fold: near chance (1/3)
    with pytest.raises(ValueError, match="at least 2 folds"):
        text_baseline.out_of_fold_probabilities(all_texts, all_labels, 3, folds=1)


@needs_sklearn
def test_word_cnn_distilled_from_the_baseline_records_it_and_reuses_the_teacher(tmp_path: Path) -> None:
    gold, extra, classes_file = news_csvs(tmp_path / "news")
    out = tmp_path / "run"
    plain = ["--train", str(gold), "--train", str(extra), "--classes", str(classes_file), "--out", str(out),
             "--name", "tiny-distilled", "--family", "word-cnn", "--word-dim", "16", "--filters", "16",
             "--buckets", "512", "--min-count", "1", "--epochs", "2", "--batch-size", "16", "--val-size", "12",
             "--optimizer", "adamw", "--lr", "1e-2", "--threads", "1", "--seed", "0", "--device", "cpu"]
    args = [*plain, "--distill-tfidf-folds", "2", "--distill-weight", "0.5"]
    train_text.main(args)
    entry = json.loads((out / "manifest_entry.json").read_text())
    assert entry["training"]["recipe"]["distillation"]["folds"] == 2
    assert entry["training"]["recipe"]["distillation"]["weight"] == 0.5
    (teacher,) = out.glob("teacher-*.npy")
    import numpy as np

    probs = np.load(teacher)
    assert probs.shape == (entry["training"]["train_rows"], 3) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    # a resumed or repeated run with the same rows and folds reuses the cached teacher instead of refitting it
    before = teacher.stat().st_mtime_ns
    (out / "checkpoint.pt").unlink()
    train_text.main(args)
    assert teacher.stat().st_mtime_ns == before and len(list(out.glob("teacher-*.npy"))) == 1
    # the checkpoint of a distilled run is not resumed by a run without the teacher (another configuration)
    with pytest.raises(SystemExit, match="different configuration"):
        train_text.main([*plain, "--epochs", "3"])


@pytest.mark.parametrize(("extra", "message"), [
    (["--distill-tfidf-folds", "1"], "at least 2 folds"),
    (["--distill-tfidf-folds", "3", "--distill-weight", "1.5"], "between 0 and 1"),
    (["--distill-tfidf-folds", "3", "--members", "2"], "not with --members"),
])
def test_distillation_options_refused_where_they_cannot_work(tmp_path: Path, extra: list[str], message: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        train_text.parse_args(["--train", str(tmp_path / "x.csv"), "--out", str(tmp_path / "o"),
                               "--family", "word-cnn", *extra])
    assert exc.value.code == 2 and message in capsys.readouterr().err
