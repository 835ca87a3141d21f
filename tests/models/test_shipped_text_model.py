"""The shipped AG News text models: manifest, sha256, accuracy on their real hold-out, the word CNN served by
default without flags and the VDCNN by name."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.cli import evaluate_text_model
from app.main import create_app
from app.runtime.registry import load_manifest, sha256_of
from app.settings import Settings
from tests.conftest import ROOT, wait_ready

NAME = "agnews-vdcnn9"
WORD = "agnews-wordcnn"  # the default text model


def test_manifest_entry_and_sha256() -> None:
    entry = load_manifest(ROOT / "weights")[NAME]
    assert entry.task == "text-classification" and entry.labels == ["World", "Sports", "Business", "Sci/Tech"]
    path = ROOT / "weights" / entry.file
    assert sha256_of(path) == entry.sha256 and path.stat().st_size <= 25 * 1024 * 1024
    assert (entry.model_extra or {})["encoding"]["length"] >= 64
    assert entry.card and (ROOT / "weights" / entry.card).is_file()
    assert f"{100 * entry.metrics['val_accuracy']:.2f}%" in (ROOT / "weights" / entry.card).read_text()
    # the hold-out can be rebuilt: files with their row counts, sizes and the split seed are recorded
    assert entry.training["val_rows"] == 1500 and entry.training["recipe"]["seed"] == 0
    assert len(entry.training["rows"]) == len(entry.training["data"]) == 3


def test_default_service_classifies_headlines(tmp_path: Path) -> None:
    # the embedded defaults, with stores in a temporary directory
    s = Settings(torch_home=tmp_path / "th", device="cpu", data_dir=tmp_path / "data", style_workers=0)
    with TestClient(create_app(s)) as c:
        wait_ready(c)
        r = c.post("/text/classify", json={"texts": [
            "Yankees beat Red Sox 5-3 as Jeter homers twice in the ninth inning",
            "Stocks fall as oil prices jump; Wall Street worries about corporate earnings and interest rates",
        ]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == WORD and body["weights"] == "trained"
        tops = [x["top_k"][0] for x in body["results"]]
        assert [t["label"] for t in tops] == ["Sports", "Business"]
        assert all(0.25 < t["probability"] <= 1.0 for t in tops)
        # the character-level VDCNN stays servable by name
        r = c.post("/text/classify", json={"model": NAME, "texts": ["Yankees beat Red Sox 5-3 in the ninth inning"]})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == NAME and r.json()["results"][0]["top_k"][0]["label"] == "Sports"


def test_word_model_manifest_entry_vocabulary_and_card() -> None:
    import torch

    from models.text import WordSpec
    from models.text.words import vocabulary_from_tensor, vocabulary_sha256

    entry = load_manifest(ROOT / "weights")[WORD]
    assert entry.task == "text-classification" and entry.family == "word-cnn"
    assert entry.labels == ["World", "Sports", "Business", "Sci/Tech"]
    path = ROOT / "weights" / entry.file
    assert sha256_of(path) == entry.sha256 and path.stat().st_size <= 25 * 1024 * 1024
    spec = WordSpec.from_dict((entry.model_extra or {})["encoding"])
    words = vocabulary_from_tensor(torch.load(path, weights_only=True)["vocabulary"])
    assert vocabulary_sha256(words) == spec.vocabulary_sha256 and len(words) + 2 == spec.vocab_size
    assert entry.arch["vocab_size"] == spec.vocab_size and entry.arch["buckets"] == spec.buckets
    # the same split as the VDCNN's (files, row counts, seed, size) with the near-duplicate rule
    vdcnn = load_manifest(ROOT / "weights")[NAME]
    assert entry.training["rows"] == vdcnn.training["rows"] and entry.training["recipe"]["seed"] == 0
    assert entry.training["dedup"] == "description-normalised" and entry.training["val_rows"] == 1445
    assert "inner_val" not in entry.training  # a selection run is never shipped
    assert entry.license and "non-commercial" in entry.license
    card = (ROOT / "weights" / str(entry.card)).read_text()
    assert f"{100 * entry.metrics['val_accuracy']:.2f}%" in card


@pytest.mark.shared_data
def test_word_model_accuracy_on_the_holdout(tmp_path: Path) -> None:
    """The 1,445 hold-out rows (the VDCNN's hold-out without its near-duplicates of training rows), rebuilt by
    the trainer's split and read through the service's encoder: within 2 points of the manifest."""
    s = Settings(torch_home=tmp_path / "th", device="cpu", data_dir=tmp_path / "data", style_workers=0)
    report = evaluate_text_model(WORD, None, holdout=True, batch_size=128, settings=s)
    card = load_manifest(ROOT / "weights")[WORD].metrics["val_accuracy"]
    assert report["weights"] == "trained" and report["texts"] == 1445
    assert report["holdout"]["val_rows_with_near_duplicate_in_training"] == 0
    assert abs(report["accuracy"] - card) <= 0.02, (report["accuracy"], card)


@pytest.mark.shared_data
def test_accuracy_on_the_holdout(tmp_path: Path) -> None:
    """All 1,500 rows the model was validated on (rebuilt by the trainer's split; never trained on), through the
    service's encoding: within 2 points of the card, both as validated and without the rows that have a
    near-duplicate in training (the same story under another title, which the old split let through)."""
    s = Settings(torch_home=tmp_path / "th", device="cpu", data_dir=tmp_path / "data", style_workers=0)
    report = evaluate_text_model(NAME, None, holdout=True, batch_size=128, settings=s)
    card = load_manifest(ROOT / "weights")[NAME].metrics["val_accuracy"]
    old = report["holdout_as_validated"]
    assert old["texts"] == 1500 and report["weights"] == "trained"
    assert abs(old["accuracy"] - card) <= 0.02, (old["accuracy"], card)
    near = report["holdout"]["val_rows_with_near_duplicate_in_training"]
    assert 0 < near < 100 and report["texts"] == 1500 - near
    assert abs(report["accuracy"] - card) <= 0.02, (report["accuracy"], card)
