"""The face training command end to end on a tiny generated LFW-style tree (one epoch, tiny network)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.runtime.registry import LoadedFaceEmbedder, ModelRegistry, load_manifest
from models.train import faces as train_faces


def make_tree(root: Path, people: int = 12, per_person: int = 3) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    names = [f"Person_{i:02d}" for i in range(people)]
    for n in names:
        base = rng.integers(0, 256, (1, 1, 3))
        for j in range(1, per_person + 1):
            (root / n).mkdir(parents=True, exist_ok=True)
            arr = np.clip(base + rng.normal(0, 40, (60, 60, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / n / f"{n}_{j:04d}.jpg")
    # pairs over the first six people (held out: fewer than 5 images each), same and different
    lines = ["4 4"]
    lines += [f"{names[i]}\t1\t2" for i in range(4)]
    lines += [f"{names[i]}\t1\t{names[i + 1]}\t2" for i in range(4)]
    pairs = root.parent / "pairs.txt"
    pairs.write_text("\n".join(lines) + "\n")
    return root, pairs


@pytest.mark.parametrize("onnx", [True, False])
def test_train_faces_end_to_end(tmp_path: Path, onnx: bool) -> None:
    if onnx:
        pytest.importorskip("onnx")
        pytest.importorskip("onnxruntime")
    data, pairs = make_tree(tmp_path / "lfw")
    out = tmp_path / "run"
    weights = tmp_path / "weights"
    argv = ["--data", str(data), "--pairs", str(pairs), "--out", str(out), "--name", "tiny-lfw", "--epochs", "1",
            "--steps-per-epoch", "2", "--p", "3", "--k", "2", "--size", "16", "--dim", "8", "--widths", "8,8",
            "--blocks", "1,1", "--threads", "1", "--cache", str(tmp_path / "cache"), "--install", str(weights)]
    report = train_faces.main(argv + ([] if onnx else ["--no-onnx"]))
    # validation pairs are exactly those whose people were all held out of training (people 0-4 here)
    assert report["held_out_pairs"] == 8 and report["train_identities"] == 7
    kfold = report["validation"]["kfold_accuracy"]
    assert kfold["mean"] == pytest.approx(sum(kfold["per_fold"]) / len(kfold["per_fold"]))
    assert (out / "roc.png").stat().st_size > 0 and (out / "report.md").exists()
    assert len((out / "log.jsonl").read_text().splitlines()) == 1
    manifest = load_manifest(weights)
    entry = manifest["tiny-lfw"]
    assert entry.task == "face-embedding" and 0 < (entry.model_extra or {})["threshold"] < 4
    assert (entry.model_extra or {})["face_crop"] == {"size": 16, "margin": 0.1}
    assert ("tiny-lfw-onnx" in manifest) == onnx
    reg = ModelRegistry(weights, tmp_path / "hub", torch.device("cpu"), allow_download=False, allow_untrained=False)
    for name in ["tiny-lfw", *(["tiny-lfw-onnx"] if onnx else [])]:
        st = reg.load(name, "face-embedding")
        assert st.status == "ready", st.reason
        assert isinstance(st.loaded, LoadedFaceEmbedder)
    if onnx:
        x = [torch.randn(3, 16, 16) for _ in range(4)]
        a = torch.stack(reg.states["tiny-lfw"].loaded.forward(x))  # type: ignore[union-attr]
        b = torch.stack(reg.states["tiny-lfw-onnx"].loaded.forward(x))  # type: ignore[union-attr]
        assert float(torch.nn.functional.cosine_similarity(a, b).min()) > 0.999
        assert report["onnx"]["min_cosine"] > 0.999
    # rerunning the same command resumes from the checkpoint: no new epoch, same weights
    before = torch.load(out / "tiny-lfw.pt", weights_only=True)
    train_faces.main([*argv, "--no-onnx"])
    assert len((out / "log.jsonl").read_text().splitlines()) == 1
    after = torch.load(out / "tiny-lfw.pt", weights_only=True)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((out / "manifest_entry.json").read_text())["name"] == "tiny-lfw"
