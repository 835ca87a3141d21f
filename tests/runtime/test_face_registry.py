"""Face embedders in the registry: the manifest contract, the PyTorch loader and the ONNX adapter."""

from __future__ import annotations

import json
import sys
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


def _tiny_onnx(path: Path, *, dynamic_tail: bool = False) -> None:
    """A small conv net exported to ONNX (6 outputs); with dynamic_tail its output is the flattened feature map of
    an input of any size, so the output's second dimension is symbolic in the file."""
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Conv2d(3, 6, 3), torch.nn.ReLU()]
    layers += [torch.nn.Flatten()] if dynamic_tail else [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()]
    axes = ({"x": {0: "n", 2: "h", 3: "w"}, "y": {0: "n", 1: "k"}} if dynamic_tail
            else {"x": {0: "n"}, "y": {0: "n"}})
    torch.onnx.export(torch.nn.Sequential(*layers), (torch.zeros(1, 3, 12, 12),), str(path), dynamo=False,
                      input_names=["x"], output_names=["y"], dynamic_axes=axes, opset_version=17)


@pytest.mark.parametrize("dynamic_tail", [False, True])
def test_onnx_module_answers_what_onnxruntime_answers_for_any_memory_layout(tmp_path: Path,
                                                                           dynamic_tail: bool) -> None:
    """The batch goes to onnxruntime through an I/O binding (a pointer to torch's memory, the output written into
    a torch tensor) when the output shape is known, else through session.run: both must read a channels_last or
    sliced batch as NCHW."""
    ort = pytest.importorskip("onnxruntime")
    from app.runtime.registry import OnnxModule

    path = tmp_path / "tiny.onnx"
    _tiny_onnx(path, dynamic_tail=dynamic_tail)
    module = OnnxModule(path, torch.device("cpu"))
    assert module.device == torch.device("cpu")
    assert module.output_tail == (None if dynamic_tail else [6])
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    torch.manual_seed(1)
    base = torch.randn(5, 3, 12, 12)
    width = 6 * 10 * 10 if dynamic_tail else 6
    for x in (base, base.to(memory_format=torch.channels_last), torch.randn(5, 3, 12, 24)[..., ::2]):
        want = torch.from_numpy(ref.run(None, {"x": x.contiguous().numpy()})[0])
        got = module(x)
        assert got.shape == (5, width) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert module(torch.randn(1, 3, 12, 12)).shape == (1, width)  # the batch size changes between calls


def test_an_onnx_model_without_onnxruntime_fails_to_load_and_names_the_extras(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime is an optional extra (onnx / onnx-gpu): without it the ONNX model is "failed" with the way to get
    it, and the PyTorch embedders load as before."""
    w = tmp_path / "w"
    write_tiny_face_model(w)
    manifest = json.loads((w / "manifest.json").read_text())
    _tiny_onnx(w / "tiny.onnx")
    entry = {**manifest["models"][0], "name": "tiny-onnx", "family": "onnx", "file": "tiny.onnx",
             "sha256": sha256_file(w / "tiny.onnx")}
    del entry["arch"]
    manifest["models"].append(entry)
    (w / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    reg = registry(w, tmp_path)
    st = reg.load("tiny-onnx", "face-embedding")
    assert st.status == "failed"
    assert "onnxruntime" in (st.reason or "") and "cnn-apps[onnx]" in (st.reason or "") and \
        "cnn-apps[onnx-gpu]" in (st.reason or "")
    assert reg.load("tiny-face", "face-embedding").status == "ready"


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
