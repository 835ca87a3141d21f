"""The probability-averaging ensemble: the module, its manifest family and the command that builds it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app import cli
from app.runtime.registry import ModelRegistry, load_manifest
from models.cifar_resnet import cifar_resnet
from models.ensemble import ProbabilityEnsemble, cifar_resnet_ensemble
from models.train import ensemble as train_ensemble
from models.train import images as train_images
from models.zoo import build_classifier
from tests.models.test_train_images import make_folder


def test_softmax_of_the_output_is_the_weighted_mean_of_the_members_probabilities() -> None:
    torch.manual_seed(0)
    a, b = cifar_resnet(8, 5).eval(), cifar_resnet(14, 5).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        pa, pb = a(x).softmax(-1), b(x).softmax(-1)
        equal = ProbabilityEnsemble([a, b]).eval()(x).softmax(-1)
        weighted = ProbabilityEnsemble([a, b], [3.0, 1.0]).eval()(x).softmax(-1)
    torch.testing.assert_close(equal, (pa + pb) / 2)
    torch.testing.assert_close(weighted, 0.75 * pa + 0.25 * pb)
    assert not torch.allclose(equal, pa)


def test_bad_ensembles_are_rejected() -> None:
    with pytest.raises(ValueError, match="at least one member"):
        ProbabilityEnsemble([])
    with pytest.raises(ValueError, match="one positive number per member"):
        ProbabilityEnsemble([cifar_resnet(8)], [1.0, 2.0])
    with pytest.raises(ValueError, match="one positive number per member"):
        ProbabilityEnsemble([cifar_resnet(8)], [0.0])
    with pytest.raises(ValueError, match="members"):
        build_classifier("cifar-resnet-ensemble", {"members": []}, 10)


def test_manifest_family_builds_members_with_prefixed_state_dict_keys() -> None:
    m = build_classifier("cifar-resnet-ensemble", {"members": [{"depth": 8}, {"depth": 14, "shortcut": "B"}]}, 3)
    keys = m.state_dict().keys()
    assert "members.0.fc.weight" in keys and "members.1.fc.weight" in keys
    assert any(k.startswith("members.1.") and ".shortcut.0.weight" in k for k in keys)  # option B projection
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def _train_member(data: Path, tmp: Path, weights: Path, name: str, depth: int, seed: int = 0) -> dict:  # type: ignore[type-arg]
    return train_images.main(["--data", str(data), "--out", str(tmp / name), "--name", name, "--depth", str(depth),
                              "--epochs", "2", "--batch-size", "8", "--val-size", "9", "--seed", str(seed),
                              "--cache", str(tmp / "cache"), "--install", str(weights), "--threads", "1"])


def test_ensemble_command_builds_validates_and_installs_a_servable_model(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", per_class=10)
    weights = tmp_path / "weights"
    ra = _train_member(data, tmp_path, weights, "tiny-a", 8)
    rb = _train_member(data, tmp_path, weights, "tiny-b", 14)
    out = tmp_path / "ens"
    report = train_ensemble.main(["--name", "tiny-ens", "--members", "tiny-a", "tiny-b", "--weights-dir",
                                  str(weights), "--out", str(out), "--cache", str(tmp_path / "cache"),
                                  "--threads", "1", "--install", str(weights)])
    # the members are re-measured on the hold-out they were validated on when trained: same numbers
    assert report["members"]["tiny-a"]["val_accuracy"] == ra["val_accuracy"]
    assert report["members"]["tiny-b"]["val_accuracy_hflip_tta"] == rb["val_accuracy_hflip_tta"]
    assert report["val_size"] == 9 and sum(map(sum, report["confusion_matrix"])) == 9
    for f in ("tiny-ens.pt", "report.md", "report.json", "confusion.png", "manifest_entry.json"):
        assert (out / f).is_file(), f

    entry = load_manifest(weights)["tiny-ens"]
    assert entry.family == "cifar-resnet-ensemble" and entry.labels == ["alpha", "beta", "gamma"]
    assert [m["name"] for m in entry.training["members"]] == ["tiny-a", "tiny-b"]
    assert entry.metrics["val_accuracy"] == round(report["val_accuracy"], 4)

    reg = ModelRegistry(weights, tmp_path / "hub", torch.device("cpu"), allow_download=False, allow_untrained=False)
    ens, a, b = (reg.load_classifier(n) for n in ("tiny-ens", "tiny-a", "tiny-b"))
    assert ens.status == "ready" and ens.loaded is not None and ens.loaded.weights_tag == "trained"
    assert a.loaded is not None and b.loaded is not None
    x = [torch.randn(3, 32, 32) for _ in range(3)]
    expected = [(pa + pb) / 2 for pa, pb in zip(a.loaded.forward(x), b.loaded.forward(x), strict=True)]
    for got, want in zip(ens.loaded.forward(x), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_members_that_cannot_share_a_hold_out_are_refused(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", per_class=6)
    weights = tmp_path / "weights"
    _train_member(data, tmp_path, weights, "tiny-a", 8)
    _train_member(data, tmp_path, weights, "tiny-s", 8, seed=1)
    manifest = load_manifest(weights)
    # another split seed: other training images, so other normalisation statistics, and another hold-out
    with pytest.raises(train_ensemble.EnsembleError, match="different preprocessing"):
        train_ensemble.check_members(manifest, ["tiny-a", "tiny-s"])
    raw = json.loads((weights / "manifest.json").read_text())
    pre_a = next(m["preprocessing"] for m in raw["models"] if m["name"] == "tiny-a")
    for m in raw["models"]:
        if m["name"] == "tiny-s":
            m["preprocessing"] = pre_a
    (weights / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(train_ensemble.EnsembleError, match="split seeds"):
        train_ensemble.check_members(load_manifest(weights), ["tiny-a", "tiny-s"])
    with pytest.raises(train_ensemble.EnsembleError, match="at least two"):
        train_ensemble.check_members(manifest, ["tiny-a"])
    with pytest.raises(train_ensemble.EnsembleError, match="not in the manifest: nope"):
        train_ensemble.check_members(manifest, ["tiny-a", "nope"])
    raw = json.loads((weights / "manifest.json").read_text())
    for m in raw["models"]:
        if m["name"] == "tiny-s":
            m["training"]["recipe"]["seed"] = 0
            m["labels"] = ["a", "b", "c"]
    (weights / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(train_ensemble.EnsembleError, match="different labels"):
        train_ensemble.check_members(load_manifest(weights), ["tiny-a", "tiny-s"])
    with pytest.raises(SystemExit, match=r"ensemble: .*different labels"):  # through the service's CLI
        cli.main(["train", "ensemble", "--name", "x", "--members", "tiny-a", "tiny-s", "--weights-dir", str(weights),
                  "--out", str(tmp_path / "x")])


def test_untrained_ensemble_module_matches_arch_of_shipped_form() -> None:
    ens = cifar_resnet_ensemble({"members": [{"depth": 20}, {"depth": 32}]}, 10)
    assert sum(p.numel() for p in ens.parameters()) == 269_722 + 464_154


def test_ensemble_of_se_wide_resnet_and_whitened_members(tmp_path: Path) -> None:
    """Members of the SE-ResNet, wide-ResNet and whitened-convnet families (the last with float16 weights and its
    frozen whitening filters) combine like ResNets; their families are recorded in the ensemble's arch, the loaded
    ensemble gives the mean of the members' probabilities, and members that left out different test splits (so had
    different hold-outs) are refused."""
    data = make_folder(tmp_path / "data", per_class=10)
    weights = tmp_path / "weights"
    common = ["--data", str(data), "--epochs", "1", "--batch-size", "8", "--val-size", "6", "--threads", "1",
              "--cache", str(tmp_path / "cache"), "--install", str(weights)]
    train_images.main([*common, "--out", str(tmp_path / "se"), "--name", "tiny-se", "--family", "cifar-se-resnet",
                       "--depth", "8", "--se-reduction", "4"])
    train_images.main([*common, "--out", str(tmp_path / "wrn"), "--name", "tiny-wrn", "--family",
                       "cifar-wide-resnet", "--depth", "10", "--width", "1"])
    train_images.main([*common, "--out", str(tmp_path / "wh"), "--name", "tiny-wh", "--family",
                       "cifar-whitened-convnet", "--widths", "8", "8", "8", "--save-dtype", "float16"])
    report = train_ensemble.main(["--name", "tiny-mix", "--members", "tiny-se", "tiny-wrn", "tiny-wh", "--weights-dir",
                                  str(weights), "--out", str(tmp_path / "ens"), "--cache", str(tmp_path / "cache"),
                                  "--threads", "1", "--install", str(weights)])
    assert report["val_size"] == 6
    entry = load_manifest(weights)["tiny-mix"]
    assert [m.get("family") for m in entry.arch["members"]] == ["cifar-se-resnet", "cifar-wide-resnet",
                                                                "cifar-whitened-convnet"]
    assert entry.training["test_split"] == load_manifest(weights)["tiny-se"].training["test_split"]
    reg = ModelRegistry(weights, tmp_path / "hub", torch.device("cpu"), allow_download=False, allow_untrained=False)
    st = reg.load_classifier("tiny-mix")
    assert st.status == "ready" and st.loaded is not None and st.loaded.weights_tag == "trained"
    members = [reg.load_classifier(n).loaded for n in ("tiny-se", "tiny-wrn", "tiny-wh")]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = torch.stack([m.model.float()(x).softmax(1) for m in members if m is not None]).mean(0)
        assert torch.allclose(st.loaded.model.float()(x).softmax(1), expected, atol=1e-5)

    train_images.main([*common, "--out", str(tmp_path / "other"), "--name", "tiny-other", "--depth", "8",
                       "--test-fraction", "0.2"])
    raw = json.loads((weights / "manifest.json").read_text())
    pre = next(m["preprocessing"] for m in raw["models"] if m["name"] == "tiny-se")
    for m in raw["models"]:
        if m["name"] == "tiny-other":
            m["preprocessing"], m["training"]["val_images"] = pre, 6
    (weights / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(train_ensemble.EnsembleError, match="different 'test_split'"):
        train_ensemble.check_members(load_manifest(weights), ["tiny-se", "tiny-other"])
