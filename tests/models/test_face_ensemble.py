"""Face ensembles: the embedding arithmetic (distance = mean of the members' distances), the per-member input
re-normalisation, composing one from a manifest (refusals included), serving it through the registry and ONNX."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from app.runtime.registry import LoadedFaceEmbedder, ModelRegistry
from models.faces.ensemble import FaceEnsemble, build_face_ensemble
from models.faces.net import FaceEmbedder
from models.train.face_ensemble import FaceEnsembleError, compose, main
from models.train.faces import install
from tests.conftest import write_tiny_face_model


def tiny(seed: int) -> FaceEmbedder:
    torch.manual_seed(seed)
    m = FaceEmbedder(16, 8, (8, 8), (1, 1))
    m.train()
    m(torch.randn(8, 3, 16, 16))  # non-trivial batch-norm statistics
    return m.eval()


def flip_avg(m: FaceEmbedder, x: torch.Tensor) -> torch.Tensor:
    return F.normalize(m(x) + m(x.flip(-1)), dim=-1)


def test_ensemble_distance_is_the_mean_of_the_members_distances() -> None:
    a, b = tiny(0), tiny(1)
    stats = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    ens = FaceEnsemble([a, b], *stats, member_stats=[stats, stats]).eval()
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        e = ens(x)
        ea, eb = flip_avg(a, x), flip_avg(b, x)
    assert e.shape == (6, 16)
    assert torch.allclose(e.norm(dim=-1), torch.ones(6), atol=1e-5)
    d = torch.cdist(e, e).pow(2)
    expected = (torch.cdist(ea, ea).pow(2) + torch.cdist(eb, eb).pow(2)) / 2
    assert torch.allclose(d, expected, atol=1e-5)
    assert torch.allclose(e, torch.cat([ea, eb], -1) / 2 ** 0.5, atol=1e-6)


def test_each_member_sees_its_own_normalisation() -> None:
    a, b = tiny(0), tiny(1)
    e_mean, e_std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.2)
    b_mean, b_std = (0.45, 0.42, 0.35), (0.3, 0.21, 0.19)
    ens = FaceEnsemble([a, b], e_mean, e_std, member_stats=[(e_mean, e_std), (b_mean, b_std)],
                       flip_average=False).eval()
    x01 = torch.rand(4, 3, 16, 16)

    def norm(x: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
        return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)

    with torch.no_grad():
        got = ens(norm(x01, e_mean, e_std))
        want = torch.cat([a(norm(x01, e_mean, e_std)), b(norm(x01, b_mean, b_std))], -1) / 2 ** 0.5
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("arch, needle", [
    ({"members": [], "mean": [0, 0, 0], "std": [1, 1, 1]}, "at least two"),
    ({"members": [{"arch": {"size": 16}, "mean": [0] * 3, "std": [1] * 3}] * 2, "mean": [0, 0], "std": [1] * 3},
     "'mean'"),
    ({"members": [{"arch": {"size": 16}, "mean": [0] * 3}] * 2, "mean": [0] * 3, "std": [1] * 3},
     "exactly 'arch'"),
    ({"members": [{"arch": {"size": 16, "widths": [8, 8], "blocks": [1, 1]}, "mean": [0] * 3, "std": [1] * 3},
                  {"arch": {"size": 32, "widths": [8, 8], "blocks": [1, 1]}, "mean": [0] * 3, "std": [1] * 3}],
      "mean": [0] * 3, "std": [1] * 3}, "different input sizes"),
    ({"members": [], "mean": [0] * 3, "std": [1] * 3, "extra": 1}, "unknown face ensemble arch keys"),
])
def test_bad_ensemble_archs_are_refused(arch: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        build_face_ensemble(arch)


def two_members(w: Path) -> None:
    write_tiny_face_model(w, "face-a", threshold=0.8, seed=0)
    write_tiny_face_model(w, "face-b", threshold=1.2, seed=1)


def test_composed_ensemble_serves_through_the_registry_and_onnx(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    w, out = tmp_path / "w", tmp_path / "run"
    two_members(w)
    entry = compose(["face-a", "face-b"], w, out, "face-ab")
    assert entry["family"] == "face-ensemble" and entry["embedding"]["dim"] == 16
    assert entry["embedding"]["flip_average"] is False  # flipped inside, per member: the service must not flip again
    assert entry["threshold"] == pytest.approx(1.0)  # mean of 0.8 and 1.2, until calibrated
    assert entry["onnx"]["min_cosine_to_pytorch"] > 0.9999
    install(out, w)
    names = [m["name"] for m in json.loads((w / "manifest.json").read_text())["models"]]
    assert names == ["face-a", "face-b", "face-ab", "face-ab-onnx"]
    reg = ModelRegistry(w, tmp_path / "hub", torch.device("cpu"), allow_download=False, allow_untrained=False)
    served = {}
    for name in ("face-a", "face-b", "face-ab", "face-ab-onnx"):
        st = reg.load(name, "face-embedding")
        assert st.status == "ready", st.reason
        served[name] = st.loaded
    ab = served["face-ab"]
    assert isinstance(ab, LoadedFaceEmbedder) and ab.dim == 16 and not ab.flip_average
    torch.manual_seed(5)
    crops = [torch.randn(3, 16, 16) for _ in range(4)]
    e = torch.stack(ab.forward(crops))
    ea = torch.stack(served["face-a"].forward(crops))  # the members as served alone (flip-averaged)
    eb = torch.stack(served["face-b"].forward(crops))
    assert torch.allclose(e, torch.cat([ea, eb], -1) / 2 ** 0.5, atol=1e-5)
    eo = torch.stack(served["face-ab-onnx"].forward(crops))
    assert float(F.cosine_similarity(e, eo).min()) > 0.9999


def test_members_that_cannot_share_a_crop_or_hold_out_are_refused(tmp_path: Path) -> None:
    w = tmp_path / "w"
    two_members(w)
    with pytest.raises(FaceEnsembleError, match="at least two different"):
        compose(["face-a", "face-a"], w, tmp_path / "o", "x")
    with pytest.raises(FaceEnsembleError, match="not in the manifest: nope"):
        compose(["face-a", "nope"], w, tmp_path / "o", "x")
    manifest = json.loads((w / "manifest.json").read_text())
    for change, needle in ((("face_crop", {"size": 16, "margin": 0.2}), "different face crops"),
                           (("training", {"data": "elsewhere", "held_out": "x"}), "differ in training 'data'"),
                           (("family", "onnx"), "members must be face-resnet")):
        edited = json.loads(json.dumps(manifest))
        edited["models"][1][change[0]] = change[1]
        (w / "manifest.json").write_text(json.dumps(edited))
        with pytest.raises(FaceEnsembleError, match=needle):
            compose(["face-a", "face-b"], w, tmp_path / "o", "x")
    (w / "manifest.json").write_text(json.dumps(manifest))
    (w / "face-b.pt").write_bytes(b"tampered")
    with pytest.raises(FaceEnsembleError, match="sha256 does not match"):
        compose(["face-a", "face-b"], w, tmp_path / "o", "x")
    with pytest.raises(SystemExit, match=r"face ensemble: .*sha256"):
        main(["--name", "x", "--members", "face-a", "face-b", "--weights-dir", str(w), "--out", str(tmp_path / "o")])


def test_face_select_parses_ensembles_and_tabulates() -> None:
    import argparse

    from bench.face_select import parse_ensemble, summarise, table

    assert parse_ensemble("e2=a+b") == ("e2", ["a", "b"])
    for bad in ("e2", "=a+b", "e2=a", "e2=a+"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_ensemble(bad)
    pairs = {"kfold_accuracy_misses_as_errors": {"mean": 0.8234}, "kfold_accuracy_among_found": {"mean": 0.86},
             "roc_auc_among_found": 0.9361, "threshold": 1.39051, "pairs": 588}
    ident = {"images_without_face": 23, "selection": {
        "tar_at_far": [{"far_target": 0.01, "tar": 0.516}, {"far_target": 0.001, "tar": 0.277}],
        "rank1": 0.297, "rank5": 0.458, "searches": 367, "gallery_size": 869, "genuine_pairs": 816,
        "impostor_pairs": 1025212}}
    row = summarise("m", pairs, ident)
    assert row["tar_at_far_0.01"] == 0.516 and row["tar_at_far_0.001"] == 0.277 and row["pairs"] == 588
    assert table([row]).splitlines()[-1] == "| m | 51.6% | 27.7% | 29.7% | 45.8% | 82.3% | 0.936 | 1.3905 |"
