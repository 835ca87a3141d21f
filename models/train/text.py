"""Train a text CNN (VDCNN, the Zhang et al. char-CNN, or the Kim-style word-cnn) on CSV files.

    python -m models.train.text --train ../shared/data/agnews/train.csv \\
        --train ../shared/data/agnews/train_extra_concat.csv --classes ../shared/data/agnews/classes.txt \\
        --out runs/ag-news-vdcnn9 --name ag-news-vdcnn9 --family vdcnn --depth 9

The default CSV layout is AG News' (no header; "class","title","description"; 1-based class;
a backslash followed by "n" inside a text means a newline): the text is the title and the
description joined by a space, whichever is non-empty. Other CSV files work with --label-column
and --text-columns (1-based positions, or names with --header); a label is a class name from
--classes or a 1-based index into it.

The validation split is stratified and, by default, drawn only from the first --train file (the
gold file); rows of later files only ever go to training, and training rows whose text equals a
validation text are dropped so the validation accuracy stays honest. Near-duplicates go further: a
validation row whose normalised description (see `dedup_key`) matches a training row's (the same story
under another title or with another agency dateline) is moved to the training side, so no validation
row has a near-duplicate in training (manifest: training.dedup = "description-normalised"; models
trained before had the old, exact-text split, which `holdout_split` still rebuilds). Every row is encoded once
into an index tensor kept in memory (on the GPU when training there). Every epoch writes a
resumable checkpoint and a line of metrics; rerunning the same command resumes. When training
ends the command writes a report (validation accuracy, per-class precision/recall/F1, confusion
matrix as a table and a PNG, wall time, hardware), the weights file and the manifest entry.

The word-cnn (`models.text.wordcnn`) builds its vocabulary from the training rows of the split only (words
seen --min-count times) and stores it in its state dict. --inner-val N is for choosing hyper-parameters: it
splits the training rows again (N validation rows from the first file's training rows, de-duplicated the same
way), trains on the rest and reports on those N rows; the model's real hold-out is not read at all, and such
a run cannot be installed.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import html
import json
import math
import platform
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.text import ALPHABETS, CharSpec, WordCNN, WordEncoder, WordSpec, build_text_model, count_parameters
from models.text.vdcnn import BLOCKS_PER_DEPTH, POOLINGS
from models.text.wordcnn import POOLINGS as WORD_POOLINGS
from models.text.words import build_vocabulary, vocabulary_sha256
from models.train.common import (
    atomic_save,
    confusion_matrix,
    confusion_table,
    hardware_description,
    plot_confusion,
    progress,
    save_weights,
    start_run,
    stratified_split,
)
from models.train.images import lr_at, publish_run

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # the manifest's rule for model names
DEFAULT_LR = {"sgd": 0.01, "adamw": 1e-3}  # SGD: the value of both papers
DEFAULT_WEIGHT_DECAY = {"sgd": 1e-4, "adamw": 0.05}
ENCODE_CHUNK = 4096


# The validation split's de-duplication rule, recorded in the manifest (training.dedup) of models trained with it.
DEDUP_RULE = "description-normalised"
# Near-duplicates that are not the same normalised description: one ends the other with at least this many words.
MIN_TAIL_WORDS = 10
# A leading dateline and/or byline ending in the agency in parentheses ("NEW YORK (Reuters) -", "By MATT SLAGLE
# DALLAS (AP) --"), or a bare source of at most three words ("AP -", "Reuters -", "PC World -").
_SOURCE_PREFIX = re.compile(r"^\s*(?:[^()\n]{0,60}?\([^()\n]{1,40}\)|[A-Za-z][\w.&']*(?: [A-Za-z][\w.&']*){0,2})"
                            r"\s*-{1,2}(?:\s+|$)")
_LOST_AMPERSAND = re.compile(r"(?<![&\w])#(\d{2,5});")  # AG News' "&#39;" that lost its "&": " #39;s"
_NOT_WORD = re.compile(r"[\W_]+")


@dataclass
class TextRows:
    """Texts and integer labels read from one CSV file; `keys` are the rows' de-duplication keys (see
    `read_csv_with_keys`; `dedup_key` of the whole text when not given)."""

    path: Path
    texts: list[str]
    labels: np.ndarray
    keys: list[str] | None = field(default=None)

    def dedup_keys(self) -> list[str]:
        """The rows' de-duplication keys."""
        return self.keys if self.keys is not None else [dedup_key(t) for t in self.texts]


def dedup_key(description: str) -> str:
    """A description normalised so that copies of one story from different feeds compare equal: HTML
    entities decoded (also AG News' " #39;" whose "&" was lost), a leading agency dateline or source
    ("NEW YORK (Reuters) -", "AP -") removed, lower-cased, every run of punctuation, backslashes and white
    space turned into one space."""
    s = _LOST_AMPERSAND.sub(lambda m: chr(int(m.group(1))) if int(m.group(1)) < 0x110000 else m.group(0),
                            description)
    s = _SOURCE_PREFIX.sub("", html.unescape(s), count=1)
    return " ".join(_NOT_WORD.sub(" ", s.lower()).split())


def _tails(key: str, min_words: int) -> list[str]:
    """The proper word-suffixes of a key that still have at least min_words words."""
    starts = [i + 1 for i, ch in enumerate(key) if ch == " "]
    n_words = len(starts) + 1
    return [key[s:] for j, s in enumerate(starts) if n_words - j - 1 >= min_words]


