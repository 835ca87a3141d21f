"""The image training command end to end on a tiny generated ImageFolder."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from app.runtime.registry import ModelRegistry, load_manifest
from models.preprocess import ImageSpec
from models.train import images as train_images


def make_folder(root: Path, per_class: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(["alpha", "beta", "gamma"]):
        d = root / name
        d.mkdir(parents=True)
        for i in range(per_class):
            a = rng.integers(0, 60, (36, 44, 3), dtype=np.uint8)
            a[..., c] += 150
            Image.fromarray(a).save(d / f"{i}.png")
    return root


def test_training_command_writes_loadable_checkpoint_and_manifest(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data")
    out = tmp_path / "run"
    weights = tmp_path / "weights"
    args = ["--data", str(data), "--out", str(out), "--name", "tiny-rgb", "--depth", "8", "--epochs", "1",
            "--batch-size", "8", "--val-size", "6", "--cache", str(tmp_path / "cache"), "--install", str(weights),
            "--threads", "1"]
    report = train_images.main(args)
    assert report["epochs"] == 1
    cm = report["confusion_matrix"]
    assert report["val_accuracy"] == pytest.approx(sum(cm[i][i] for i in range(3)) / 6)
    for f in ("checkpoint.pt", "log.jsonl", "report.json", "report.md", "confusion.png", "tiny-rgb.pt"):
        assert (out / f).is_file(), f
    assert len(report["confusion_matrix"]) == 3 and sum(map(sum, report["confusion_matrix"])) == 6
    entry = load_manifest(weights)["tiny-rgb"]
    assert entry.labels == ["alpha", "beta", "gamma"] and entry.preprocessing is not None
    assert entry.preprocessing.resize == 32 and entry.metrics["val_images"] == 6
    st = ModelRegistry(weights, tmp_path / "hub", torch.device("cpu"), allow_download=False,
                       allow_untrained=False).load_classifier("tiny-rgb")
    assert st.status == "ready" and st.loaded is not None and st.loaded.weights_tag == "trained"

    # rerunning resumes from the checkpoint (no epochs left) and reproduces the same weights
    before = (out / "tiny-rgb.pt").read_bytes()
    train_images.main(args)
    assert len((out / "log.jsonl").read_text().splitlines()) == 1
    sd_a = torch.load(out / "tiny-rgb.pt", weights_only=True)
    import io

    sd_b = torch.load(io.BytesIO(before), weights_only=True)
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert json.loads((out / "manifest_entry.json").read_text())["name"] == "tiny-rgb"

    # the manifest entry records what rebuilds the hold-out: exactly the images the run validated on
    holdout = train_images.holdout_from_training(entry.training, "tiny-rgb")
    # 24 images: the frozen test split takes round(8 * 0.1) = 1 per class, validation 2 per class, 15 train
    assert (holdout.data, holdout.val_size, holdout.train_size, holdout.seed) == (data, 6, 15, 0)
    assert holdout.test == train_images.FrozenTestSplit(0.1) and holdout.test_size == 3
    classes, files, labels = train_images.holdout_files(holdout)
    _, (_, _), (val_u8, y_val) = train_images.load_split(data, 32, 6, 0, None, test=holdout.test)
    assert classes == entry.labels and labels.tolist() == y_val.tolist() and len(files) == 6
    spec = ImageSpec.from_dict(entry.preprocessing.model_dump())
    decoded = np.stack([train_images.to_uint8_array(Image.open(f), spec) for f in files])
    assert np.array_equal(decoded, val_u8.permute(0, 2, 3, 1).numpy())


def test_holdout_split_is_stratified_disjoint_and_checked(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", per_class=10)
    classes, files, labels, train_idx, val_idx = train_images.split_files(data, 6, seed=3)
    assert classes == ["alpha", "beta", "gamma"] and len(files) == 30
    assert not set(train_idx) & set(val_idx) and len(train_idx) + len(val_idx) == 30
    assert np.bincount(labels[val_idx]).tolist() == [2, 2, 2]
    # the same folder, size and seed give the same split; another seed another one
    assert train_images.split_files(data, 6, seed=3)[4].tolist() == val_idx.tolist()
    assert train_images.split_files(data, 6, seed=4)[4].tolist() != val_idx.tolist()
    training = {"data": str(data), "train_images": 24, "val_images": 6, "recipe": {"seed": 3}}
    _, val_files, val_labels = train_images.holdout_files(train_images.holdout_from_training(training, "m"))
    assert val_files == [files[i] for i in val_idx] and val_labels.tolist() == labels[val_idx].tolist()
    # refused: a manifest entry without the split seed, and a folder that is not the model's training folder
    with pytest.raises(SystemExit, match=r"recipe\.seed"):
        train_images.holdout_from_training({"data": str(data), "train_images": 24, "val_images": 6}, "m")
    (data / "alpha" / "extra.png").write_bytes((data / "alpha" / "0.png").read_bytes())
    with pytest.raises(SystemExit, match="not its training folder"):
        train_images.holdout_files(train_images.holdout_from_training(training, "m"))


def test_augment_keeps_shape_and_flips() -> None:
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = train_images.augment(x, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == x.shape


def test_lr_schedule_warms_up_then_decays() -> None:
    lrs = [train_images.lr_at(s, 100, 0.2, 0.1) for s in range(100)]
    assert lrs[0] < lrs[9] == max(lrs)
    assert lrs[-1] < 0.01 and all(a >= b for a, b in itertools.pairwise(lrs[10:]))


def test_linear_schedule_is_a_triangle_from_a_fraction_of_the_peak() -> None:
    lrs = [train_images.lr_at(s, 100, 2.0, 0.25, "linear", 0.2) for s in range(101)]
    assert lrs[0] == pytest.approx(0.4) and lrs[25] == pytest.approx(2.0) == max(lrs)
    assert lrs[10] == pytest.approx(0.4 + 1.6 * 10 / 25) and lrs[50] == pytest.approx(2.0 * 50 / 75)
    assert lrs[100] == 0.0 and all(a >= b for a, b in itertools.pairwise(lrs[25:]))


def test_lookahead_pulls_towards_slow_weights_more_as_training_ends() -> None:
    p = torch.nn.Parameter(torch.tensor([0.0]))
    la = train_images.Lookahead([p], every=2, max_decay=0.8)
    p.data.fill_(1.0)
    la.step(0, 4)  # not a sync step: nothing happens
    assert float(p.detach()) == 1.0 and float(la.slow[0]) == 0.0
    la.step(1, 4)  # progress 2/4: decay 0.8 * 0.125 = 0.1, slow = 0.1 * 0 + 0.9 * 1, and the weights restart there
    assert float(la.slow[0]) == pytest.approx(0.9) and float(p.detach()) == pytest.approx(0.9)
    p.data.fill_(2.0)
    la.step(3, 4)  # progress 1: decay 0.8, slow = 0.8 * 0.9 + 0.2 * 2
    assert float(la.slow[0]) == pytest.approx(1.12) and float(p.detach()) == pytest.approx(1.12)
    p.data.fill_(5.0)
    la.finish()
    assert float(p.detach()) == pytest.approx(1.12)
    with pytest.raises(ValueError):
        train_images.Lookahead([p], every=0, max_decay=0.5)
    for bad in (["--lookahead", "5", "--swa-epochs", "2"], ["--lookahead", "5", "--lookahead-decay", "1"]):
        with pytest.raises(SystemExit):
            train_images.parse_args(["--data", "d", "--out", "o", *bad])


def test_decay_per_step_shrinks_every_group_by_the_same_fraction() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4))
    net[1].weight.requires_grad_(False)
    g = train_images.param_groups(net, 1.5, 5e-4, 2e-3, 64.0)
    assert [len(x["params"]) for x in g] == [1, 1]  # conv weight; batch-norm shift (its frozen scale left out)
    assert g[1]["params"][0] is net[1].bias and g[1]["lr_scale"] == 64.0
    for group, lr in zip(g, (1.5, 1.5 * 64), strict=True):
        assert lr * group["weight_decay"] == pytest.approx(2e-3)
    plain = train_images.param_groups(net, 1.5, 5e-4, None, 1.0)
    assert [x["weight_decay"] for x in plain] == [5e-4, 0.0]


def train_tiny_whitened(tmp_path: Path, *options: str) -> tuple[Path, Path, dict[str, Any]]:
    """Two epochs of a tiny whitened convnet (widths 8, one conv per group) on a generated 3-class folder of 10
    images per class, with extra trainer options: the folder, the run directory and the report."""
    data = make_folder(tmp_path / "data", per_class=10)
    out = tmp_path / "run"
    report = train_images.main([
        "--data", str(data), "--out", str(out), "--family", "cifar-whitened-convnet", "--widths", "8", "8", "8",
        "--convs", "1", "--epochs", "2", "--batch-size", "8", "--val-size", "6", "--lr", "0.5", "--crop-pad", "2",
        *options, "--cache", str(tmp_path / "cache"), "--threads", "1"])
    return data, out, report


def test_speed_run_options_are_recorded_and_frozen_scales_stay_one(tmp_path: Path) -> None:
    data, out, report = train_tiny_whitened(
        tmp_path, "--schedule", "linear", "--lr-start", "0.2", "--decay-per-step", "1e-3", "--bias-lr-scale", "8",
        "--bn-weights", "frozen", "--bn-momentum", "0.6", "--lookahead", "2", "--tta", "hflip-translate")
    entry = json.loads((out / "manifest_entry.json").read_text())
    recipe = entry["training"]["recipe"]
    assert recipe["decay_per_step"] == 1e-3 and "weight_decay" not in recipe and recipe["bias_lr_scale"] == 8
    assert recipe["bn_weights"] == "frozen at 1" and recipe["bn_momentum"] == 0.6 and recipe["lookahead_every"] == 2
    assert recipe["schedule"].startswith("linear from 0.2")
    assert entry["test_time_augmentation"] == "hflip-translate"
    state = torch.load(out / f"{entry['name']}.pt", weights_only=True)
    for k, v in state.items():
        if k.startswith("groups.") and ".norms." in k and k.endswith(".weight"):
            assert torch.equal(v, torch.ones_like(v)), k
    # the six-view accuracy in the report is that of the saved weights served with that manifest entry
    wd = tmp_path / "weights"
    train_images.install_entry(entry, out / entry["file"], wd)
    loaded = ModelRegistry(wd, tmp_path / "hub", torch.device("cpu"), allow_download=False,
                           allow_untrained=False).load_classifier(entry["name"], warmup=False).loaded
    assert loaded is not None and loaded.tta == "hflip-translate"
    _, _, (val_u8, y_val) = train_images.load_split(data, 32, 6, 0, tmp_path / "cache",
                                                   test=train_images.FrozenTestSplit(0.1))
    spec = ImageSpec.from_dict(entry["preprocessing"])
    x = [(v.float() / 255.0 - torch.tensor(spec.mean)[:, None, None]) / torch.tensor(spec.std)[:, None, None]
         for v in val_u8]
    pred = torch.stack(loaded.forward(x)).argmax(-1)
    assert round(report["val_accuracy_hflip_translate"] * 6) == int((pred == y_val).sum())
    assert entry["metrics"]["val_accuracy_hflip_translate"] == round(report["val_accuracy_hflip_translate"], 4)


def test_install_keeps_hand_written_fields(tmp_path: Path) -> None:
    wd = tmp_path / "weights"
    f = tmp_path / "m.pt"
    f.write_bytes(b"x")
    train_images.install_entry({"name": "m", "sha256": "1"}, f, wd)
    manifest = json.loads((wd / "manifest.json").read_text())
    manifest["models"][0]["card"] = "m.md"
    (wd / "manifest.json").write_text(json.dumps(manifest))
    train_images.install_entry({"name": "m", "sha256": "2"}, f, wd)
    (entry,) = json.loads((wd / "manifest.json").read_text())["models"]
    assert entry == {"name": "m", "sha256": "2", "card": "m.md"}


def test_init_from_starts_a_warm_restart_from_given_weights(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data")
    common = ["--data", str(data), "--name", "tiny-rgb", "--depth", "8", "--batch-size", "8", "--val-size", "6",
              "--cache", str(tmp_path / "cache"), "--threads", "1"]
    train_images.main([*common, "--out", str(tmp_path / "stage1"), "--epochs", "1"])
    stage1 = tmp_path / "stage1" / "tiny-rgb.pt"
    # zero epochs: the model must be exactly the stage-1 weights, and the recipe must say where it started
    report = train_images.main([*common, "--out", str(tmp_path / "stage2"), "--epochs", "0", "--init-from",
                                str(stage1)])
    before = torch.load(stage1, weights_only=True)
    after = torch.load(tmp_path / "stage2" / "tiny-rgb.pt", weights_only=True)
    assert all(torch.equal(before[k], after[k]) for k in before)
    entry = json.loads((tmp_path / "stage2" / "manifest_entry.json").read_text())
    from models.train.common import sha256_file

    assert entry["training"]["recipe"]["init_from"] == {"file": "tiny-rgb.pt", "sha256": sha256_file(stage1)}
    assert report["init_from"]["sha256"] == sha256_file(stage1)


def test_bf16_channels_last_training_saves_plain_fp32_weights(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data")
    out = tmp_path / "run"
    report = train_images.main(["--data", str(data), "--out", str(out), "--name", "tiny-bf16", "--depth", "8",
                                "--epochs", "1", "--batch-size", "8", "--val-size", "6", "--threads", "1",
                                "--cache", str(tmp_path / "cache"), "--precision", "bf16", "--channels-last",
                                "--install", str(tmp_path / "weights")])
    assert np.isfinite(report["history"][0]["train_loss"])
    sd = torch.load(out / "tiny-bf16.pt", weights_only=True)
    floats = [v for v in sd.values() if v.is_floating_point()]
    # autocast only changes the arithmetic: the file holds fp32 tensors in the plain (NCHW) layout
    assert floats and all(v.dtype == torch.float32 and v.is_contiguous() for v in floats)
    entry = json.loads((out / "manifest_entry.json").read_text())
    assert entry["training"]["recipe"]["precision"] == "bf16"
    st = ModelRegistry(tmp_path / "weights", tmp_path / "hub", torch.device("cpu"), allow_download=False,
                       allow_untrained=False).load_classifier("tiny-bf16")
    assert st.status == "ready"


def test_swa_saves_the_average_of_the_last_epochs(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    data = make_folder(tmp_path / "data")
    seen: list[dict[str, torch.Tensor]] = []
    real_save = train_images.atomic_save

    def recording_save(obj, path):  # type: ignore[no-untyped-def]
        seen.append({k: v.detach().clone() for k, v in obj["model"].items()})
        real_save(obj, path)

    monkeypatch.setattr(train_images, "atomic_save", recording_save)
    out = tmp_path / "run"
    train_images.main(["--data", str(data), "--out", str(out), "--name", "tiny-swa", "--depth", "8",
                       "--epochs", "3", "--swa-epochs", "2", "--swa-lr", "0.05", "--batch-size", "8",
                       "--val-size", "6", "--threads", "1", "--cache", str(tmp_path / "cache")])
    assert len(seen) == 3
    saved = torch.load(out / "tiny-swa.pt", weights_only=True)
    conv = next(k for k in saved if k.endswith(".weight") and saved[k].dim() == 4)
    expected = (seen[1][conv] + seen[2][conv]) / 2  # epochs 2 and 3 averaged, epoch 1 not
    assert torch.allclose(saved[conv], expected, atol=1e-6)
    assert not torch.allclose(saved[conv], seen[2][conv])
    recipe = json.loads((out / "manifest_entry.json").read_text())["training"]["recipe"]
    assert recipe["swa_epochs"] == 2 and recipe["swa_lr"] == 0.05


def test_recompute_bn_statistics_matches_the_data() -> None:
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    model[0].running_mean.fill_(7.0)
    x = torch.randn(20, 3, 4, 4) * 2 + torch.tensor([1.0, -1.0, 3.0]).view(1, 3, 1, 1)
    train_images.recompute_bn_statistics(model, x, batch=5, device=torch.device("cpu"))
    assert torch.allclose(model[0].running_mean, x.mean(dim=(0, 2, 3)), atol=1e-5)
    assert model[0].momentum == 0.1 and not model.training


def test_val_every_skips_validation_between_checks_but_always_measures_the_last_epoch(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", per_class=4)
    out = tmp_path / "run"
    report = train_images.main(["--data", str(data), "--out", str(out), "--depth", "8", "--epochs", "3",
                                "--batch-size", "4", "--val-size", "3", "--cache", str(tmp_path / "cache"),
                                "--threads", "1", "--val-every", "2"])
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[0]["val_acc"] is None
    assert rows[1]["val_acc"] is not None and rows[2]["val_acc"] is not None
    assert report["val_accuracy"] == pytest.approx(rows[2]["val_acc"])  # the report is the last epoch's measurement
