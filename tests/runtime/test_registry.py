"""Weights resolution, manifest schema, torchvision specs and preprocessing equality."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from app.runtime.registry import (
    ModelRegistry,
    WeightsRef,
    WeightsUnavailable,
    download_weights,
    load_manifest,
    resolve_weights,
    sha256_of,
    spec_from_torchvision,
)
from models.preprocess import image_to_tensor
from models.zoo import torchvision_classifiers, torchvision_weights
from tests.conftest import ROOT, write_tiny_classifier


def make_registry(weights_dir: Path, hub: Path, *, untrained: bool = False, download: bool = False) -> ModelRegistry:
    return ModelRegistry(weights_dir, hub, torch.device("cpu"), allow_download=download, allow_untrained=untrained)


def test_present_file_with_matching_sha_loads(weights_dir: Path, tmp_path: Path) -> None:
    st = make_registry(weights_dir, tmp_path / "hub").load_classifier("tiny-cifar")
    assert st.status == "ready" and st.loaded is not None
    assert st.loaded.weights_tag == "trained" and st.loaded.weights_source == "weights_dir"
    probs = st.loaded.forward([torch.zeros(3, 32, 32), torch.ones(3, 32, 32)])
    assert len(probs) == 2 and torch.allclose(probs[0].sum(), torch.tensor(1.0))


def test_sha_mismatch_is_unavailable_not_loaded(tmp_path: Path) -> None:
    wd = tmp_path / "w"
    write_tiny_classifier(wd, corrupt_sha=True)
    st = make_registry(wd, tmp_path / "hub").load_classifier("tiny-cifar")
    assert st.status == "unavailable" and "sha256 does not match" in (st.reason or "")
    assert st.loaded is None


def test_sha_mismatch_with_untrained_allowed_is_labelled_untrained(tmp_path: Path) -> None:
    wd = tmp_path / "w"
    write_tiny_classifier(wd, corrupt_sha=True)
    st = make_registry(wd, tmp_path / "hub", untrained=True).load_classifier("tiny-cifar")
    assert st.status == "ready" and st.loaded is not None and st.loaded.weights_tag == "untrained"


def test_missing_torchvision_weights_offline(tmp_path: Path) -> None:
    st = make_registry(tmp_path / "w", tmp_path / "hub").load_classifier("resnet18")
    assert st.status == "unavailable"
    assert "resnet18-f37072fd.pth" in (st.reason or "") and "fetch-weights" in (st.reason or "")


def test_torchvision_spec_names_the_weights_it_is_built_for() -> None:
    """The registry builds torchvision models through get_model(name, weights=<these>), not weights=None."""
    spec = spec_from_torchvision("inception_v3")
    assert spec.arch == {"name": "inception_v3", "weights": "Inception_V3_Weights.IMAGENET1K_V1"}
    assert spec.source == "torchvision Inception_V3_Weights.IMAGENET1K_V1"


def _torchvision_manifest_entry(weights_dir: Path, labels: list[str]) -> None:
    """A manifest entry serving squeezenet1_1 from a project file, built as torchvision builds it with weights."""
    import torchvision

    weights_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    path = weights_dir / "squeeze.pt"
    torch.save(torchvision.models.squeezenet1_1().state_dict(), path)
    entry = {"name": "squeeze", "task": "image-classification", "family": "torchvision",
             "arch": {"name": "squeezenet1_1", "weights": "SqueezeNet1_1_Weights.IMAGENET1K_V1"},
             "file": path.name, "sha256": sha256_of(path), "labels": labels,
             "preprocessing": {"resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406],
                               "std": [0.229, 0.224, 0.225]}}
    (weights_dir / "manifest.json").write_text(json.dumps({"models": [entry]}))


def test_manifest_torchvision_entry_with_weights_is_built_by_torchvision(tmp_path: Path) -> None:
    wd = tmp_path / "w"
    _torchvision_manifest_entry(wd, [f"c{i}" for i in range(1000)])
    st = make_registry(wd, tmp_path / "hub").load_classifier("squeeze", warmup=False)
    assert st.status == "ready" and st.loaded is not None and st.loaded.weights_tag == "trained"
    _torchvision_manifest_entry(wd, ["a", "b", "c"])  # torchvision's builder makes 1000 outputs: refused
    st = make_registry(wd, tmp_path / "hub").load_classifier("squeeze", warmup=False)
    assert st.status == "failed" and "1000 categories, not 3" in (st.reason or "")


def test_untrained_allowed_builds_random_model(tmp_path: Path) -> None:
    st = make_registry(tmp_path / "w", tmp_path / "hub", untrained=True).load_classifier("resnet18")
    assert st.status == "ready" and st.loaded is not None
    assert st.loaded.weights_tag == "untrained" and st.loaded.weights_source == "untrained"
    assert len(st.loaded.spec.labels) == 1000


def test_unknown_model_fails_clearly(tmp_path: Path) -> None:
    st = make_registry(tmp_path / "w", tmp_path / "hub").load_classifier("no-such-net")
    assert st.status == "failed" and "unknown model" in (st.reason or "")


def test_hub_cache_with_torchvision_file_name_and_hash_prefix(tmp_path: Path) -> None:
    """A file in the hub cache under torchvision's name is used when its sha256 starts with the name's prefix."""
    hub = tmp_path / "hub"
    hub.mkdir()
    spec = spec_from_torchvision("squeezenet1_1")
    from models.zoo import build_classifier

    m = build_classifier("torchvision", {"name": "squeezenet1_1"}, 1000)
    tmp = tmp_path / "sq.pth"
    torch.save(m.state_dict(), tmp)
    digest = sha256_of(tmp)
    # craft a ref whose file name carries the real prefix of our file, as torchvision's names do
    ref = WeightsRef(f"squeezenet1_1-{digest[:8]}.pth", hash_prefix=digest[:8])
    shutil.copy(tmp, hub / ref.file_name)
    got = resolve_weights(ref, tmp_path / "w", hub, allow_download=False)
    assert got.source == "hub_cache"
    bad = WeightsRef(f"squeezenet1_1-{'0' * 8}.pth", hash_prefix="0" * 8)
    shutil.copy(tmp, hub / bad.file_name)
    with pytest.raises(WeightsUnavailable, match="does not match") as err:
        resolve_weights(bad, tmp_path / "w", hub, allow_download=False)
    # the damaged copy is named, and the message does not also call the file "not found"
    assert "no verified copy of" in str(err.value) and "not found" not in str(err.value)
    with pytest.raises(WeightsUnavailable, match="not found"):
        resolve_weights(WeightsRef("absent-00000000.pth", hash_prefix="0" * 8), tmp_path / "w", hub,
                        allow_download=False)
    assert spec.weights.hash_prefix and spec.weights.file_name.startswith("squeezenet1_1-")


def test_download_fails_fast_when_unreachable(tmp_path: Path) -> None:
    # port 9 on loopback refuses at once: the same path an offline machine takes, without waiting for DNS
    ref = WeightsRef("x-12345678.pth", hash_prefix="12345678", url="http://127.0.0.1:9/x-12345678.pth")
    t0 = time.monotonic()
    with pytest.raises(WeightsUnavailable, match="cannot reach"):
        download_weights(ref, tmp_path, progress=False)
    assert time.monotonic() - t0 < 10
    assert not (tmp_path / ref.file_name).exists()
    with pytest.raises(WeightsUnavailable, match="cannot reach"):
        resolve_weights(ref, tmp_path / "w", tmp_path, allow_download=True)


def test_manifest_rejects_bad_entries(tmp_path: Path) -> None:
    wd = tmp_path / "w"
    write_tiny_classifier(wd)
    data = json.loads((wd / "manifest.json").read_text())
    data["models"][0]["sha256"] = "xyz"
    (wd / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(RuntimeError, match="invalid manifest"):
        load_manifest(wd)


def test_shipped_manifest_is_valid_and_files_match() -> None:
    """Every model registered in weights/manifest.json validates, exists, matches its sha256 and loads."""
    wd = ROOT / "weights"
    manifest = load_manifest(wd)
    for name, entry in manifest.items():
        path = wd / entry.file
        assert path.is_file(), f"{name}: {path} missing"
        assert path.stat().st_size <= 25 * 1024 * 1024
        assert sha256_of(path) == entry.sha256, name
        if entry.task == "image-classification":
            st = make_registry(wd, wd / "no-hub").load_classifier(name, warmup=False)
            assert st.status == "ready", st.reason
            assert st.loaded is not None and st.loaded.weights_tag == "trained"


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0", "convnext_tiny", "vit_b_16", "inception_v3"])
def test_preprocessing_equals_torchvision_transforms(name: str) -> None:
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    spec = torchvision_weights(name).preprocessing
    img = Image.new("RGB", (301, 217))
    img.putdata([((x * 7) % 256, (y * 3) % 256, (x + y) % 256) for y in range(217) for x in range(301)])
    ours = image_to_tensor(img, spec)
    theirs = weights.transforms()(img)
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_torchvision_registry_covers_classification_models() -> None:
    names = torchvision_classifiers()
    for n in ("resnet50", "densenet121", "resnext50_32x4d", "wide_resnet50_2", "vgg16_bn", "efficientnet_b0",
              "convnext_tiny", "googlenet"):
        assert n in names
        tw = torchvision_weights(n)
        assert len(tw.labels) == 1000 and tw.file_name.endswith(".pth") and len(tw.hash_prefix) >= 6


def test_densenet_old_keys_are_renamed() -> None:
    from models.zoo import build_classifier, fix_torchvision_state_dict

    m = build_classifier("torchvision", {"name": "densenet121"}, 1000)
    sd = m.state_dict()
    # torchvision's published DenseNet files use "norm.1.weight" for "norm1.weight" and carry no
    # num_batches_tracked (batch norm fills it in for such old state dicts)
    old = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v for k, v in sd.items()
           if not k.endswith("num_batches_tracked")}
    assert old.keys() != sd.keys()
    fixed = fix_torchvision_state_dict("densenet121", old)
    m.load_state_dict(fixed)


def test_hflip_test_time_augmentation_averages_the_mirror(tmp_path: Path) -> None:
    wd = tmp_path / "w"
    write_tiny_classifier(wd)
    plain = make_registry(wd, tmp_path / "hub").load_classifier("tiny-cifar", warmup=False).loaded
    data = json.loads((wd / "manifest.json").read_text())
    data["models"][0]["test_time_augmentation"] = "hflip"
    (wd / "manifest.json").write_text(json.dumps(data))
    tta = make_registry(wd, tmp_path / "hub").load_classifier("tiny-cifar", warmup=False).loaded
    assert plain is not None and tta is not None
    x = torch.rand(3, 32, 32)
    expected = (plain.forward([x])[0] + plain.forward([x.flip(-1)])[0]) / 2
    got = tta.forward([x, torch.rand(3, 32, 32)])
    assert torch.allclose(got[0], expected, atol=1e-6) and len(got) == 2
    # six views: also shifted by one pixel up-left and down-right (edges reflected), the shifted ones weigh half
    data["models"][0]["test_time_augmentation"] = "hflip-translate"
    (wd / "manifest.json").write_text(json.dumps(data))
    six = make_registry(wd, tmp_path / "hub").load_classifier("tiny-cifar", warmup=False).loaded
    assert six is not None
    padded = torch.nn.functional.pad(x[None], (1, 1, 1, 1), mode="reflect")[0]
    shifted = [padded[:, :32, :32], padded[:, 2:, 2:]]
    views = [x, x.flip(-1)] + [v for s in shifted for v in (s, s.flip(-1))]
    p = [plain.forward([v])[0] for v in views]
    expected6 = (p[0] + p[1]) / 4 + (p[2] + p[3] + p[4] + p[5]) / 8
    got6 = six.forward([torch.rand(3, 32, 32), x])
    assert torch.allclose(got6[1], expected6, atol=1e-6) and not torch.allclose(got6[1], expected, atol=1e-4)
    data["models"][0]["test_time_augmentation"] = "rotate"
    (wd / "manifest.json").write_text(json.dumps(data))
    st = make_registry(wd, tmp_path / "hub").load_classifier("tiny-cifar", warmup=False)
    assert st.status == "failed" and "test_time_augmentation" in (st.reason or "") and "hflip-translate" in st.reason