def near_duplicate_mask(keys: list[str], others: list[str], min_words: int = MIN_TAIL_WORDS) -> np.ndarray:
    """For every key, whether some key in `others` is a near-duplicate of it: the same (non-empty) key, or one
    key ends the other with at least min_words words (a title glued in front of the same description, as in
    AG News' title-less rows that hold "title description")."""
    full: dict[str, list[int]] = {}
    tails: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        if k:
            full.setdefault(k, []).append(i)
            for t in _tails(k, min_words):
                tails.setdefault(t, []).append(i)
    hit = np.zeros(len(keys), dtype=bool)
    for o in others:
        if not o:
            continue
        for i in tails.get(o, ()):
            hit[i] = True
        for t in (o, *_tails(o, min_words)):
            for i in full.get(t, ()):
                hit[i] = True
    return hit


def read_classes(path: Path) -> list[str]:
    """Class names, one per non-empty line, in order (line 1 is class 1)."""
    names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if len(names) < 2:
        raise SystemExit(f"{path}: need at least two class names, found {names}")
    if len(set(names)) != len(names):
        raise SystemExit(f"{path}: class names repeat")
    return names


def unescape_newlines(text: str) -> str:
    """Turn AG News' two-character escape backslash + "n" into a newline."""
    return text.replace("\\n", "\n")


def _column_index(spec: str, header: list[str] | None, path: Path) -> int:
    """Zero-based index of a column given as a 1-based position or (with a header) a name."""
    if header is not None and spec in header:
        return header.index(spec)
    if spec.isdigit() and int(spec) >= 1:
        return int(spec) - 1
    raise SystemExit(f"{path}: no column {spec!r}" + (f" (header: {header})" if header is not None else ""))


def read_csv(path: Path, *, label_column: str, text_columns: list[str], header: bool, unescape: bool,
             encoding: str, limit: int = 0) -> tuple[list[str], list[str]]:
    """Raw label strings and joined texts of a CSV file (errors name the file and line)."""
    labels, texts, _ = read_csv_with_keys(path, label_column=label_column, text_columns=text_columns, header=header,
                                          unescape=unescape, encoding=encoding, limit=limit)
    return labels, texts


def read_csv_with_keys(path: Path, *, label_column: str, text_columns: list[str], header: bool, unescape: bool,
                       encoding: str, limit: int = 0) -> tuple[list[str], list[str], list[str]]:
    """Raw label strings, joined texts and de-duplication keys (`dedup_key` of the last text column, the
    description in AG News' layout, or of the whole text where that column is empty) of a CSV file."""
    csv.field_size_limit(2**31 - 1)
    labels: list[str] = []
    texts: list[str] = []
    keys: list[str] = []
    with open(path, encoding=encoding, newline="") as fh:
        reader = csv.reader(fh)
        head = next(reader, None) if header else None
        li = _column_index(label_column, head, path)
        tis = [_column_index(c, head, path) for c in text_columns]
        need = max([li, *tis]) + 1
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            if len(row) < need:
                raise SystemExit(f"{path}:{reader.line_num}: expected at least {need} columns, got {len(row)}")
            text = " ".join(part for part in (row[i].strip() for i in tis) if part)
            texts.append(unescape_newlines(text) if unescape else text)
            desc = row[tis[-1]].strip() or text  # a row without a description: its whole text
            keys.append(dedup_key(unescape_newlines(desc) if unescape else desc))
            labels.append(row[li].strip())
            if limit and len(texts) >= limit:
                break
    if not texts:
        raise SystemExit(f"{path}: no rows")
    return labels, texts, keys


def map_labels(raw: list[str], classes: list[str], label_base: int | None, path: Path) -> np.ndarray:
    """Integer class indices for raw labels that are class names or (label_base-based) numbers."""
    by_name = {c: i for i, c in enumerate(classes)}
    out = np.empty(len(raw), dtype=np.int64)
    for i, value in enumerate(raw):
        if value in by_name:
            out[i] = by_name[value]
        elif label_base is not None and value.isdigit() and 0 <= int(value) - label_base < len(classes):
            out[i] = int(value) - label_base
        else:
            allowed = "" if label_base is None else f" nor a number in {label_base}..{label_base + len(classes) - 1}"
            raise SystemExit(f"{path}: data row {i + 1}: label {value!r} is neither a class name{allowed}")
    return out


def load_rows(args: argparse.Namespace) -> tuple[list[str], list[TextRows]]:
    """Class names and the rows of every --train file, labels mapped to indices."""
    text_columns = [c.strip() for c in args.text_columns.split(",") if c.strip()]
    read = [read_csv_with_keys(p, label_column=args.label_column, text_columns=text_columns, header=args.header,
                               unescape=args.unescape_newlines, encoding=args.encoding, limit=args.limit_per_file)
            for p in args.train]
    raw = [(labels, texts) for labels, texts, _ in read]
    base: int | None = args.label_base
    if args.classes is not None:
        classes = read_classes(args.classes)
    else:
        # no class list: the distinct labels, numbers in numeric order, and every label is a name
        values = {v for labels, _ in raw for v in labels}
        classes = sorted(values, key=lambda v: (0, int(v), "") if v.isdigit() else (1, 0, v))
        base = None
        if len(classes) < 2:
            raise SystemExit(f"need at least two classes, found {classes}")
    rows = [TextRows(p, texts, map_labels(labels, classes, base, p), keys)
            for p, (labels, texts, keys) in zip(args.train, read, strict=True)]
    return classes, rows


