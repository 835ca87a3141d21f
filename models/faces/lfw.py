"""LFW's folder layout and pair lists (View 1: pairsDevTrain.txt / pairsDevTest.txt)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pair:
    """Two images and whether they show the same person."""

    a: Path
    b: Path
    same: bool
    people: tuple[str, ...]


def image_path(root: Path, person: str, number: int) -> Path:
    """<root>/<person>/<person>_<NNNN>.jpg"""
    return root / person / f"{person}_{number:04d}.jpg"


def read_pairs(path: Path, root: Path) -> list[Pair]:
    """Parse an LFW pairs file: a count line, then `name i j` (same) or `name i name2 j` (different)."""
    pairs: list[Pair] = []
    for n, line in enumerate(path.read_text().splitlines()):
        parts = line.split()
        if n == 0 and len(parts) <= 2 and all(p.isdigit() for p in parts):
            continue
        if len(parts) == 3:
            p, i, j = parts
            pairs.append(Pair(image_path(root, p, int(i)), image_path(root, p, int(j)), True, (p,)))
        elif len(parts) == 4:
            p, i, q, j = parts
            pairs.append(Pair(image_path(root, p, int(i)), image_path(root, q, int(j)), False, (p, q)))
        elif parts:
            raise ValueError(f"{path}:{n + 1}: cannot parse {line!r}")
    return pairs


def identity_images(root: Path) -> dict[str, list[Path]]:
    """Images per identity folder, sorted."""
    return {d.name: sorted(d.glob("*.jpg")) for d in sorted(root.iterdir()) if d.is_dir()}


def holdout_split(images: dict[str, list[Path]], pairs: list[Pair], max_images: int) -> tuple[set[str], list[Pair]]:
    """Identities to hold out of training and the pairs that are then entirely unseen.

    Every identity that appears in a pair and has fewer than `max_images` images is held out (the
    many-image identities are too valuable for training to give up); the validation pairs are those
    whose every person is held out. Training uses all other identities, so validation identities are
    never seen in training."""
    held = {p for pair in pairs for p in pair.people if len(images.get(p, [])) < max_images}
    return held, [pair for pair in pairs if all(p in held for p in pair.people)]
