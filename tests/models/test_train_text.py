"""The text training command end to end on tiny generated CSV files in AG News' layout."""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from app.runtime.registry import ManifestEntry, load_manifest
from models.text import CharSpec, build_text_model
from models.train import text as train_text

CLASSES = ["Sports", "Business", "Politics"]
KEYWORDS = {1: ["football", "match", "goal"], 2: ["stocks", "market", "shares"], 3: ["election", "vote", "senate"]}
FILLER = ["the", "a", "report", "new", "today", "week", "after", "before", "local", "people", "said", "more", "over",
          "about", "year"]


def make_csv(path: Path, per_class: int, seed: int, title: bool = True) -> Path:
    """AG News layout: "class","title","description"; the class shows only through its keyword."""
    rng = random.Random(seed)
    rows = []
    for c, words in KEYWORDS.items():
        for i in range(per_class):
            w = rng.choice(words)
            head = " ".join([*rng.sample(FILLER, 2), w]).title() if title else ""
            sep = "\\n" if i % 3 == 0 else " "  # AG News' escaped newline
            desc = " ".join(rng.sample(FILLER, 3)) + f"{sep}{w} " + " ".join(rng.sample(FILLER, 3))
            rows.append([str(c), head, desc])
    rng.shuffle(rows)
    with open(path, "w", newline="") as fh:
        csv.writer(fh, quoting=csv.QUOTE_ALL).writerows(rows)
    return path


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, Path, Path]:
    gold = make_csv(tmp_path / "gold.csv", per_class=30, seed=0)
    extra = make_csv(tmp_path / "extra.csv", per_class=6, seed=1, title=False)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    return gold, extra, classes


def test_training_learns_and_writes_a_loadable_model(tmp_path: Path, data: tuple[Path, Path, Path]) -> None:
    gold, extra, classes = data
    out, weights = tmp_path / "run", tmp_path / "weights"
    args = ["--train", str(gold), "--train", str(extra), "--classes", str(classes), "--out", str(out),
            "--name", "tiny-news", "--length", "64", "--hidden", "64", "--epochs", "8", "--batch-size", "16",
            "--val-size", "30", "--optimizer", "adamw", "--lr", "3e-3", "--threads", "1", "--seed", "0",
            "--device", "cpu", "--install", str(weights)]
    report = train_text.main(args)
    # three balanced classes: chance is 1/3; the keyword makes them separable
    assert report["val_accuracy"] > 0.8, report["history"]
    assert report["epochs"] == 8 and report["val_rows"] == 30
    # validation only from the gold file: 90 - 30 gold rows + all 18 extra rows train
    assert report["train_rows"] == 60 + 18
    for f in ("checkpoint.pt", "log.jsonl", "report.json", "report.md", "confusion.png", "tiny-news.pt",
              "manifest_entry.json"):
        assert (out / f).is_file(), f
    assert sum(map(sum, report["confusion_matrix"])) == 30
    assert set(report["per_class"]) == set(CLASSES)
    assert "| Sports |" in (out / "report.md").read_text()

    raw = json.loads((out / "manifest_entry.json").read_text())
    entry = ManifestEntry.model_validate(raw)
    assert entry.task == "text-classification" and entry.family == "vdcnn" and entry.labels == CLASSES
    assert entry.metrics["val_rows"] == 30 and set(entry.metrics["per_class_f1"]) == set(CLASSES)
    assert entry.training["rows"] == {str(gold): 90, str(extra): 18}
    # new runs use the near-duplicate split and record it, so evaluate-text --holdout rebuilds exactly this split
    assert entry.training["dedup"] == train_text.DEDUP_RULE and entry.training["val_size"] == "30"
    holdout = train_text.holdout_from_training(entry.training, "tiny-news")
    assert holdout.dedup and holdout.csv["text_columns"] == "2,3"
    split = train_text.holdout_split(holdout, CLASSES)
    assert len(split.val_texts) == 30 and np.bincount(split.y_val).tolist() == [10, 10, 10]
    spec = CharSpec.from_dict(raw["encoding"])
    assert spec.length == 64 and spec.unknown == "index" and spec.vocab_size == entry.arch["vocab_size"]
    assert load_manifest(weights)["tiny-news"].sha256 == entry.sha256 and (weights / entry.file).is_file()

    # the weights file is a plain state_dict that loads strictly into the builder's model
    model = build_text_model(entry.family, entry.arch, len(entry.labels), spec.vocab_size)
    model.load_state_dict(torch.load(weights / entry.file, weights_only=True))
    model.eval()
    with torch.no_grad():
        pred = model(spec.encode(["Football: a late goal wins the match", "Stocks fall as market shares slide",
                                  "Senate election: the vote is close"])).argmax(-1).tolist()
    assert sum(p == i for i, p in enumerate(pred)) >= 2, pred

    # rerunning resumes from the checkpoint with no epochs left and reproduces the same weights
    before = (out / "tiny-news.pt").read_bytes()
    train_text.main(args)
    assert len((out / "log.jsonl").read_text().splitlines()) == 8
    sd_a = torch.load(out / "tiny-news.pt", weights_only=True)
    sd_b = torch.load(io.BytesIO(before), weights_only=True)
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)

    # resuming with another model into the same run directory is refused
    with pytest.raises(SystemExit, match="different configuration"):
        train_text.main([*args, "--pool", "kmax"])


