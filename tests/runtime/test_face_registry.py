"""Face embedders in the registry: the manifest contract, the PyTorch loader and the ONNX adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.runtime.registry import LoadedFaceEmbedder, LoadedOnnxFaceEmbedder, ModelRegistry, load_manifest
from models.faces.net import FaceEmbedder
from models.train.common import sha256_file
from tests.conftest import ROOT, write_tiny_face_model


def registry(weights: Path, tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(weights, tmp_path / "hub", torch.device("cpu"), allow_download=False, allow_untrained=False)


def test_loads_a_face_embedder_with_its_threshold_and_crop(tmp_path: Path) -> None:
    w = tmp_path / "w"
    write_tiny_face_model(w, threshold=0.9)
    st = registry(w, tmp_path).load("tiny-face", "face-embedding")
    assert st.status == "ready", st.reason
    m = st.loaded
    assert isinstance(m, LoadedFaceEmbedder)
    assert m.threshold == 0.9 and m.crop_size == 16 and m.crop_margin == 0.1 and m.dim == 8 and m.flip_average
    assert m.sha256 == json.loads((w / "manifest.json").read_text())["models"][0]["sha256"]
    out = m.forward([torch.randn(3, 16, 16), torch.randn(3, 16, 16)])
    assert len(out) == 2 and all(abs(float(e.norm()) - 1) < 1e-5 for e in out)


@pytest.mark.parametrize("threshold", [None, 0, 4.5, "x"])
def test_a_face_embedder_needs_a_calibrated_threshold(tmp_path: Path, threshold: object) -> None:
    w = tmp_path / "w"
    write_tiny_face_model(w)
    manifest = json.loads((w / "manifest.json").read_text())
    if threshold is None:
        del manifest["models"][0]["threshold"]
    else:
        manifest["models"][0]["threshold"] = threshold
    (w / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RuntimeError, match="threshold"):
        load_manifest(w)


def test_onnx_adapter_gives_the_same_embeddings(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from models.train.faces import export_onnx

    w = tmp_path / "w"
    write_tiny_face_model(w)
    manifest = json.loads((w / "manifest.json").read_text())
    entry = manifest["models"][0]
    model = FaceEmbedder(16, 8, (8, 8), (1, 1))
    model.load_state_dict(torch.load(w / entry["file"], weights_only=True))
    export_onnx(model, w / "tiny-face.onnx", 16)
    onnx_entry = {**entry, "name": "tiny-face-onnx", "family": "onnx", "file": "tiny-face.onnx",
                  "sha256": sha256_file(w / "tiny-face.onnx")}
    del onnx_entry["arch"]
    manifest["models"].append(onnx_entry)
    (w / "manifest.json").write_text(json.dumps(manifest))
    reg = registry(w, tmp_path)
    ref = reg.load("tiny-face", "face-embedding").loaded
    st = reg.load("tiny-face-onnx", "face-embedding")
    assert st.status == "ready", st.reason
    assert isinstance(st.loaded, LoadedOnnxFaceEmbedder) and st.loaded.sha256 == onnx_entry["sha256"]
    torch.manual_seed(3)
    batch = [torch.randn(3, 16, 16) for _ in range(5)]
    a = torch.stack(ref.forward(batch))  # type: ignore[union-attr]
    b = torch.stack(st.loaded.forward(batch))
    assert float(torch.nn.functional.cosine_similarity(a, b).min()) > 0.999


def test_missing_onnx_file_is_unavailable_even_when_untrained_is_allowed(tmp_path: Path) -> None:
    w = tmp_path / "w"
    write_tiny_face_model(w)
    manifest = json.loads((w / "manifest.json").read_text())
    manifest["models"].append({**manifest["models"][0], "name": "gone", "family": "onnx", "file": "gone.onnx"})
    (w / "manifest.json").write_text(json.dumps(manifest))
    reg = ModelRegistry(w, tmp_path / "hub", torch.device("cpu"), allow_download=False, allow_untrained=True)
    st = reg.load("gone", "face-embedding")
    assert st.status == "unavailable" and "gone.onnx" in (st.reason or "")


@pytest.mark.skipif(not (ROOT / "weights" / "lfw-face-resnet.pt").exists(), reason="shipped face model not built")
def test_shipped_face_model_and_its_onnx_export_match(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    reg = registry(ROOT / "weights", tmp_path)
    torch_model = reg.load("lfw-face-resnet", "face-embedding")
    onnx_model = reg.load("lfw-face-resnet-onnx", "face-embedding")
    assert torch_model.status == "ready" and onnx_model.status == "ready", (torch_model.reason, onnx_model.reason)
    torch.manual_seed(0)
    batch = [torch.randn(3, 64, 64) for _ in range(8)]
    a = torch.stack(torch_model.loaded.forward(batch))  # type: ignore[union-attr]
    b = torch.stack(onnx_model.loaded.forward(batch))  # type: ignore[union-attr]
    assert float(torch.nn.functional.cosine_similarity(a, b).min()) > 0.999