def parse_val_size(value: str, n: int) -> int:
    """A validation size given as a count ("1500") or a fraction ("0.1") of n rows."""
    try:
        v = float(value)
    except ValueError:
        raise SystemExit(f"--val-size {value!r}: give a row count or a fraction") from None
    k = round(v * n) if 0 < v < 1 else int(v)
    if not 0 < k < n:
        raise SystemExit(f"--val-size {value} gives {k} validation rows out of {n}")
    return k


@dataclass
class TextSplit:
    """The trainer's (train, validation) split of the rows, with what its de-duplication did."""

    train_texts: list[str]
    y_train: np.ndarray
    val_texts: list[str]
    y_val: np.ndarray
    train_keys: list[str]
    val_keys: list[str]
    dropped: int  # training rows dropped as exact copies of a validation text
    moved: int  # validation rows moved to training as near-duplicates of a training row (dedup only)
    first_train_rows: int = 0  # the leading training rows that come from the first file's split (val_from_first)


def split_rows(rows: list[TextRows], val_size: str, val_from_first: bool, seed: int,
               dedup: bool = True) -> TextSplit:
    """The stratified split: validation rows from the first file (or all files), training copies of a
    validation text dropped and, with dedup (new runs), validation rows that have a near-duplicate in
    training (`near_duplicate_mask` of `dedup_key`) moved to training until none is left. dedup=False is
    the split of models trained before (their manifest has no training.dedup)."""
    pool = rows[:1] if val_from_first else rows
    texts = [t for r in pool for t in r.texts]
    keys = [k for r in pool for k in r.dedup_keys()]
    labels = np.concatenate([r.labels for r in pool])
    tr, va = stratified_split(labels, parse_val_size(val_size, len(labels)), seed)
    val_texts = [texts[i] for i in va]
    val_keys = [keys[i] for i in va]
    y_val = labels[va]
    train_texts = [texts[i] for i in tr]
    train_keys = [keys[i] for i in tr]
    train_labels = [labels[tr]]
    for r in (rows[1:] if val_from_first else []):
        train_texts += r.texts
        train_keys += r.dedup_keys()
        train_labels.append(r.labels)
    y_train = np.concatenate(train_labels)
    # a text seen in training must not be graded in validation (files can overlap, rows can repeat)
    seen = set(val_texts)
    keep = np.array([t not in seen for t in train_texts], dtype=bool)
    dropped = int((~keep).sum())
    train_texts = [t for t, k in zip(train_texts, keep, strict=True) if k]
    train_keys = [t for t, k in zip(train_keys, keep, strict=True) if k]
    y_train = y_train[keep]
    first_train_rows = int(keep[: len(tr)].sum()) if val_from_first else 0
    moved = 0
    new_keys = train_keys
    while dedup and new_keys:
        # a moved row can be the near-duplicate of another validation row: repeat against the rows just moved
        near = near_duplicate_mask(val_keys, new_keys)
        if not near.any():
            break
        idx = np.flatnonzero(near)
        new_keys = [val_keys[i] for i in idx]
        train_texts += [val_texts[i] for i in idx]
        train_keys += new_keys
        y_train = np.concatenate([y_train, y_val[idx]])
        stay = ~near
        val_texts = [t for t, k in zip(val_texts, stay, strict=True) if k]
        val_keys = [t for t, k in zip(val_keys, stay, strict=True) if k]
        y_val = y_val[stay]
        moved += len(idx)
    return TextSplit(train_texts, y_train, val_texts, y_val, train_keys, val_keys, dropped, moved, first_train_rows)


def inner_split(split: TextSplit, val_size: str, seed: int) -> TextSplit:
    """A split of a split's training rows only, for choosing hyper-parameters without the hold-out: validation
    rows drawn from the first file's training rows, de-duplicated as split_rows does (the other training rows,
    and the rows moved out of the hold-out, only train)."""
    n = split.first_train_rows
    if n <= 0:
        raise SystemExit("--inner-val needs validation from the first file (--val-from-first)")
    gold = TextRows(Path("<first file's training rows>"), split.train_texts[:n], split.y_train[:n],
                    split.train_keys[:n])
    rest = TextRows(Path("<other training rows>"), split.train_texts[n:], split.y_train[n:], split.train_keys[n:])
    return split_rows([gold, rest], val_size, True, seed, dedup=True)


# The CSV layout of models whose manifest entry does not record one: the trainer's defaults (AG News).
DEFAULT_CSV = {"label_column": "1", "text_columns": "2,3", "header": False, "label_base": 1,
               "unescape_newlines": True, "encoding": "utf-8-sig", "limit_per_file": 0}


@dataclass
class TextHoldout:
    """Where a trained text model's hold-out comes from, read from its manifest entry's training info."""

    files: list[Path]
    rows: list[int]
    train_rows: int
    val_rows: int
    val_size: str
    val_from_first: bool
    seed: int
    dedup: bool
    csv: dict[str, Any]