def test_resume_continues_an_interrupted_run(tmp_path: Path, data: tuple[Path, Path, Path]) -> None:
    gold, _, classes = data
    common = ["--train", str(gold), "--classes", str(classes), "--out", str(tmp_path / "run"), "--length", "64",
              "--hidden", "8", "--batch-size", "32", "--val-size", "0.2", "--threads", "1", "--device", "cpu"]
    first = train_text.main([*common, "--epochs", "1"])
    assert first["epochs"] == 1 and first["val_rows"] == 18
    second = train_text.main([*common, "--epochs", "2"])
    assert second["epochs"] == 2 and [h["epoch"] for h in second["history"]] == [1, 2]
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 2
    entry = json.loads((tmp_path / "run" / "manifest_entry.json").read_text())
    assert entry["name"].endswith("-vdcnn9")  # default name: <folder of the first file>-<model>
    ManifestEntry.model_validate(entry)


def test_csv_reading_unescapes_newlines_and_joins_columns(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text('"2","Title here","First line\\nsecond line"\n"1","","Only a description"\n'
                    '"3","Only a title",""\n')
    labels, texts = train_text.read_csv(path, label_column="1", text_columns=["2", "3"], header=False,
                                        unescape=True, encoding="utf-8")
    assert labels == ["2", "1", "3"]
    assert texts == ["Title here First line\nsecond line", "Only a description", "Only a title"]
    _, kept = train_text.read_csv(path, label_column="1", text_columns=["2", "3"], header=False, unescape=False,
                                  encoding="utf-8")
    assert kept[0] == "Title here First line\\nsecond line"
    enc = CharSpec(length=40).encode(texts[:1])[0]
    assert 69 in enc.tolist()  # the newline's index in the default alphabet


def test_generic_csv_with_header_and_named_labels(tmp_path: Path) -> None:
    path = tmp_path / "b.csv"
    path.write_text("id,body,topic\n1,hello there,greeting\n2,buy now,spam\n3,hi,greeting\n")
    args = train_text.parse_args(["--train", str(path), "--out", str(tmp_path / "o"), "--header",
                                  "--label-column", "topic", "--text-columns", "body"])
    classes, rows = train_text.load_rows(args)
    assert classes == ["greeting", "spam"] and rows[0].labels.tolist() == [0, 1, 0]
    assert rows[0].texts == ["hello there", "buy now", "hi"]
    bad = tmp_path / "c.csv"
    bad.write_text('"5","t","d"\n')
    classes_file = tmp_path / "classes.txt"
    classes_file.write_text("a\nb\n")
    with pytest.raises(SystemExit, match="label '5'"):
        train_text.load_rows(train_text.parse_args(["--train", str(bad), "--classes", str(classes_file),
                                                    "--out", str(tmp_path / "o")]))


def test_split_takes_validation_from_the_gold_file_and_drops_leaks(tmp_path: Path) -> None:
    gold = train_text.TextRows(tmp_path / "g.csv", [f"text {i}" for i in range(20)], np.array([0, 1] * 10))
    extra = train_text.TextRows(tmp_path / "e.csv", [f"text {i}" for i in range(20)] + ["new"],
                                np.array([0, 1] * 10 + [0]))
    for dedup in (False, True):
        split = train_text.split_rows([gold, extra], "4", True, seed=0, dedup=dedup)
        assert len(split.val_texts) == 4 and sorted(split.y_val.tolist()) == [0, 0, 1, 1]
        assert not set(split.val_texts) & set(split.train_texts)  # extra copies of validation texts were dropped
        assert split.dropped == 4 and split.moved == 0
        assert len(split.train_texts) == len(split.y_train) == len(split.train_keys) == 16 + 17


STORY = ("Investigators are closely scrutinizing the role of major international banks in the collapse of the "
         "Italian dairy group, a newspaper said on Tuesday.")


def test_dedup_key_ignores_agency_datelines_entities_and_punctuation() -> None:
    key = train_text.dedup_key(STORY)
    assert key == train_text.dedup_key(f" NEW YORK (Reuters) - {STORY.upper()}")
    assert key == train_text.dedup_key(f"Reuters - {STORY.replace(' the ', ' the  ').replace(',', ' ,')}")
    assert key == train_text.dedup_key(f"By JOHN SMITH    MILAN (AP) -- {STORY}")
    assert key == train_text.dedup_key(STORY.replace("the role", "the\\role"))  # AG News' backslash line break
    assert train_text.dedup_key("Brazil #39;s rate &lt;BR&gt;") == train_text.dedup_key("Brazil's rate <BR>")
    assert train_text.dedup_key("Oil prices fell.") != key and train_text.dedup_key("AP -") == ""
    # words are kept: a different story is a different key
    assert train_text.dedup_key(STORY.replace("Tuesday", "Monday")) != key


def test_near_duplicates_are_equal_keys_or_long_tails() -> None:
    key = train_text.dedup_key(STORY)
    titled = train_text.dedup_key(f"Banks' Role Eyed in Parmalat Scandal {STORY}")  # a title-less "title story" row
    short = "a newspaper said on tuesday"
    mask = train_text.near_duplicate_mask([key, titled, short, "", "unrelated words"], [titled, "", short + " too"])
    assert mask.tolist() == [True, True, False, False, False]  # a short tail (5 words) is not enough
    assert train_text.near_duplicate_mask([titled], [key]).tolist() == [True]  # either side may hold the title
    assert train_text.near_duplicate_mask([short], [short]).tolist() == [True]  # equal keys match at any length


def test_dedup_split_moves_near_duplicates_out_of_validation(tmp_path: Path) -> None:
    """Validation rows whose story (normalised description) is in training move to training; the old split
    (models trained before the rule) keeps them, which is what the evaluation of those models must undo."""
    n = 40
    stories = [f"story {i} " + " ".join(f"w{i}x{j}" for j in range(12)) for i in range(n)]
    gold = train_text.TextRows(tmp_path / "g.csv", [f"Title {i} {d}" for i, d in enumerate(stories)],
                               np.array([0, 1] * (n // 2)), [train_text.dedup_key(d) for d in stories])
    # the extra file repeats every story as a title-less "other title + description" row with an agency tag
    texts = [f"Other title {i} (Reuters) Reuters - {d}" for i, d in enumerate(stories)]
    extra = train_text.TextRows(tmp_path / "e.csv", texts, np.array([0, 1] * (n // 2)),
                                [train_text.dedup_key(t) for t in texts])
    old = train_text.split_rows([gold, extra], "10", True, seed=0, dedup=False)
    assert len(old.val_texts) == 10 and train_text.near_duplicate_mask(old.val_keys, old.train_keys).all()
    new = train_text.split_rows([gold, extra], "10", True, seed=0, dedup=True)
    assert new.moved == 10 and new.val_texts == [] and len(new.train_texts) == 2 * n
    assert sorted(new.train_texts) == sorted(old.train_texts + old.val_texts)  # moved, not lost
    # only the stories repeated in training move; the others stay in validation
    partial = train_text.TextRows(tmp_path / "p.csv", texts[: n // 2], np.array([0, 1] * (n // 4)),
                                  [train_text.dedup_key(t) for t in texts[: n // 2]])
    split = train_text.split_rows([gold, partial], "10", True, seed=0, dedup=True)
    repeated = {train_text.dedup_key(d) for d in stories[: n // 2]}
    assert split.moved == sum(k in repeated for k in old.val_keys) and 0 < split.moved < 10
    assert not train_text.near_duplicate_mask(split.val_keys, split.train_keys).any()
    assert len(split.val_texts) + split.moved == 10 and len(split.y_val) == len(split.val_texts)


def test_dedup_split_repeats_until_no_near_duplicate_is_left(tmp_path: Path) -> None:
    """A moved row can be the near-duplicate of another validation row that has none in training (a chain
    of tails): that one moves too."""
    story = " ".join(f"w{j}" for j in range(12))
    v1, v2, t = story, f"other title {story}", f"a title {story}"  # v1 ~ t and v1 ~ v2, but not v2 ~ t
    assert train_text.near_duplicate_mask([v2], [t]).tolist() == [False]
    gold_texts = [v1, v2, "filler zero", "filler one"]
    gold = train_text.TextRows(tmp_path / "g.csv", gold_texts, np.array([0, 1, 0, 1]))
    extra = train_text.TextRows(tmp_path / "e.csv", [t], np.array([0]))
    seed = next(sd for sd in range(50)  # a seed whose validation rows are v1 and v2
                if train_text.split_rows([gold, extra], "2", True, sd, dedup=False).val_texts == [v1, v2])
    split = train_text.split_rows([gold, extra], "2", True, seed, dedup=True)
    assert split.moved == 2 and split.val_texts == [] and set(split.train_texts) >= {v1, v2, t}


def tiny_word_cnn_args(data: tuple[Path, Path, Path], out: Path, weights: Path, name: str, *, width: int,
                       buckets: int, epochs: int, extra: list[str] | None = None) -> list[str]:
    """A small word-cnn run on the generated CSVs (word dim = filters = width), installed into `weights`."""
    gold, extra_csv, classes = data
    return ["--train", str(gold), "--train", str(extra_csv), "--classes", str(classes), "--out", str(out),
            "--name", name, "--family", "word-cnn", "--word-dim", str(width), "--filters", str(width),
            "--buckets", str(buckets), "--min-count", "1", "--epochs", str(epochs), "--batch-size", "16",
            "--val-size", "30", "--optimizer", "adamw", "--lr", "1e-2", "--threads", "1", "--seed", "0",
            "--device", "cpu", *(extra or []), "--install", str(weights)]


def test_bad_name_is_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        train_text.parse_args(["--train", "x.csv", "--out", str(tmp_path), "--name", "bad name/with slash"])


def test_word_cnn_trains_installs_and_serves_through_the_registry(tmp_path: Path,
                                                                   data: tuple[Path, Path, Path]) -> None:
    """The word-level family end to end: vocabulary from training rows only, stored in the weights file, the
    manifest entry's word encoding, and the registry serving it (unknown words included) and through the app."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.runtime.registry import ModelRegistry
    from app.settings import Settings
    from models.text import WordCNN, WordSpec
    from models.text.words import vocabulary_from_tensor, vocabulary_sha256
    from tests.conftest import wait_ready

    out, weights = tmp_path / "run", tmp_path / "weights"
    report = train_text.main(tiny_word_cnn_args(data, out, weights, "tiny-words", width=32, buckets=2048, epochs=12))
    assert report["val_accuracy"] > 0.8, report["history"]
    assert len((out / "log.jsonl").read_text().splitlines()) == 12
    entry = load_manifest(weights)["tiny-words"]
    enc = (entry.model_extra or {})["encoding"]
    assert entry.family == "word-cnn" and enc["kind"] == "words"
    spec = WordSpec.from_dict(enc)
    sd = torch.load(weights / entry.file, weights_only=True)
    words = vocabulary_from_tensor(sd["vocabulary"])
    assert vocabulary_sha256(words) == spec.vocabulary_sha256 and len(words) + 2 == spec.vocab_size
    # the vocabulary holds training words only: no word that appears only in hold-out texts
    split = train_text.holdout_split(train_text.holdout_from_training(entry.training, "tiny-words"), CLASSES)
    train_words = {w for t in split.train_texts for w in spec.tokens(t)}
    assert set(words) <= train_words and "football" in words

    registry = ModelRegistry(weights, tmp_path / "th", torch.device("cpu"), allow_download=False,
                             allow_untrained=False)
    state = registry.load("tiny-words", "text-classification")
    assert state.status == "ready" and state.loaded is not None, state.reason
    loaded = state.loaded
    assert isinstance(loaded.model, WordCNN) and loaded.weights_tag == "trained"
    probs = loaded.forward(["Football: a late goal wins the match", "Stocks fall as market shares slide",
                            "Senate election: the vote is close", "Zzyzx qwerty unseenword"])
    pred = [int(p.argmax()) for p in probs]
    assert pred[:3] == [0, 1, 2], pred
    assert all(abs(float(p.sum()) - 1.0) < 1e-5 for p in probs)

    # served by the app under its name; the window is the encoding's token count
    s = Settings(weights_dir=weights, text_models=["tiny-words"], classifiers=[], face_models=[],
                 torch_home=tmp_path / "th", device="cpu", data_dir=tmp_path / "data", style_workers=0,
                 ready_requires=["text"])
    with TestClient(create_app(s)) as c:
        wait_ready(c)
        r = c.post("/text/classify", json={"texts": ["the football match ended with a goal", "word " * 300],
                                           "top_k": 1})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "tiny-words" and body["weights"] == "trained" and body["window"] == spec.max_words
        assert body["window_unit"] == "tokens"
        assert body["results"][0]["top_k"][0]["label"] == "Sports"
        assert [x["truncated"] for x in body["results"]] == [False, True]


def test_inner_val_runs_never_read_the_holdout(tmp_path: Path, data: tuple[Path, Path, Path]) -> None:
    gold, extra, classes = data
    common = ["--train", str(gold), "--train", str(extra), "--classes", str(classes), "--family", "word-cnn",
              "--word-dim", "8", "--filters", "8", "--buckets", "256", "--min-count", "1", "--epochs", "1",
              "--batch-size", "16", "--val-size", "30", "--threads", "1", "--device", "cpu"]
    with pytest.raises(SystemExit):
        train_text.parse_args([*common, "--out", str(tmp_path / "x"), "--inner-val", "12",
                               "--install", str(tmp_path / "w")])
    report = train_text.main([*common, "--out", str(tmp_path / "inner"), "--inner-val", "12"])
    assert report["val_rows"] == 12 and "inner split" in report["validation"]
    # the 30 hold-out rows are neither trained on nor validated on: 90 gold - 30 hold-out - 12 inner + 18 extra
    assert report["train_rows"] == 90 - 30 - 12 + 18
    args = train_text.parse_args([*common, "--out", str(tmp_path / "inner")])
    _, rows = train_text.load_rows(args)
    outer = train_text.split_rows(rows, "30", True, 0)
    inner = train_text.inner_split(outer, "12", 0)
    assert not set(inner.val_texts) & set(outer.val_texts) and not set(inner.train_texts) & set(outer.val_texts)
    assert set(inner.val_texts) <= set(outer.train_texts[: outer.first_train_rows])


def test_word_pool_max_mean_is_recorded_in_the_arch_and_served(tmp_path: Path, data: tuple[Path, Path, Path]) -> None:
    """--word-pool max-mean trains, lands in the manifest's arch, and the registry rebuilds that network; the
    shipped max-pooling arch records no pooling key."""
    from app.runtime.registry import ModelRegistry
    from models.text import WordCNN

    out, weights = tmp_path / "run", tmp_path / "weights"
    report = train_text.main(tiny_word_cnn_args(data, out, weights, "tiny-maxmean", width=16, buckets=1024, epochs=8,
                                                extra=["--word-pool", "max-mean"]))
    assert report["val_accuracy"] > 0.8, report["history"]
    entry = load_manifest(weights)["tiny-maxmean"]
    assert entry.arch["pooling"] == "max-mean"
    registry = ModelRegistry(weights, tmp_path / "th", torch.device("cpu"), allow_download=False,
                             allow_untrained=False)
    state = registry.load("tiny-maxmean", "text-classification")
    assert state.status == "ready" and state.loaded is not None, state.reason
    model = state.loaded.model
    assert isinstance(model, WordCNN) and model.members[0].pooling == "max-mean"
    assert model.members[0].fc.in_features == 2 * 16 * 4
    plain = train_text.parse_args(["--train", "x.csv", "--out", str(tmp_path), "--family", "word-cnn"])
    assert "pooling" not in train_text.arch_from_args(plain, 3, 10)
    with pytest.raises(SystemExit):
        train_text.parse_args(["--train", "x.csv", "--out", str(tmp_path), "--word-pool", "max-mean"])  # vdcnn
