"""The command line: evaluation commands through the service's own preprocessing, fetch-weights offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from app import cli
from app.settings import Settings
from tests.conftest import TEXT_LABELS, TINY_LABELS, write_news_csvs, write_tiny_classifier, write_tiny_text_model
from tests.models.test_train_images import make_folder


def test_evaluate_image_classifier(tmp_path: Path) -> None:
    wd = tmp_path / "w"
    write_tiny_classifier(wd)
    data = tmp_path / "data"
    make_folder(tmp_path / "gen")  # class folders alpha, beta, gamma of generated PNGs
    data.mkdir()
    (tmp_path / "gen" / "alpha").rename(data / "red")
    (tmp_path / "gen" / "beta").rename(data / "green")
    s = Settings(weights_dir=wd, torch_home=tmp_path / "th", device="cpu")
    report = cli.evaluate_classifier("tiny-cifar", data, batch_size=5, settings=s)
    assert report["images"] == 16
    assert set(report["per_class_accuracy"]) == set(TINY_LABELS[:2]) and report["images_per_second"] > 0
    # the same answers as the service gives for each file (an independent path: HTTP, one image at a time)
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.conftest import wait_ready

    app_settings = s.model_copy(update={"classifiers": ["tiny-cifar"], "text_models": [], "face_models": [],
                                        "style_enabled": False, "warmup": False, "data_dir": tmp_path / "d"})
    with TestClient(create_app(app_settings)) as c:
        wait_ready(c)
        right = {label: 0 for label in ("red", "green")}
        for label in right:
            for f in sorted((data / label).iterdir()):
                top = c.post("/classify", files={"image": (f.name, f.read_bytes(), "image/png")}).json()
                right[label] += top["results"][0]["top_k"][0]["label"] == label
    assert report["accuracy"] == pytest.approx(sum(right.values()) / 16)
    assert report["per_class_accuracy"] == pytest.approx({k: v / 8 for k, v in right.items()})


def test_evaluate_rejects_folders_with_unknown_classes(tmp_path: Path) -> None:
    wd = tmp_path / "w"
    write_tiny_classifier(wd)
    data = make_folder(tmp_path / "data")
    s = Settings(weights_dir=wd, torch_home=tmp_path / "th", device="cpu")
    with pytest.raises(SystemExit, match="not labels"):
        cli.evaluate_classifier("tiny-cifar", data, settings=s)


def test_evaluate_text_model(tmp_path: Path) -> None:
    wd = tmp_path / "w"
    write_tiny_text_model(wd)
    csv_path = tmp_path / "rows.csv"
    rows = [f'"{1 + i % 3}","Title {i}","Some description\\nwith an escaped newline {i}"' for i in range(30)]
    csv_path.write_text("\n".join(rows) + "\n")
    s = Settings(weights_dir=wd, torch_home=tmp_path / "th", device="cpu")
    report = cli.evaluate_text_model("tiny-text", csv_path, batch_size=7, settings=s)
    assert report["texts"] == 30
    cm = report["confusion_matrix"]
    assert report["accuracy"] == pytest.approx(sum(cm[i][i] for i in range(len(cm))) / 30)
    assert set(report["per_class"]) == set(TEXT_LABELS)
    assert sum(map(sum, report["confusion_matrix"])) == 30 and report["texts_per_second"] > 0


def test_fetch_weights_fails_fast_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from app.runtime import registry

    def unreachable(url: str, timeout: float = 4.0) -> None:
        raise registry.WeightsUnavailable(f"cannot reach host for {url}: offline")

    monkeypatch.setattr(registry, "check_reachable", unreachable)
    monkeypatch.setenv("CNN_WEIGHTS_DIR", str(tmp_path))
    code = cli.main(["fetch-weights", "resnet18", "resnet50", "--quiet"])
    out = capsys.readouterr().out
    assert code == 1 and "resnet18: FAILED" in out and "offline" in out
    assert list(tmp_path.iterdir()) == []


def test_cli_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("serve", "fetch-weights", "train", "evaluate", "evaluate-text"):
        assert cmd in out


def test_evaluate_faces_reports_metrics_and_a_threshold(tmp_path: Path) -> None:
    from app.cli import evaluate_face_model
    from tests.conftest import write_tiny_face_model
    from tests.models.test_train_faces import make_tree

    data, pairs = make_tree(tmp_path / "lfw")
    write_tiny_face_model(tmp_path / "w")
    s = Settings(weights_dir=tmp_path / "w", torch_home=tmp_path / "th", device="cpu")
    out = evaluate_face_model("tiny-face", pairs, data, roc=tmp_path / "roc.png", settings=s)
    assert out["pairs"] == 8 and out["same_pairs"] == 4 and out["images"] == 9
    assert out["images_without_face"] == 9  # noise images: the centred fallback box is used
    assert 0 < out["threshold"] < 4 and out["manifest_threshold"] == 1.0
    folds = out["kfold_accuracy"]["per_fold"]
    assert out["kfold_accuracy"]["mean"] == pytest.approx(sum(folds) / len(folds))
    # a readable PNG of plot_roc's two-panel figure (9 x 4 in at 110 dpi), with something drawn on it
    from PIL import Image

    with Image.open(tmp_path / "roc.png") as roc:
        assert roc.format == "PNG" and roc.size == (990, 440)
        assert len(roc.convert("RGB").getcolors(maxcolors=roc.width * roc.height) or []) > 10
    assert evaluate_face_model("tiny-face", pairs, data, holdout_max_images=4, settings=s)["pairs"] == 8
    with pytest.raises(SystemExit, match="no pairs"):  # everyone has 3 images: nobody is held out
        evaluate_face_model("tiny-face", pairs, data, holdout_max_images=3, settings=s)


def test_evaluate_holdout_reproduces_the_trainers_validation(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """--holdout rebuilds the trainer's split from the manifest entry and scores exactly its validation images."""
    from models.train import images as train_images

    data = make_folder(tmp_path / "data", per_class=10)
    wd = tmp_path / "w"
    report = train_images.main(["--data", str(data), "--out", str(tmp_path / "run"), "--name", "tiny-rgb",
                                "--depth", "8", "--epochs", "2", "--batch-size", "8", "--val-size", "9",
                                "--cache", str(tmp_path / "cache"), "--threads", "1", "--seed", "1",
                                "--install", str(wd)])
    s = Settings(weights_dir=wd, torch_home=tmp_path / "th", device="cpu")
    out = cli.evaluate_classifier("tiny-rgb", None, holdout=True, one_view=True, settings=s)  # folder from manifest
    assert out["images"] == 9 and out["holdout"]["seed"] == 1 and out["served_with"] == "one view"
    assert out["measured"]["val_accuracy"]["correct"] == round(9 * report["val_accuracy"])
    assert out["card_metrics"] == {"val_accuracy": round(report["val_accuracy"], 4)}
    assert out["difference_from_card_points"]["val_accuracy"] == pytest.approx(0.0, abs=0.01)
    assert out["confusion_matrix"] == report["confusion_matrix"]
    assert cli.evaluate_classifier("tiny-rgb", data, holdout=True, limit_per_class=1, settings=s)["images"] == 3
    # without --holdout the whole folder is scored
    assert cli.evaluate_classifier("tiny-rgb", data, settings=s)["images"] == 30

    # the command line: JSON on stdout; neither --data nor --holdout is refused
    import json

    assert cli.main(["evaluate", "tiny-rgb"]) == 2
    for key, value in (("WEIGHTS_DIR", wd), ("TORCH_HOME", tmp_path / "th"), ("DEVICE", "cpu")):
        monkeypatch.setenv(f"CNN_{key}", str(value))
    capsys.readouterr()
    assert cli.main(["evaluate", "tiny-rgb", "--holdout"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["images"] == 9 and printed["measured"] == out["measured"]


def test_evaluate_holdout_refuses_models_without_split_information(tmp_path: Path) -> None:
    wd = tmp_path / "w"
    write_tiny_classifier(wd)  # its manifest entry has no training info
    write_tiny_text_model(wd)
    s = Settings(weights_dir=wd, torch_home=tmp_path / "th", device="cpu")
    with pytest.raises(SystemExit, match="hold-out cannot be rebuilt"):
        cli.evaluate_classifier("tiny-cifar", tmp_path, holdout=True, settings=s)
    with pytest.raises(SystemExit, match="hold-out cannot be rebuilt"):
        cli.evaluate_text_model("tiny-text", None, holdout=True, settings=s)
    assert cli.main(["evaluate-text", "tiny-text"]) == 2  # neither --csv nor --holdout


def _news_csvs(root: Path) -> tuple[Path, Path, Path]:
    return write_news_csvs(root, ["the", "a", "new", "report", "said", "week"])


def test_evaluate_text_holdout_rebuilds_the_split_and_reports_old_models_both_ways(tmp_path: Path) -> None:
    import json

    from models.train import text as train_text

    gold, extra, classes = _news_csvs(tmp_path / "news")
    wd = tmp_path / "w"
    report = train_text.main(["--train", str(gold), "--train", str(extra), "--classes", str(classes),
                              "--out", str(tmp_path / "run"), "--name", "tiny-news", "--length", "64",
                              "--hidden", "8", "--epochs", "1", "--batch-size", "16", "--val-size", "12",
                              "--threads", "1", "--device", "cpu", "--install", str(wd)])
    # new runs: near-duplicates of training rows left validation for training
    assert report["val_near_duplicates_moved"] > 0 and report["val_rows"] == 12 - report["val_near_duplicates_moved"]
    s = Settings(weights_dir=wd, torch_home=tmp_path / "th", device="cpu")
    out = cli.evaluate_text_model("tiny-news", None, holdout=True, settings=s)
    assert out["texts"] == report["val_rows"] and out["correct"] == round(report["val_rows"] * report["val_accuracy"])
    assert out["holdout"]["dedup"] == train_text.DEDUP_RULE and "holdout_as_validated" not in out
    assert out["holdout"]["val_rows_with_near_duplicate_in_training"] == 0
    assert out["confusion_matrix"] == report["confusion_matrix"]
    # files found by name in another folder
    moved = tmp_path / "elsewhere"
    (tmp_path / "news").rename(moved)
    assert cli.evaluate_text_model("tiny-news", None, holdout=True, data_dir=moved, settings=s)["texts"] == out["texts"]
    with pytest.raises(SystemExit, match="no such file"):
        cli.evaluate_text_model("tiny-news", None, holdout=True, settings=s)

    # a model trained before the rule (no training.dedup): its old hold-out, and that hold-out minus the rows
    # with a near-duplicate in training, which is what "accuracy" reports
    manifest = json.loads((wd / "manifest.json").read_text())
    entry = manifest["models"][0]
    args = train_text.parse_args(["--train", str(moved / "gold.csv"), "--train", str(moved / "extra.csv"),
                                  "--classes", str(moved / "classes.txt"), "--out", str(tmp_path / "x")])
    old_split = train_text.split_rows(train_text.load_rows(args)[1], "12", True, 0, dedup=False)
    for key in ("dedup", "val_size", "csv", "val_near_duplicates_moved"):
        del entry["training"][key]
    entry["training"] |= {"val_rows": len(old_split.val_texts), "train_rows": len(old_split.train_texts)}
    (wd / "manifest.json").write_text(json.dumps(manifest))
    old = cli.evaluate_text_model("tiny-news", None, holdout=True, data_dir=moved, settings=s)
    near = old["holdout"]["val_rows_with_near_duplicate_in_training"]
    assert old["holdout"]["dedup"] is None and old["holdout_as_validated"]["texts"] == 12
    assert near == report["val_near_duplicates_moved"] and old["texts"] == 12 - near
    assert set(old["difference_from_card_points"]) == {"holdout_as_validated", "deduplicated_holdout"}
    # a manifest whose row counts do not match the files is refused (not the model's data)
    entry["training"]["val_rows"] = 11
    (wd / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit, match="not its hold-out"):
        cli.evaluate_text_model("tiny-news", None, holdout=True, data_dir=moved, settings=s)


def test_evaluate_faces_split_calibrates_on_one_half_and_scores_the_other(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """--split test: the threshold comes from the calibration half, the pairs scored are the test half's, and an
    image without a face is a miss (the tiny tree's noise images have none)."""
    import json

    from app.cli import evaluate_face_model
    from tests.conftest import write_tiny_face_model
    from tests.models.test_train_faces import make_tree

    data, pairs = make_tree(tmp_path / "lfw")  # Person_00-02 are in the test half, Person_03-05 in calibration
    write_tiny_face_model(tmp_path / "w")
    s = Settings(weights_dir=tmp_path / "w", torch_home=tmp_path / "th", device="cpu")
    with pytest.raises(SystemExit, match="no pair has both faces found"):  # as served: nothing to calibrate on
        evaluate_face_model("tiny-face", pairs, data, split="test", settings=s)
    out = evaluate_face_model("tiny-face", pairs, data, split="test", misses="fallback", settings=s)
    split = out["identity_split"]
    assert split["halves"]["test"]["pairs"] == 5 and split["halves"]["calibration"]["pairs"] == 2
    assert split["dropped_crossing"] == {**split["dropped_crossing"], "pairs": 1, "same": 0}
    assert out["pairs"] == 5 and out["same_pairs"] == 3 and out["calibration"]["pairs"] == 2
    assert out["threshold_from"] == "the calibration half" and out["threshold_criterion"] == "balanced"
    assert out["at_threshold"]["threshold"] == out["threshold"] and out["manifest_threshold"] == 1.0
    assert out["calibration"]["fitted"]["balanced"]["threshold"] == out["threshold"]
    cal = evaluate_face_model("tiny-face", pairs, data, split="calibration", misses="fallback", settings=s)
    assert cal["pairs"] == 2 and cal["threshold"] == out["threshold"]  # the same fit, scored on its own half
    # the command line
    for key, value in (("WEIGHTS_DIR", tmp_path / "w"), ("TORCH_HOME", tmp_path / "th"), ("DEVICE", "cpu")):
        monkeypatch.setenv(f"CNN_{key}", str(value))
    capsys.readouterr()
    assert cli.main(["evaluate-faces", "tiny-face", "--pairs", str(pairs), "--data", str(data), "--split", "test",
                     "--misses", "fallback", "--criterion", "accuracy"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["split"] == "test" and printed["threshold_criterion"] == "accuracy" and printed["pairs"] == 5


@pytest.mark.shared_data
def test_evaluate_faces_served_path_on_real_pairs_agrees_with_verify(tmp_path: Path) -> None:
    """A small test-half evaluation of the shipped model runs, and its per-image path is /faces/verify's: the same
    distances, and a photo without a face is a 422 there and a miss here."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.runtime.registry import ModelRegistry
    from models.faces.lfw import read_pairs
    from tests.conftest import ROOT, SHARED_DATA, wait_ready

    model = "lfw-face-resnet"
    if not (ROOT / "weights" / f"{model}.pt").exists():
        pytest.skip("shipped face model not built")
    lfw = SHARED_DATA / "lfw"
    s = Settings(weights_dir=ROOT / "weights", torch_home=tmp_path / "th", classifiers=[], text_models=[],
                 face_models=[model], data_dir=tmp_path / "data", style_enabled=False, device="cpu")
    out = cli.evaluate_face_model(model, lfw / "pairsDevTrain.txt", lfw / "images", holdout_max_images=5,
                                  split="test", limit=6, settings=s)
    assert out["pairs"] == 6 and out["same_pairs"] == 3 and out["calibration"]["pairs"] == 6
    assert out["misses"] == "error" and 0.0 < out["threshold"] < 4.0
    assert out["served_path"]["face"] == "largest" and out["served_path"]["crop"]["margin"] == 0.1

    # three test-half pairs, one of them (Darren_Clarke 1-2) with a photo the Haar cascade misses
    few = tmp_path / "pairs.txt"
    few.write_text("3\nDarren_Clarke\t1\t2\nKobe_Bryant\t1\t3\nAlan_Trammell\t1\tKatie_Harman\t1\n")
    pairs = read_pairs(few, lfw / "images")
    registry = ModelRegistry(s.weights_dir, tmp_path / "th", __import__("torch").device("cpu"),
                             allow_download=False, allow_untrained=False)
    loaded = registry.load(model, "face-embedding").loaded
    files = sorted({f for p in pairs for f in (p.a, p.b)})
    emb, missed = cli._face_embeddings(loaded, files, s, 8, "error")
    assert missed and all(emb[f] is None for f in missed)
    with TestClient(create_app(s)) as c:
        wait_ready(c)
        for p in pairs:
            r = c.post("/faces/verify", files=[("image_a", (p.a.name, p.a.read_bytes(), "image/jpeg")),
                                               ("image_b", (p.b.name, p.b.read_bytes(), "image/jpeg"))])
            if p.a in missed or p.b in missed:
                assert r.status_code == 422 and "no face found" in r.json()["detail"]
            else:
                assert r.status_code == 200, r.text
                d = float((emb[p.a] - emb[p.b]).pow(2).sum())
                assert r.json()["distance"] == pytest.approx(d, abs=1e-4)
                assert r.json()["threshold"] == pytest.approx(loaded.threshold)


def _decoding_cases(root: Path) -> list[Path]:
    """Files whose decoding matters: an EXIF-rotated non-square JPEG, an RGBA PNG and a two-frame GIF."""
    from PIL import Image

    root.mkdir(parents=True)
    yy, xx = __import__("numpy").mgrid[0:40, 0:64]
    pattern = Image.fromarray(__import__("numpy").stack([xx * 4, yy * 6, (xx + yy) * 2], -1).astype("uint8"))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    pattern.save(root / "rotated.jpg", "JPEG", quality=95, exif=exif)
    rgba = pattern.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "alpha.png")
    frames = [pattern.convert("P"), pattern.transpose(Image.Transpose.FLIP_LEFT_RIGHT).convert("P")]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:])
    return [root / "rotated.jpg", root / "alpha.png", root / "animated.gif"]


def test_evaluate_makes_the_same_classifier_inputs_as_the_service(tmp_path: Path) -> None:
    """`evaluate`'s per-file step is /classify's: the same probabilities for the same files, files whose decoding
    matters included; and the comparison sees a decoding difference (the rotated JPEG read without its EXIF
    orientation gives other probabilities), so a CLI that decoded on its own would fail here."""
    from fastapi.testclient import TestClient
    from PIL import Image

    from app.main import create_app
    from app.runtime.registry import LoadedClassifier
    from models.preprocess import image_to_tensor
    from tests.conftest import wait_ready

    wd = tmp_path / "w"
    write_tiny_classifier(wd)
    files = _decoding_cases(tmp_path / "files")
    s = Settings(weights_dir=wd, torch_home=tmp_path / "th", device="cpu")
    loaded = cli._load_trained("tiny-cifar", "image-classification", LoadedClassifier, s)
    probs = loaded.forward(cli._classifier_inputs(loaded, files, s))
    evaluated = [{i: float(v) for i, v in enumerate(p)} for p in probs]
    app_settings = s.model_copy(update={"classifiers": ["tiny-cifar"], "text_models": [], "face_models": [],
                                        "style_enabled": False, "warmup": False, "data_dir": tmp_path / "d"})
    served = []
    with TestClient(create_app(app_settings)) as c:
        wait_ready(c)
        for f in files:
            r = c.post("/classify", files={"image": (f.name, f.read_bytes(), "application/octet-stream")},
                       data={"top_k": str(len(TINY_LABELS))})
            assert r.status_code == 200, r.text
            served.append({p["index"]: p["probability"] for p in r.json()["results"][0]["top_k"]})
    for f, mine, theirs in zip(files, evaluated, served, strict=True):
        assert theirs == pytest.approx(mine, abs=1e-6), f.name
    with Image.open(files[0]) as raw:
        unrotated = loaded.forward([image_to_tensor(raw.convert("RGB"), loaded.preprocessing)])[0]
    assert max(abs(served[0][i] - float(v)) for i, v in enumerate(unrotated)) > 1e-4


def test_evaluate_text_predicts_what_the_service_answers(tmp_path: Path) -> None:
    """`evaluate-text` scores the predictions /text/classify gives for the same rows (its confusion matrix is the
    one built from the service's top labels)."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from models.train.text import read_csv
    from tests.conftest import wait_ready

    wd = tmp_path / "w"
    write_tiny_text_model(wd)
    csv_path = tmp_path / "rows.csv"
    words = ["match", "goal", "market", "shares", "chip", "software", "election", "minister"]
    rows = [f'"{1 + i % 3}","{words[i % 8].title()} {i}","{" ".join(words[(i * j) % 8] for j in range(i))}\\n{i}"'
            for i in range(24)]
    csv_path.write_text("\n".join(rows) + "\n")
    s = Settings(weights_dir=wd, torch_home=tmp_path / "th", device="cpu")
    report = cli.evaluate_text_model("tiny-text", csv_path, batch_size=5, settings=s)
    raw, texts = read_csv(csv_path, label_column="1", text_columns=["2", "3"], header=False, unescape=True,
                          encoding="utf-8")
    app_settings = s.model_copy(update={"classifiers": [], "text_models": ["tiny-text"], "face_models": [],
                                        "style_enabled": False, "warmup": False, "data_dir": tmp_path / "d"})
    with TestClient(create_app(app_settings)) as c:
        wait_ready(c)
        r = c.post("/text/classify", json={"texts": texts, "model": "tiny-text", "top_k": 1})
        assert r.status_code == 200, r.text
    top = [res["top_k"][0]["index"] for res in r.json()["results"]]
    cm = [[0] * len(TEXT_LABELS) for _ in TEXT_LABELS]
    for label, pred in zip(raw, top, strict=True):
        cm[int(label) - 1][pred] += 1
    assert report["texts"] == len(texts) == 24 and report["confusion_matrix"] == cm


@pytest.mark.shared_data
def test_face_evaluation_embeds_each_photo_as_faces_embed_does(tmp_path: Path) -> None:
    """The evaluation commands' per-photo step is the face service's: the embedding of the largest face of each
    photo equals /faces/embed's (max_faces=1), and a photo where /faces/embed finds no face is a miss."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.runtime.registry import LoadedFaceEmbedder
    from tests.conftest import ROOT, SHARED_DATA, wait_ready

    model = "lfw-face-resnet"
    if not (ROOT / "weights" / f"{model}.pt").exists():
        pytest.skip("shipped face model not built")
    images = SHARED_DATA / "lfw" / "images"
    files = [images / "Kobe_Bryant" / "Kobe_Bryant_0001.jpg", images / "Darren_Clarke" / "Darren_Clarke_0001.jpg",
             images / "Darren_Clarke" / "Darren_Clarke_0002.jpg", images / "Katie_Harman" / "Katie_Harman_0001.jpg"]
    s = Settings(weights_dir=ROOT / "weights", torch_home=tmp_path / "th", classifiers=[], text_models=[],
                 face_models=[model], data_dir=tmp_path / "data", style_enabled=False, device="cpu")
    loaded = cli._load_trained(model, "face-embedding", LoadedFaceEmbedder, s)
    emb, missed = cli._face_embeddings(loaded, files, s, 3, "error")
    assert missed and len(missed) < len(files)  # both kinds of photo are compared
    with TestClient(create_app(s)) as c:
        wait_ready(c)
        for f in files:
            r = c.post("/faces/embed", files={"image": (f.name, f.read_bytes(), "image/jpeg")},
                       data={"max_faces": "1", "detector": "haar"})
            assert r.status_code == 200, r.text
            faces = r.json()["results"][0]["faces"]
            if f in missed:
                assert faces == [] and emb[f] is None
            else:
                assert faces[0]["embedding"] == pytest.approx(emb[f].tolist(), abs=1e-6), f.name