def holdout_from_training(training: dict[str, Any], name: str) -> TextHoldout:
    """The split parameters a text model was validated with, refusing when the manifest entry lacks them."""
    seed: Any = (training.get("recipe") or {}).get("seed")
    data, rows = training.get("data"), training.get("rows")
    val_rows: Any = training.get("val_rows")
    train_rows: Any = training.get("train_rows")
    val_from = training.get("val_from")
    missing = [k for k, v in (("data", data), ("rows", rows), ("train_rows", train_rows), ("val_rows", val_rows),
                              ("val_from", val_from), ("recipe.seed", seed)) if v is None]
    if missing or not isinstance(data, list) or not isinstance(rows, dict):
        raise SystemExit(f"{name}: its manifest entry's training info lacks {', '.join(missing) or 'a file list'}, "
                         "so its hold-out cannot be rebuilt")
    dedup = training.get("dedup")
    if dedup not in (None, DEDUP_RULE):
        raise SystemExit(f"{name}: unknown de-duplication rule {dedup!r} (this version knows {DEDUP_RULE!r})")
    if dedup is not None and training.get("val_size") is None:
        raise SystemExit(f"{name}: its manifest entry's training info lacks val_size, so its hold-out cannot be "
                         "rebuilt")
    # before dedup every requested validation row stayed in validation: the count is the requested size
    val_size = str(training.get("val_size") or val_rows)
    return TextHoldout(files=[Path(str(p)) for p in data], rows=[int(rows.get(str(p), -1)) for p in data],
                       train_rows=int(train_rows), val_rows=int(val_rows), val_size=val_size,
                       val_from_first=val_from != "all", seed=int(seed), dedup=dedup is not None,
                       csv=DEFAULT_CSV | dict(training.get("csv") or {}))


def holdout_split(holdout: TextHoldout, classes: list[str]) -> TextSplit:
    """Exactly the split a text model was trained and validated with, from its training files (refusing files
    whose row counts, or a split whose sizes, differ from what its manifest entry records)."""
    c = holdout.csv
    text_columns = [x.strip() for x in str(c["text_columns"]).split(",") if x.strip()]
    rows: list[TextRows] = []
    for path, expected in zip(holdout.files, holdout.rows, strict=True):
        if not path.is_file():
            raise SystemExit(f"{path}: no such file (a training file of the model)")
        raw, texts, keys = read_csv_with_keys(path, label_column=str(c["label_column"]), text_columns=text_columns,
                                              header=bool(c["header"]), unescape=bool(c["unescape_newlines"]),
                                              encoding=str(c["encoding"]), limit=int(c["limit_per_file"]))
        if len(texts) != expected:
            raise SystemExit(f"{path} has {len(texts)} rows, the model trained with {expected}: not its data")
        base = c["label_base"]
        rows.append(TextRows(path, texts, map_labels(raw, classes, None if base is None else int(base), path), keys))
    split = split_rows(rows, holdout.val_size, holdout.val_from_first, holdout.seed, dedup=holdout.dedup)
    if (len(split.val_texts), len(split.train_texts)) != (holdout.val_rows, holdout.train_rows):
        raise SystemExit(f"rebuilt split has {len(split.train_texts)} train / {len(split.val_texts)} validation rows, "
                         f"the model's had {holdout.train_rows} / {holdout.val_rows}: not its hold-out")
    return split


class EncodedTexts:
    """Encoded texts kept compactly in memory (character indices as uint8; for words, token-type ids and a
    table of the types' encoder rows); `batch` gives the model's input for some rows."""

    def __init__(self, data: torch.Tensor, lengths: torch.Tensor | None = None,
                 table: torch.Tensor | None = None) -> None:
        self.data, self.lengths, self.table = data, lengths, table

    def __len__(self) -> int:
        return len(self.data)

    def to(self, device: torch.device) -> EncodedTexts:
        """The same texts on a device."""
        move = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return EncodedTexts(self.data.to(device), move(self.lengths), move(self.table))

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        """The model's LongTensor input for rows idx (word rows cut to the longest text among them)."""
        if self.table is None:
            return self.data[idx].long()
        assert self.lengths is not None
        width = max(1, int(self.lengths[idx].max())) if len(idx) else 1
        return self.table[self.data[idx][:, :width].long()]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """The model's input for rows start..stop-1."""
        return self.batch(torch.arange(start, min(stop, len(self)), device=self.data.device))


def encode_texts(encoder: CharSpec | WordEncoder, texts: list[str]) -> EncodedTexts:
    """Encode every text once (see EncodedTexts)."""
    if isinstance(encoder, WordEncoder):
        ids, lengths, table = encoder.encode_corpus(texts)
        return EncodedTexts(ids, lengths, table)
    return EncodedTexts(encode_all(encoder, texts))


def encode_all(spec: CharSpec, texts: list[str]) -> torch.Tensor:
    """Encode every text once, stored as the smallest integer type that holds the vocabulary."""
    dtype = torch.uint8 if spec.vocab_size <= 256 else torch.int32
    out = torch.empty((len(texts), spec.length), dtype=dtype)
    chunks = range(0, len(texts), ENCODE_CHUNK)
    for i in progress(chunks, desc="encode", unit="chunk", total=len(chunks), disable=len(chunks) < 4):
        out[i : i + ENCODE_CHUNK] = spec.encode(texts[i : i + ENCODE_CHUNK]).to(dtype)
    return out


def arch_from_args(args: argparse.Namespace, num_classes: int, vocab_size: int) -> dict[str, Any]:
    """Every keyword the model builder needs to rebuild the network (the manifest's "arch")."""
    if args.family == "vdcnn":
        arch: dict[str, Any] = {"depth": args.depth, "pool": args.pool, "shortcut": args.shortcut,
                                "hidden": args.hidden, "embedding_dim": 16, "k": 8}
    elif args.family == "word-cnn":
        arch = {"buckets": args.buckets, "dim": args.word_dim, "widths": parse_ints(args.widths, "--widths"),
                "filters": args.filters, "dropout": args.dropout, "members": args.members}
        if args.word_pool != "max":  # only then: the shipped model's arch and its runs' fingerprints stay unchanged
            arch["pooling"] = args.word_pool
    else:
        arch = {"size": args.size, "length": args.length, "input": args.input, "dropout": 0.5}
    return arch | {"num_classes": num_classes, "vocab_size": vocab_size}


