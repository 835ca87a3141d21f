"""LFW's folder layout and pair lists (View 1: pairsDevTrain.txt / pairsDevTest.txt)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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


# ----------------------------------------------------------------------------------- calibration / test halves

SPLIT_SALT = "lfw-face-halves/v1"
HALVES = ("calibration", "test")


def identity_half(person: str, salt: str = SPLIT_SALT) -> str:
    """'calibration' or 'test' for an identity: the parity of the salted sha256 of its name.

    It depends on the name alone (not on which other people a pair list holds), so a person is in the same half
    whatever list, limit or hold-out rule is applied, and the halves of two runs never disagree."""
    return HALVES[hashlib.sha256(f"{salt}\0{person}".encode()).digest()[0] & 1]


def _pair_key(pair: Pair) -> str:
    return f"{pair.a.name}\t{pair.b.name}\t{int(pair.same)}"


@dataclass
class IdentitySplit:
    """Pairs divided by the half of their people: a pair whose people fall in different halves is dropped."""

    salt: str
    identities: dict[str, list[str]]  # half -> sorted identities (of the pairs given)
    pairs: dict[str, list[Pair]]  # half -> its pairs, in their given order
    crossing: list[Pair]  # dropped: a person in each half

    def membership_sha256(self) -> str:
        """sha256 of the sorted `identity<TAB>half` lines: names the split, whatever it was run on."""
        lines = sorted(f"{p}\t{h}" for h, people in self.identities.items() for p in people)
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

    def summary(self) -> dict[str, Any]:
        """The split's rule, sizes and digests, for a report."""

        def counts(pairs: list[Pair]) -> dict[str, Any]:
            return {"pairs": len(pairs), "same": sum(p.same for p in pairs),
                    "different": sum(not p.same for p in pairs),
                    "pairs_sha256": hashlib.sha256("\n".join(map(_pair_key, pairs)).encode()).hexdigest()}

        return {"rule": f"half = ('calibration', 'test')[sha256('{self.salt}' + NUL + identity)[0] & 1]; a pair is "
                        "kept only when all its people are in one half",
                "salt": self.salt, "membership_sha256": self.membership_sha256(),
                "identities": {h: len(v) for h, v in self.identities.items()},
                "halves": {h: counts(v) for h, v in self.pairs.items()},
                "dropped_crossing": counts(self.crossing)}


def split_by_identity(pairs: list[Pair], salt: str = SPLIT_SALT) -> IdentitySplit:
    """Divide the pairs' identities into a calibration and a test half (identity_half) and keep each pair in the
    half of its people; different-person pairs whose two people fall in different halves are dropped, so no
    identity of one half ever appears in the other's pairs."""
    people = sorted({p for pair in pairs for p in pair.people})
    half = {p: identity_half(p, salt) for p in people}
    out: dict[str, list[Pair]] = {h: [] for h in HALVES}
    crossing: list[Pair] = []
    for pair in pairs:
        halves = {half[p] for p in pair.people}
        if len(halves) == 1:
            out[halves.pop()].append(pair)
        else:
            crossing.append(pair)
    return IdentitySplit(salt, {h: [p for p in people if half[p] == h] for h in HALVES}, out, crossing)
