"""The shipped face model on real LFW photos through the API (Haar detection, crops, embedder, gallery).

The people used here were held out of the model's training (pair-list identities with fewer than
five images), so these are faces it has never seen."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.settings import Settings
from models.faces.lfw import holdout_split, identity_images, read_pairs
from tests.conftest import ROOT, SHARED_DATA

LFW = SHARED_DATA / "lfw" / "images"
MODELS = ("lfw-face-ensemble", "lfw-face-resnet")  # the default, and the previous default still shipped

pytestmark = [pytest.mark.shared_data]


def photo(person: str, n: int) -> tuple[str, bytes, str]:
    path = LFW / person / f"{person}_{n:04d}.jpg"
    return (path.name, path.read_bytes(), "image/jpeg")


@pytest.fixture(scope="module", params=MODELS)
def lfw_client(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    from tests.conftest import wait_ready

    model = request.param
    if not (ROOT / "weights" / f"{model}.pt").exists():
        pytest.skip(f"shipped face model {model} not built")
    tmp = tmp_path_factory.mktemp("lfw")
    s = Settings(weights_dir=ROOT / "weights", torch_home=tmp / "th", classifiers=[], text_models=[],
                 face_models=[model], data_dir=tmp / "data", style_enabled=False, device="cpu")
    from app.main import create_app

    with TestClient(create_app(s)) as c:
        wait_ready(c)
        yield c


def test_held_out_pairs_same_people_are_closer(lfw_client: TestClient) -> None:
    images = identity_images(LFW)
    pairs = read_pairs(SHARED_DATA / "lfw" / "pairsDevTrain.txt", LFW)
    _, val = holdout_split(images, pairs, 5)
    same = [p for p in val if p.same][:10]
    diff = [p for p in val if not p.same][:10]
    results = []
    for p in same + diff:
        with open(p.a, "rb") as fa, open(p.b, "rb") as fb:
            r = lfw_client.post("/faces/verify", files=[("image_a", (p.a.name, fa.read(), "image/jpeg")),
                                                        ("image_b", (p.b.name, fb.read(), "image/jpeg"))])
        assert r.status_code == 200, r.text
        results.append((p.same, r.json()))
    d_same = [b["distance"] for s, b in results if s]
    d_diff = [b["distance"] for s, b in results if not s]
    assert sum(d_same) / len(d_same) < sum(d_diff) / len(d_diff)
    correct = sum(b["match"] == s for s, b in results)
    assert correct >= 14, f"{correct}/20 pairs decided correctly"
    assert len({b["model"] for _, b in results}) == 1 and results[0][1]["model"] in MODELS
    assert all(len(b["model_sha256"]) == 64 for _, b in results)


def test_enroll_two_people_identify_a_third_photo_and_a_stranger(lfw_client: TestClient) -> None:
    for person in ("Aaron_Peirsol", "Abdoulaye_Wade"):
        r = lfw_client.post("/faces/enroll", data={"subject": person},
                            files=[("image", photo(person, 1)), ("image", photo(person, 2))])
        assert r.status_code == 201, r.text
    r = lfw_client.post("/faces/identify", files=[("image", photo("Aaron_Peirsol", 3))])
    assert r.status_code == 200, r.text
    assert r.json()["faces"][0]["subject"] == "Aaron_Peirsol"
    stranger = lfw_client.post("/faces/identify", files=[("image", photo("Alec_Baldwin", 1))]).json()
    assert stranger["faces"][0]["subject"] is None
    # a third photo against its own subject and against the other one: the own subject is nearer (whether it is
    # under tau is a property of this one photo: 1.37 against lfw-face-resnet's 1.39, 1.54 against the
    # ensemble's 1.51), and `match` is exactly distance <= threshold
    v = {subj: lfw_client.post("/faces/verify", data={"subject": subj},
                               files=[("image", photo("Abdoulaye_Wade", 3))]).json()
         for subj in ("Abdoulaye_Wade", "Aaron_Peirsol")}
    assert v["Abdoulaye_Wade"]["distance"] < v["Aaron_Peirsol"]["distance"]
    assert all(b["match"] == (b["distance"] <= b["threshold"]) for b in v.values())
    assert v["Aaron_Peirsol"]["match"] is False
    assert lfw_client.delete("/faces/subjects/Aaron_Peirsol").status_code == 200
    after = lfw_client.post("/faces/identify", files=[("image", photo("Aaron_Peirsol", 3))]).json()
    assert after["faces"][0]["subject"] != "Aaron_Peirsol"
