"""The shipped manifest and the model cards agree: every card exists, and its terms say what `license` says."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.conftest import ROOT

WEIGHTS = ROOT / "weights"
MANIFEST: list[dict[str, Any]] = json.loads((WEIGHTS / "manifest.json").read_text())["models"]
WITH_CARD = [e for e in MANIFEST if e.get("card")]

DATASETS = {"agnews": "ag news", "cifar10": "cifar-10", "lfw": "lfw"}
# the training data's terms (../shared/data/README.md): AG News is for research and non-commercial use;
# LFW and CIFAR-10 have no formal licence and are used for research. Weights trained on it inherit them.
DATA_TERMS = {
    "agnews": {"research": True, "non_commercial": True, "no_formal_licence": False},
    "cifar10": {"research": True, "non_commercial": False, "no_formal_licence": True},
    "lfw": {"research": True, "non_commercial": False, "no_formal_licence": True},
}
# a licence that grants rights these datasets' terms do not allow to pass on to derived weights
GRANTS = re.compile(r"apache|\bmit\b|\bbsd\b|\bgpl\b|cc-by|cc0|public domain|commercial use (is )?(allowed|permitted)")


def terms(text: str) -> dict[str, Any]:
    """What a licence statement says, as comparable facts."""
    t = " ".join(text.lower().split())
    return {
        "datasets": {name for name in DATASETS.values() if name in t},
        "research": "research" in t,
        "non_commercial": bool(re.search(r"non-?commercial", t)),
        "no_formal_licence": bool(re.search(r"no formal licen[cs]e", t)),
        "grants": {m.group(0) for m in GRANTS.finditer(t)},
    }


def card_terms(card: str) -> str:
    """The card's terms: the paragraph from its `**Terms**` marker, else the first one under a `## Terms` heading."""
    text = card.replace("\r\n", "\n")
    marker = re.search(r"\*\*Terms\*\*:?", text)
    if marker is not None:
        return text[marker.end():].split("\n\n", 1)[0]
    heading = re.search(r"^#+ Terms\b.*$", text, flags=re.MULTILINE)
    assert heading is not None, "the card has no **Terms** line and no Terms section"
    return text[heading.end():].strip().split("\n\n", 1)[0]


def training_datasets(entry: dict[str, Any]) -> set[str]:
    """The datasets (keys of DATA_TERMS) the entry's training data paths name."""
    data = (entry.get("training") or {}).get("data")
    paths = [data] if isinstance(data, str) else list(data or [])
    return {key for key in DATASETS for p in paths if f"/{key}/" in f"/{p}/"}


def test_every_project_model_has_a_card_and_a_licence() -> None:
    for entry in MANIFEST:
        if entry.get("source") == "project":
            assert entry.get("card") and entry.get("license"), entry["name"]


@pytest.mark.parametrize("entry", WITH_CARD, ids=[e["name"] for e in WITH_CARD])
def test_card_exists_and_its_terms_agree_with_the_manifest_license(entry: dict[str, Any]) -> None:
    card = WEIGHTS / entry["card"]
    assert card.is_file(), f"{entry['name']}: card {card} is missing"
    assert entry.get("license"), f"{entry['name']} has a card but no license"
    in_card, in_manifest = terms(card_terms(card.read_text())), terms(entry["license"])
    assert in_manifest == in_card, f"{entry['name']}: manifest license {entry['license']!r} disagrees with {card.name}"
    datasets = training_datasets(entry)
    assert datasets, f"{entry['name']}: no known dataset in training.data"
    for key in datasets:
        assert DATASETS[key] in in_manifest["datasets"], f"{entry['name']}: the license does not name {key}"
        expected = DATA_TERMS[key]
        assert {k: in_manifest[k] for k in expected} == expected, f"{entry['name']}: not {key}'s terms"
    grants = in_manifest["grants"]
    assert not grants, f"{entry['name']}: weights trained on {sorted(datasets)} cannot be under {grants}"


@pytest.mark.parametrize(
    ("license_text", "card_text", "agree"),
    [
        ("research use: trained on CIFAR-10, which has no formal licence",
         "**Terms**: CIFAR-10 has no formal licence and is distributed for research.", True),
        # the bug this test was written for: a permissive licence in the manifest, a restriction in the card
        ("weights: Apache-2.0 like the code; trained on AG News, which is provided for research and non-commercial use",
         "**Terms**: AG News is provided for research and non-commercial use.", False),
        ("research use: trained on LFW, which has no formal licence",
         "## Terms\n\nAG News is for research and non-commercial use.", False),
    ],
)
def test_the_comparison_catches_disagreements(license_text: str, card_text: str, agree: bool) -> None:
    assert (terms(license_text) == terms(card_terms(card_text))) is agree


def test_every_card_in_weights_belongs_to_a_manifest_entry() -> None:
    cards = {e["card"] for e in WITH_CARD}
    assert {p.name for p in WEIGHTS.glob("*.md")} <= cards
