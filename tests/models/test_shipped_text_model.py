"""The shipped AG News text model: manifest, sha256, real accuracy, served by default without flags."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.cli import evaluate_text_model
from app.main import create_app
from app.runtime.registry import load_manifest, sha256_of
from app.settings import Settings
from tests.conftest import ROOT, SHARED_DATA, wait_ready

NAME = "agnews-vdcnn9"


def test_manifest_entry_and_sha256() -> None:
    entry = load_manifest(ROOT / "weights")[NAME]
    assert entry.task == "text-classification" and entry.labels == ["World", "Sports", "Business", "Sci/Tech"]
    path = ROOT / "weights" / entry.file
    assert sha256_of(path) == entry.sha256 and path.stat().st_size <= 25 * 1024 * 1024
    assert (entry.model_extra or {})["encoding"]["length"] >= 64
    assert entry.card and (ROOT / "weights" / entry.card).is_file()


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
        assert body["model"] == NAME and body["weights"] == "trained"
        tops = [x["top_k"][0] for x in body["results"]]
        assert [t["label"] for t in tops] == ["Sports", "Business"]
        assert all(0.25 < t["probability"] <= 1.0 for t in tops)


@pytest.mark.shared_data
def test_accuracy_on_200_rows_of_the_training_csv(tmp_path: Path) -> None:
    s = Settings(torch_home=tmp_path / "th", device="cpu", data_dir=tmp_path / "data", style_workers=0)
    report = evaluate_text_model(NAME, SHARED_DATA / "agnews" / "train.csv", limit=200, settings=s)
    assert report["texts"] == 200 and report["accuracy"] > 0.7, report  # chance is 0.25