def parse_ints(value: str, flag: str) -> list[int]:
    """Comma-separated positive integers ("2,3,4,5")."""
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{flag} {value!r}: give comma-separated integers") from None
    if not out or min(out) < 1:
        raise SystemExit(f"{flag} {value!r}: give positive integers")
    return out


def word_encoder(args: argparse.Namespace, train_texts: list[str]) -> WordEncoder:
    """The word encoding with its vocabulary, built from the training texts only."""
    n_min, n_max = parse_ints(args.ngrams, "--ngrams") if args.buckets else (3, 5)
    base = WordSpec(max_words=args.max_words, min_n=n_min, max_n=n_max, buckets=args.buckets,
                    max_subwords=args.max_subwords)
    words = build_vocabulary(base, train_texts, min_count=args.min_count, max_size=args.max_vocab)
    spec = replace(base, vocab_size=len(words) + 2, vocabulary_sha256=vocabulary_sha256(words))
    return WordEncoder(spec, words)


def step_lr(epoch: int, peak: float, every: int, gamma: float) -> float:
    """The papers' schedule: the learning rate times gamma every `every` epochs."""
    return peak * gamma ** (epoch // max(1, every))


@torch.no_grad()
def predict(model: torch.nn.Module, x: EncodedTexts, batch: int, device: torch.device, amp: bool) -> torch.Tensor:
    """Class probabilities (float32, on the CPU) for encoded texts."""
    model.eval()
    outs = []
    for i in range(0, len(x), batch):
        xb = x.rows(i, i + batch).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            outs.append(model(xb).float().softmax(-1).cpu())
    return torch.cat(outs)


def per_class_metrics(cm: np.ndarray, classes: list[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support of each class from a confusion matrix."""
    out = {}
    for i, c in enumerate(classes):
        tp = float(cm[i, i])
        pred, true = float(cm[:, i].sum()), float(cm[i].sum())
        p = tp / pred if pred else 0.0
        r = tp / true if true else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        out[c] = {"precision": p, "recall": r, "f1": f1, "support": int(true)}
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--train", type=Path, action="append", required=True,
                   help="training CSV; repeat for more files (the first is the gold file for validation)")
    g.add_argument("--classes", type=Path, default=None,
                   help="class names, one per line (line 1 = class 1); default: the distinct labels, sorted")
    g.add_argument("--label-column", default="1", help="1-based position or (with --header) name")
    g.add_argument("--text-columns", default="2,3", help="comma-separated positions or names, joined by a space")
    g.add_argument("--header", action="store_true", help="the CSV files start with a header row")
    g.add_argument("--label-base", type=int, default=1, help="the number of the first class in numeric labels")
    g.add_argument("--unescape-newlines", action=argparse.BooleanOptionalAction, default=True,
                   help="turn backslash-n inside texts into a newline (AG News' escape)")
    g.add_argument("--encoding", default="utf-8-sig", help="text encoding of the CSV files")
    g.add_argument("--val-size", default="1500", help="validation rows: a count or a fraction (0.1)")
    g.add_argument("--val-from-first", action=argparse.BooleanOptionalAction, default=True,
                   help="draw validation rows only from the first --train file")
    g.add_argument("--limit-per-file", type=int, default=0, help="read at most N rows per file (smoke runs)")
    g.add_argument("--inner-val", default=None,
                   help="hyper-parameter selection: validate on this many rows (count or fraction) split off the "
                        "training rows; the hold-out is not read; cannot be installed")
    g = p.add_argument_group("encoding")
    g.add_argument("--alphabet", default="zhang", choices=sorted(ALPHABETS),
                   help="zhang: the 69 distinct characters of Zhang et al. 2015 incl. newline; zhang+space adds ' '")
    g.add_argument("--length", type=int, default=1014, help="characters per text (truncate / pad)")
    g.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--unknown", choices=["index", "skip", "zero"], default="index",
                   help="characters outside the alphabet: own index, dropped, or the zero/padding vector")
    g = p.add_argument_group("model")
    g.add_argument("--out", type=Path, required=True, help="run directory (checkpoint, log, report)")
    g.add_argument("--name", default=None, help="model name for the manifest (default: <data folder>-<model>)")
    g.add_argument("--family", choices=["vdcnn", "char-cnn", "word-cnn"], default="vdcnn")
    g.add_argument("--depth", type=int, choices=sorted(BLOCKS_PER_DEPTH), default=9, help="VDCNN depth")
    g.add_argument("--pool", choices=list(POOLINGS), default="max", help="VDCNN down-sampling between stages")
    g.add_argument("--shortcut", action="store_true", help="VDCNN residual shortcuts")
    g.add_argument("--hidden", type=int, default=2048, help="VDCNN fully connected width (paper: 2048)")
    g.add_argument("--size", choices=["small", "large"], default="small", help="char-CNN size")
    g.add_argument("--input", choices=["onehot", "embedding"], default="onehot", help="char-CNN input")
    g = p.add_argument_group("word-cnn (Kim 2014 + fastText-style character n-grams)")
    g.add_argument("--word-dim", type=int, default=64, help="word and n-gram embedding width")
    g.add_argument("--widths", default="2,3,4,5", help="convolution widths in words (2: bigrams)")
    g.add_argument("--filters", type=int, default=128, help="feature maps per width")
    g.add_argument("--dropout", type=float, default=0.5, help="dropout before the classifier")
    g.add_argument("--members", type=int, default=1, help="networks averaged in one model (probability average)")
    g.add_argument("--word-pool", choices=list(WORD_POOLINGS), default="max",
                   help="over time, per feature map: max (Kim), or max-mean (the max and the mean side by side)")
    g.add_argument("--min-count", type=int, default=2, help="vocabulary: words seen at least this often in training")
    g.add_argument("--max-vocab", type=int, default=0, help="vocabulary: at most this many words (0: no limit)")
    g.add_argument("--max-words", type=int, default=256, help="tokens read per text")
    g.add_argument("--ngrams", default="3,5", help="character n-gram lengths: min,max")
    g.add_argument("--buckets", type=int, default=32768, help="hash buckets for character n-grams (0: none)")
    g.add_argument("--max-subwords", type=int, default=40, help="character n-grams per token at most")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=15)
    g.add_argument("--batch-size", type=int, default=128, help="the papers' 128")
    g.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: sgd 0.01, adamw 0.001)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=None, help="default: sgd 1e-4, adamw 0.05")
    g.add_argument("--schedule", choices=["cosine", "step"], default="cosine",
                   help="cosine: linear warm-up then cosine decay; step: halve every --step-epochs (the papers')")
    g.add_argument("--warmup", type=float, default=0.05, help="cosine: fraction of steps for warm-up")
    g.add_argument("--step-epochs", type=int, default=3, help="step: epochs between halvings")
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--distill-tfidf-folds", type=int, default=0,
                   help="knowledge distillation from the TF-IDF + logistic-regression baseline (baseline-text): "
                        "fit it in this many folds of the training rows so every row gets out-of-fold teacher "
                        "probabilities, and add their cross-entropy to the loss (0: off; needs scikit-learn)")
    g.add_argument("--distill-weight", type=float, default=0.5,
                   help="loss = (1 - w) x label cross-entropy + w x teacher cross-entropy")
    g.add_argument("--clip-grad", type=float, default=0.0, help="clip the gradient norm (0: off)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast (default: on with CUDA)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="the split's seed (and, without --init-seed, the model's)")
    g.add_argument("--init-seed", type=int, default=None,
                   help="seed of the initialisation and batch order only (another seed on the same split)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    g.add_argument("--install", type=Path, default=None, help="copy weights + merge the manifest entry into this dir")
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    if args.weight_decay is None:
        args.weight_decay = DEFAULT_WEIGHT_DECAY[args.optimizer]
    if args.name is None:
        folder = args.train[0].resolve().parent.name or "text"
        model = {"vdcnn": f"vdcnn{args.depth}", "char-cnn": f"charcnn-{args.size}", "word-cnn": "wordcnn"}[args.family]
        args.name = re.sub(r"[^A-Za-z0-9._-]", "-", f"{folder}-{model}").lstrip("-._") or model
    if not NAME_PATTERN.match(args.name):
        p.error(f"--name {args.name!r}: use letters, digits, '.', '_' and '-' (at most 128, starting alphanumeric)")
    if args.inner_val is not None and args.install is not None:
        p.error("--inner-val runs are for choosing hyper-parameters: they cannot be installed")
    if args.members > 1 and args.family != "word-cnn":
        p.error("--members is a word-cnn option")
    if args.word_pool != "max" and args.family != "word-cnn":
        p.error("--word-pool is a word-cnn option")
    if args.distill_tfidf_folds:
        if args.distill_tfidf_folds < 2:
            p.error("--distill-tfidf-folds needs at least 2 folds (0: no distillation)")
        if not 0.0 <= args.distill_weight <= 1.0:
            p.error("--distill-weight must be between 0 and 1")
        if args.members > 1:  # the members' losses are summed one by one: the teacher term is not wired there
            p.error("--distill-tfidf-folds trains a single network: not with --members")
    return args


def _jsonable(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v)
            for k, v in vars(args).items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = time.time()
    # --seed fixes the split (and so the hold-out); --init-seed, when given, only the initialisation and batch order
    init_seed = args.seed if args.init_seed is None else args.init_seed
    device = start_run(args.threads, args.device, init_seed)
    amp = device.type == "cuda" if args.amp is None else bool(args.amp)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every batch has the same shape (fixed length)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    classes, rows = load_rows(args)
    split = split_rows(rows, args.val_size, args.val_from_first, args.seed, dedup=True)
    if args.inner_val is not None:
        # hyper-parameter selection: the hold-out (split.val_*) is dropped here and never encoded or scored
        split = inner_split(split, args.inner_val, args.seed)
        print(f"--inner-val: {len(split.val_texts)} validation rows split off the training rows; the hold-out is "
              "not used", file=sys.stderr)
    train_texts, y_train_np, val_texts, y_val_np = split.train_texts, split.y_train, split.val_texts, split.y_val
    dropped, moved = split.dropped, split.moved
    encoder: CharSpec | WordEncoder
    if args.family == "word-cnn":
        encoder = word_encoder(args, train_texts)  # the vocabulary comes from the training rows only
        spec: CharSpec | WordSpec = encoder.spec
    else:
        spec = encoder = CharSpec(alphabet=ALPHABETS[args.alphabet], length=args.length, lowercase=args.lowercase,
                                  unknown=args.unknown)
    arch = arch_from_args(args, len(classes), spec.vocab_size)
    x_train = encode_texts(encoder, train_texts).to(device)
    x_val = encode_texts(encoder, val_texts)
    y_train = torch.from_numpy(y_train_np).to(device)
    teacher = (teacher_probabilities(out, train_texts, y_train_np, len(classes), args.distill_tfidf_folds)
               .to(device) if args.distill_tfidf_folds else None)
    y_val = torch.from_numpy(y_val_np)

    model = build_text_model(args.family, arch, len(classes), spec.vocab_size).to(device)
    if isinstance(model, WordCNN) and isinstance(encoder, WordEncoder):
        model.set_vocabulary(encoder.words)
    # no weight decay on biases, BatchNorm and the embeddings (as usual for such parameters)
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1 or "embedding" in n]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt: torch.optim.Optimizer
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum)
    else:
        opt = torch.optim.AdamW(groups, lr=args.lr)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs

    # what must not change between a run and its resumption
    fingerprint = {"family": args.family, "arch": arch, "encoding": spec.to_dict(), "classes": classes,
                   "train": [str(p.resolve()) for p in args.train], "val_size": args.val_size, "seed": args.seed,
                   "val_from_first": args.val_from_first, "optimizer": args.optimizer, "dedup": DEDUP_RULE,
                   "inner_val": args.inner_val, "init_seed": args.init_seed}
    if args.distill_tfidf_folds:  # (only then: checkpoints of runs without a teacher keep their fingerprint)
        fingerprint["distill"] = {"tfidf_folds": args.distill_tfidf_folds, "weight": args.distill_weight}
    start_epoch, history, train_seconds = 0, [], 0.0
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ck.get("fingerprint") != fingerprint:
            raise SystemExit(f"{ckpt_path} belongs to a different configuration (model, encoding, data or seed); "
                             "use another --out or delete it")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start_epoch, history, train_seconds = ck["epoch"], ck["history"], ck["train_seconds"]
        torch.set_rng_state(ck["rng"].cpu())  # map_location may have moved it to the GPU
        print(f"resumed from {ckpt_path} at epoch {start_epoch}", file=sys.stderr)

    print(f"{args.name}: {len(classes)} classes, {len(x_train)} train / {len(x_val)} val rows "
          f"({dropped} training duplicates of validation texts dropped, {moved} near-duplicates of training rows "
          f"moved from validation to training), {args.family} "
          f"({count_parameters(model):,} params), L={spec.length}, vocab {spec.vocab_size}, on {device}"
          f"{' bf16' if amp else ''}", file=sys.stderr)
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        model.train()
        gen = torch.Generator().manual_seed(init_seed * 1000 + epoch)
        perm = torch.randperm(len(x_train), generator=gen).to(device)
        seen = correct = 0
        loss_sum = 0.0
        bar = progress(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch")
        for b in bar:
            step = epoch * steps_per_epoch + b
            lr = (lr_at(step, total_steps, args.lr, args.warmup) if args.schedule == "cosine"
                  else step_lr(epoch, args.lr, args.step_epochs, 0.5))
            for g in opt.param_groups:
                g["lr"] = lr
            idx = perm[b * args.batch_size : (b + 1) * args.batch_size]
            xb = x_train.batch(idx)
            yb = y_train[idx]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                if isinstance(model, WordCNN) and len(model.members) > 1:
                    # ensemble members train independently: one loss each, on the same batch
                    member = model.member_logits(xb).float()
                    logits = member.softmax(-1).mean(0)
                    loss = torch.stack([F.cross_entropy(m, yb, label_smoothing=args.label_smoothing)
                                        for m in member]).sum()
                else:
                    logits = model(xb)
                    loss = F.cross_entropy(logits.float(), yb, label_smoothing=args.label_smoothing)
                    if teacher is not None:
                        soft = -(teacher[idx] * logits.float().log_softmax(-1)).sum(-1).mean()
                        loss = (1.0 - args.distill_weight) * loss + args.distill_weight * soft
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            opt.step()
            seen += len(yb)
            loss_sum += float(loss.detach()) * len(yb)
            correct += int((logits.argmax(-1) == yb).sum())
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", lr=f"{lr:.2g}")
        probs = predict(model, x_val, 512, device, amp)
        val_loss = float(F.nll_loss(probs.clamp_min(1e-12).log(), y_val))
        val_acc = float((probs.argmax(-1) == y_val).float().mean())
        train_seconds += time.time() - t0
        rec = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
               "val_loss": val_loss, "val_acc": val_acc, "lr_end": opt.param_groups[0]["lr"],
               "seconds": round(time.time() - t0, 2)}
        history.append(rec)
        with open(out / "log.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), file=sys.stderr)
        atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                     "history": history, "train_seconds": train_seconds, "rng": torch.get_rng_state(),
                     "fingerprint": fingerprint, "args": _jsonable(args)}, ckpt_path)

    return finish(args, model, classes, spec, arch, rows, x_val, y_val, history, train_seconds, t_start, device,
                  amp, n_train=len(x_train), dropped=dropped, moved=moved)


def teacher_probabilities(out: Path, texts: list[str], labels: np.ndarray, num_classes: int, folds: int
                          ) -> torch.Tensor:
    """Out-of-fold TF-IDF baseline probabilities for the training rows (models.train.text_baseline), cached in the
    run directory under a digest of the rows, the labels and the folds (a resumed run does not refit them)."""
    from models.train.text_baseline import out_of_fold_probabilities

    digest = hashlib.sha256(json.dumps([texts, labels.tolist(), folds]).encode()).hexdigest()
    cache = out / f"teacher-{digest[:16]}.npy"
    if cache.exists():
        return torch.from_numpy(np.load(cache))
    t0 = time.time()
    probs = out_of_fold_probabilities(texts, labels, num_classes, folds)
    np.save(cache, probs)
    acc = float((probs.argmax(1) == labels).mean())
    print(f"teacher: TF-IDF baseline, {folds} folds, out-of-fold accuracy {acc:.4f} on {len(texts)} training rows "
          f"({time.time() - t0:.0f} s)", file=sys.stderr)
    return torch.from_numpy(probs)


def finish(args: argparse.Namespace, model: torch.nn.Module, classes: list[str], spec: CharSpec | WordSpec,
           arch: dict[str, Any], rows: list[TextRows], x_val: EncodedTexts, y_val: torch.Tensor,
           history: list[dict[str, Any]], train_seconds: float, t_start: float, device: torch.device, amp: bool,
           n_train: int, dropped: int, moved: int = 0) -> dict[str, Any]:
    """Write the weights, the report (JSON, Markdown, confusion PNG) and the manifest entry."""
    out: Path = args.out
    name: str = args.name
    probs = predict(model, x_val, 512, device, amp)
    np.save(out / "val_probabilities.npy", probs.numpy())  # for comparing runs (ensembles) on the same rows
    pred = probs.argmax(-1).numpy()
    y = y_val.numpy()
    cm = confusion_matrix(y, pred, len(classes))
    per_class = per_class_metrics(cm, classes)
    acc = float((pred == y).mean())
    macro_f1 = float(np.mean([m["f1"] for m in per_class.values()]))
    weights_file = out / f"{name}.pt"
    digest = save_weights(model, weights_file)
    plot_confusion(cm, classes, out / "confusion.png", f"{name}: validation confusion matrix")
    report = {
        "model": name, "family": args.family, "arch": arch, "val_accuracy": acc, "val_macro_f1": macro_f1,
        "per_class": per_class, "confusion_matrix": cm.tolist(), "epochs": len(history),
        "train_seconds": round(train_seconds, 1), "wall_seconds_this_run": round(time.time() - t_start, 1),
        "hardware": hardware_description(device), "torch": torch.__version__, "python": platform.python_version(),
        "parameters": count_parameters(model), "val_rows": len(y), "train_rows": n_train,
        "train_duplicates_dropped": dropped, "val_near_duplicates_moved": moved, "history": history,
        "validation": ("inner split of the training rows (--inner-val): hyper-parameter selection, not the hold-out"
                       if args.inner_val is not None else "the hold-out"),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    md = [f"# {name} training report", "",
          f"- validation accuracy: **{acc:.4f}**, macro F1 {macro_f1:.4f}, on {len(y)} held-out rows of "
          f"{rows[0].path.name if args.val_from_first else 'all files'}"
          + (" (an inner split of the training rows, --inner-val: not the model's hold-out)"
             if args.inner_val is not None else ""),
          f"- model: {args.family} {json.dumps(arch)} ({report['parameters']:,} parameters), "
          f"L={spec.length}, vocabulary {spec.vocab_size}",
          f"- training rows: {n_train} ({dropped} duplicates of validation texts dropped; {moved} validation rows "
          f"moved to training as near-duplicates of training rows, rule {DEDUP_RULE!r})",
          f"- epochs: {len(history)}, training time: {train_seconds / 60:.1f} min on {report['hardware']}", "",
          "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    md += [f"| {c} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |"
           for c, m in per_class.items()]
    md += ["", "Confusion matrix (rows: true class, columns: predicted):", "", confusion_table(cm, classes)]
    (out / "report.md").write_text("\n".join(md) + "\n")
    entry = {
        "name": name, "task": "text-classification", "family": args.family, "arch": arch,
        "file": weights_file.name, "sha256": digest, "labels": classes, "encoding": spec.to_dict(),
        "source": "project",
        "training": {
            "data": [str(r.path) for r in rows], "rows": {str(r.path): len(r.texts) for r in rows},
            "train_rows": n_train, "val_rows": len(y), "val_from": str(rows[0].path) if args.val_from_first else "all",
            "train_duplicates_dropped": dropped, "val_size": args.val_size, "dedup": DEDUP_RULE,
            "val_near_duplicates_moved": moved,
            **({"inner_val": args.inner_val} if args.inner_val is not None else {}),
            "csv": {"label_column": args.label_column, "text_columns": args.text_columns, "header": args.header,
                    "label_base": args.label_base, "unescape_newlines": args.unescape_newlines,
                    "encoding": args.encoding, "limit_per_file": args.limit_per_file},
            "recipe": {"epochs": args.epochs, "batch_size": args.batch_size, "optimizer": args.optimizer,
                       "peak_lr": args.lr, "momentum": args.momentum if args.optimizer == "sgd" else None,
                       "weight_decay": args.weight_decay,
                       "schedule": ("linear warm-up + cosine" if args.schedule == "cosine"
                                    else f"halved every {args.step_epochs} epochs"),
                       "warmup": args.warmup if args.schedule == "cosine" else None,
                       "label_smoothing": args.label_smoothing, "clip_grad": args.clip_grad,
                       "bf16_autocast": amp, "seed": args.seed,
                       **({"init_seed": args.init_seed} if args.init_seed is not None else {}),
                       **({"distillation": {
                           "teacher": "TF-IDF words 1-2 + chars 2-5 + logistic regression (C=16), out of fold",
                           "folds": args.distill_tfidf_folds, "weight": args.distill_weight}}
                          if args.distill_tfidf_folds else {})}},
        "metrics": {"val_accuracy": round(acc, 4), "val_macro_f1": round(macro_f1, 4),
                    "per_class_f1": {c: round(m["f1"], 4) for c, m in per_class.items()}, "val_rows": len(y)},
    }
    publish_run(out, entry, weights_file, args.install)
    return report


if __name__ == "__main__":
    main()
