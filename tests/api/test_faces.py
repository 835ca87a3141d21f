"""The face endpoints through the lifespan with a tiny random embedder: every endpoint and error path."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.settings import Settings
from models.faces.identification import ImpostorTable, impostor_distances, quantile_table
from tests.api.test_classify import assert_problem
from tests.conftest import image_bytes, write_tiny_face_model


def pattern(seed: int, size: int = 40) -> bytes:
    """A distinct noise image (a stand-in for a cropped face: tests use detector=none)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def img(field: str, data: bytes, name: str = "face.png") -> tuple[str, tuple[str, bytes, str]]:
    return (field, (name, data, "image/png"))


NONE = {"detector": "none"}


@pytest.fixture
def face_settings(base_settings: Settings) -> Settings:
    write_tiny_face_model(base_settings.weights_dir)
    return base_settings.model_copy(update={"face_models": ["tiny-face"]})


@pytest.fixture
def fclient(face_settings: Settings, client_factory) -> TestClient:
    with client_factory(face_settings) as c:
        yield c


def enroll(c: TestClient, subject: str, *seeds: int) -> dict:
    r = c.post("/faces/enroll", data={"subject": subject, **NONE},
               files=[img("image", pattern(s), f"{subject}-{s}.png") for s in seeds])
    assert r.status_code == 201, r.text
    return r.json()


def test_embed_returns_unit_embeddings_with_the_model_identity(fclient: TestClient, face_settings: Settings) -> None:
    r = fclient.post("/faces/embed", data=NONE, files=[img("image", pattern(1)), img("image", pattern(2))])
    assert r.status_code == 200, r.text
    body = r.json()
    manifest = json.loads((face_settings.weights_dir / "manifest.json").read_text())
    sha = next(m["sha256"] for m in manifest["models"] if m["name"] == "tiny-face")
    assert body["model"] == "tiny-face" and body["model_sha256"] == sha and body["dim"] == 8
    assert len(body["results"]) == 2
    face = body["results"][0]["faces"][0]
    assert face["box"] == {"x": 0, "y": 0, "w": 40, "h": 40} and face["score"] == 1.0
    assert abs(np.linalg.norm(face["embedding"]) - 1.0) < 1e-4
    assert body["results"][0]["faces"][0]["embedding"] != body["results"][1]["faces"][0]["embedding"]


def test_embed_with_the_haar_detector_on_a_faceless_image_is_an_empty_list(fclient: TestClient) -> None:
    r = fclient.post("/faces/embed", files=[img("image", image_bytes(size=(120, 120)))])
    assert r.status_code == 200 and r.json()["results"][0]["faces"] == []


def test_verify_pair(fclient: TestClient) -> None:
    same = fclient.post("/faces/verify", data=NONE, files=[img("image_a", pattern(1)), img("image_b", pattern(1))])
    assert same.status_code == 200, same.text
    b = same.json()
    assert b["match"] is True and b["distance"] < 1e-6 and abs(b["similarity"] - 1.0) < 1e-6
    assert b["threshold"] == 1.0 and b["threshold_source"] == "model"
    assert b["faces"]["image_a"]["box"]["w"] == 40
    diff = fclient.post("/faces/verify", data={**NONE, "threshold": "1e-9"},
                        files=[img("image_a", pattern(1)), img("image_b", pattern(2))]).json()
    assert diff["match"] is False and diff["distance"] > 1e-9 and diff["threshold_source"] == "request"
    assert abs(diff["similarity"] - (1 - diff["distance"] / 2)) < 1e-5


@pytest.mark.parametrize(("data", "files", "status", "needle"), [
    (NONE, [img("image_a", pattern(1))], 422, "image_a and image_b"),
    (NONE, [img("image_a", pattern(1)), img("image", pattern(2))], 422, "either"),
    (NONE, [], 422, "either"),
    ({**NONE, "subject": "alice"}, [], 422, "image and subject"),
    ({**NONE, "threshold": "5"}, [img("image_a", pattern(1)), img("image_b", pattern(2))], 422, "threshold"),
    ({"detector": "dlib"}, [img("image_a", pattern(1)), img("image_b", pattern(2))], 422, "detector"),
    ({}, [img("image_a", image_bytes(size=(120, 120))), img("image_b", pattern(2))], 422, "no face found in image_a"),
    (NONE, [("image_a", ("x.csv", b"a,b\n1,2\n", "text/csv")), img("image_b", pattern(2))], 415, ""),
    ({**NONE, "model": "nope"}, [img("image_a", pattern(1)), img("image_b", pattern(2))], 404, "nope"),
])
def test_verify_errors(fclient: TestClient, data: dict, files: list, status: int, needle: str) -> None:
    r = fclient.post("/faces/verify", data=data, files=files)
    assert_problem(r, status)
    assert needle in r.json()["detail"]


def test_enroll_identify_verify_delete_round_trip(fclient: TestClient) -> None:
    r = fclient.post("/faces/enroll", data={"subject": "alice", **NONE},
                     files=[img("image", pattern(1), "a1.png"), img("image", pattern(2), "a2.png")])
    assert r.status_code == 201 and r.headers["location"] == "/faces/subjects/alice"
    faces = r.json()["faces"]
    assert [f["image"] for f in faces] == ["a1.png", "a2.png"] and len({f["face_id"] for f in faces}) == 2
    enroll(fclient, "bob", 3)

    ident = fclient.post("/faces/identify", data=NONE, files=[img("image", pattern(2))]).json()
    face = ident["faces"][0]
    assert face["subject"] == "alice" and face["distance"] < 1e-6
    assert face["candidates"][0]["face_id"] == faces[1]["face_id"]
    assert [c["subject"] for c in face["candidates"]] == ["alice", "bob"]  # best face per subject, nearest first
    stranger = fclient.post("/faces/identify", data={**NONE, "threshold": "1e-9"},
                            files=[img("image", pattern(99))]).json()["faces"][0]
    assert stranger["subject"] is None and stranger["candidates"]
    assert all(not c["match"] for c in stranger["candidates"])

    v = fclient.post("/faces/verify", data={**NONE, "subject": "alice"}, files=[img("image", pattern(1))]).json()
    assert v["match"] is True and v["subject"] == "alice" and v["face_id"] == faces[0]["face_id"]
    assert v["faces_compared"] == 2

    subj = fclient.get("/faces/subjects/alice").json()
    assert subj["face_count"] == 2 and all(f["current_model"] for f in subj["faces"])
    d = fclient.delete(f"/faces/{faces[1]['face_id']}")
    assert d.status_code == 200 and d.json()["subject"] == "alice"
    assert fclient.get("/faces/subjects/alice").json()["face_count"] == 1
    assert_problem(fclient.delete(f"/faces/{faces[1]['face_id']}"), 404)

    gone = fclient.delete("/faces/subjects/alice")
    assert gone.status_code == 200 and gone.json()["deleted_faces"] == 1
    assert_problem(fclient.get("/faces/subjects/alice"), 404)
    again = fclient.post("/faces/identify", data=NONE, files=[img("image", pattern(1))]).json()["faces"][0]
    assert all(c["subject"] != "alice" for c in again["candidates"])
    assert fclient.get("/faces/gallery").json()["subjects"] == 1


def test_enroll_errors_store_nothing(fclient: TestClient) -> None:
    # a faceless image: 422 naming it
    r = fclient.post("/faces/enroll", data={"subject": "carol"},
                     files=[img("image", image_bytes(size=(120, 120)), "wall.png")])
    assert_problem(r, 422)
    assert "image[0]" in r.json()["detail"] and "wall.png" in r.json()["detail"]
    # a good first image and a broken second one: all or nothing, the first is not stored either
    r = fclient.post("/faces/enroll", data={"subject": "carol", **NONE},
                     files=[img("image", pattern(1), "ok.png"),
                            ("image", ("b.png", b"\x89PNG\r\n\x1a\n", "image/png"))])
    assert_problem(r, 415)
    assert_problem(fclient.get("/faces/subjects/carol"), 404)
    for bad in ["", "a" * 129, "../etc", "has space", "-lead"]:
        assert_problem(fclient.post("/faces/enroll", data={"subject": bad, **NONE}, files=[img("image", pattern(1))]),
                       422)
    assert_problem(fclient.post("/faces/enroll", data={"subject": "dave", **NONE}), 422)  # no image
    assert_problem(fclient.post("/faces/enroll", data=NONE, files=[img("image", pattern(1))]), 422)  # no subject
    assert_problem(fclient.post("/faces/enroll", data={"subject": "dave", **NONE},
                                files=[("image", ("x.txt", b"hello", "text/plain"))]), 415)
    assert fclient.get("/faces/subjects").json()["total"] == 0


def test_unknown_subject_and_bad_ids(fclient: TestClient) -> None:
    assert_problem(fclient.post("/faces/verify", data={**NONE, "subject": "nobody"}, files=[img("image", pattern(1))]),
                   404)
    assert_problem(fclient.get("/faces/subjects/nobody"), 404)
    assert_problem(fclient.delete("/faces/subjects/nobody"), 404)
    assert_problem(fclient.get("/faces/subjects/bad%20id"), 422)
    assert_problem(fclient.post("/faces/verify", data={**NONE, "subject": "bad id"}, files=[img("image", pattern(1))]),
                   422)


def test_identify_needs_a_face_and_handles_an_empty_gallery(fclient: TestClient) -> None:
    assert_problem(fclient.post("/faces/identify", files=[img("image", image_bytes(size=(120, 120)))]), 422)
    r = fclient.post("/faces/identify", data=NONE, files=[img("image", pattern(1))])
    assert r.status_code == 200 and r.json()["faces"][0] == {**r.json()["faces"][0], "subject": None,
                                                             "candidates": []}
    assert_problem(fclient.post("/faces/identify", data={**NONE, "top_k": "0"}, files=[img("image", pattern(1))]), 422)


def test_subjects_are_paginated(fclient: TestClient) -> None:
    for i, s in enumerate(["c", "a", "b"]):
        enroll(fclient, s, i)
    page = fclient.get("/faces/subjects", params={"limit": 2}).json()
    assert [s["subject"] for s in page["subjects"]] == ["a", "b"] and page["total"] == 3
    assert page["next"] == "/faces/subjects?limit=2&offset=2"
    last = fclient.get(page["next"]).json()
    assert [s["subject"] for s in last["subjects"]] == ["c"] and last["next"] is None
    assert_problem(fclient.get("/faces/subjects", params={"limit": 0}), 422)


def test_gallery_survives_restarts_and_refuses_other_models(face_settings: Settings, client_factory,
                                                            tmp_path: Path) -> None:
    with client_factory(face_settings) as c:
        face_id = enroll(c, "alice", 1)["faces"][0]["face_id"]
    with client_factory(face_settings) as c:
        assert c.get("/faces/gallery").json()["index_source"] == "snapshot"
        hit = c.post("/faces/identify", data=NONE, files=[img("image", pattern(1))]).json()["faces"][0]
        assert hit["subject"] == "alice" and hit["candidates"][0]["face_id"] == face_id
    # the same model name with other weights: the stored embeddings are not comparable any more
    write_tiny_face_model(face_settings.weights_dir, seed=1)
    with client_factory(face_settings) as c:
        r = c.post("/faces/verify", data={**NONE, "subject": "alice"}, files=[img("image", pattern(1))])
        assert_problem(r, 409)
        assert "re-enrol" in r.json()["detail"]
        ident = c.post("/faces/identify", data=NONE, files=[img("image", pattern(1))]).json()
        assert ident["faces"][0]["subject"] is None and "another model" in ident["warning"]
        assert c.get("/faces/gallery").json()["faces_from_other_models"] == 1


def test_no_face_model_means_503_or_404(base_settings: Settings, client_factory) -> None:
    with client_factory(base_settings) as c:  # no face model configured
        assert_problem(c.post("/faces/embed", data=NONE, files=[img("image", pattern(1))]), 503)
        assert_problem(c.get("/faces/subjects"), 404)


def test_concurrent_embeddings_are_batched(face_settings: Settings, client_factory) -> None:
    s = face_settings.model_copy(update={"batch_max_wait_ms": 200.0})
    with client_factory(s) as c:
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda i: c.post("/faces/embed", data=NONE,
                                                   files=[img("image", pattern(i))]).status_code, range(8)))
        assert codes == [200] * 8
        text = c.get("/metrics").text
        count = float(text.split('cnn_batch_size_count{model="tiny-face"} ')[1].split()[0])
        total = float(text.split('cnn_batch_size_sum{model="tiny-face"} ')[1].split()[0])
        assert total == 8 and total / count > 1


def test_models_lists_the_face_model(fclient: TestClient) -> None:
    m = next(x for x in fclient.get("/models").json()["models"] if x["name"] == "tiny-face")
    assert m["task"] == "face-embedding" and m["status"] == "ready" and m["input_size"] == 16
    assert m["info"]["threshold"] == 1.0


def test_a_repeated_single_image_field_is_refused_not_truncated(fclient: TestClient) -> None:
    r = fclient.post("/faces/identify", data=NONE, files=[img("image", pattern(1)), img("image", pattern(2))])
    assert_problem(r, 422)
    assert "one image expected, 2 sent" in r.json()["detail"]
    r = fclient.post("/faces/verify", data=NONE,
                     files=[img("image_a", pattern(1)), img("image_a", pattern(3)), img("image_b", pattern(2))])
    assert_problem(r, 422)
    assert "image_a" in r.json()["detail"]


# ----------------------------------------------------------------------------------------- 1:N identification
# /faces/identify's threshold is set from the model's impostor-distance table for the current gallery size (FPIR),
# not from the 1:1 verification tau; without a table it falls back to tau and says so.

def _tiny_table(c: TestClient, seeds: range) -> ImpostorTable:
    """The impostor table of the tiny model on these noise patterns (each one a different 'person'), measured
    through the API as the calibration command does through the served path."""
    vecs = []
    for start in range(seeds.start, seeds.stop, 16):
        r = c.post("/faces/embed", data=NONE,
                   files=[img("image", pattern(s)) for s in range(start, min(start + 16, seeds.stop))])
        assert r.status_code == 200, r.text
        vecs += [res["faces"][0]["embedding"] for res in r.json()["results"]]
    return quantile_table(impostor_distances(np.array(vecs), [str(s) for s in seeds]), source="test")


def _write_table(weights_dir: Path, table: dict | None, name: str = "tiny-face") -> None:
    path = weights_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    for m in manifest["models"]:
        if m["name"] == name:
            m["identification"] = table
    path.write_text(json.dumps(manifest))


@pytest.fixture
def calibrated(face_settings: Settings, client_factory) -> tuple[Settings, ImpostorTable]:
    """tiny-face with an identification table made from 200 patterns (19,900 impostor pairs)."""
    with client_factory(face_settings) as c:
        table = _tiny_table(c, range(200))
    _write_table(face_settings.weights_dir, table.to_manifest())
    return face_settings, table


def test_identify_without_a_calibration_uses_the_verification_threshold_and_warns(fclient: TestClient) -> None:
    enroll(fclient, "alice", 1)
    enroll(fclient, "bob", 2, 3)
    body = fclient.post("/faces/identify", data=NONE, files=[img("image", pattern(1))]).json()
    assert body["threshold_source"] == "verification" and body["threshold"] == 1.0
    assert body["fpir"] is None and body["fpir_expected"] is None and body["gallery_size"] == 3  # faces, not subjects
    assert "strangers may be identified" in body["warning"] and body["faces"][0]["subject"] == "alice"
    # an FPIR cannot be honoured without a table: 422, not a silent fallback
    r = fclient.post("/faces/identify", data={**NONE, "fpir": "0.01"}, files=[img("image", pattern(1))])
    assert_problem(r, 422)
    assert "no identification calibration" in r.json()["detail"]
    explicit = fclient.post("/faces/identify", data={**NONE, "threshold": "0.5"},
                            files=[img("image", pattern(1))]).json()
    assert explicit["threshold_source"] == "request" and explicit["threshold"] == 0.5 and "warning" not in explicit


def test_identify_says_unknown_for_strangers_at_the_calibrated_threshold(
        calibrated: tuple[Settings, ImpostorTable], client_factory) -> None:
    settings, table = calibrated
    with client_factory(settings) as c:
        for s in range(10):
            enroll(c, f"s{s}", s)
        own = c.post("/faces/identify", data=NONE, files=[img("image", pattern(3))]).json()
        expected = table.threshold_for(0.01, 10)
        assert own["threshold_source"] == "identification-fpir" and own["fpir"] == 0.01
        assert own["gallery_size"] == 10 and own["threshold"] == pytest.approx(expected.threshold, abs=1e-6)
        assert own["threshold"] < 1.0 and own["threshold_clamped"] is None and "warning" not in own
        assert own["fpir_expected"] == pytest.approx(0.01, rel=1e-3)
        assert own["faces"][0]["subject"] == "s3"  # an enrolled face is still found
        # 100 strangers (patterns the table never saw): about 1% identified as someone at the calibrated
        # threshold, while the 1:1 verification threshold (1.0) identifies most of them
        nearest = []
        accepted = 0
        for s in range(1000, 1100):
            body = c.post("/faces/identify", data=NONE, files=[img("image", pattern(s))]).json()
            accepted += body["faces"][0]["subject"] is not None
            nearest.append(body["faces"][0]["distance"])
            assert body["faces"][0]["subject"] is None or body["faces"][0]["distance"] <= body["threshold"]
        assert accepted <= 5, f"{accepted} of 100 strangers identified at FPIR 0.01"
        assert sum(d <= 1.0 for d in nearest) >= 50  # what the verification threshold would have done
        stranger = c.post("/faces/identify", data=NONE, files=[img("image", pattern(1000))]).json()["faces"][0]
        assert stranger["subject"] is None and all(not x["match"] for x in stranger["candidates"])


def test_identify_threshold_overrides_and_clamping(calibrated: tuple[Settings, ImpostorTable], client_factory) -> None:
    settings, table = calibrated
    with client_factory(settings) as c:
        for s in range(4):
            enroll(c, f"s{s}", s)

        def ask(**data: str) -> dict:
            r = c.post("/faces/identify", data={**NONE, **data}, files=[img("image", pattern(500))])
            assert r.status_code == 200, r.text
            return r.json()

        default, lenient = ask(), ask(fpir="0.2")
        assert lenient["threshold_source"] == "identification-fpir" and lenient["fpir"] == 0.2
        assert lenient["threshold"] == pytest.approx(table.threshold_for(0.2, 4).threshold, abs=1e-6)
        assert lenient["threshold"] > default["threshold"]
        fixed = ask(threshold="0.3")
        assert fixed["threshold_source"] == "request" and fixed["threshold"] == 0.3 and fixed["fpir"] is None
        assert fixed["fpir_expected"] == pytest.approx(table.fpir_at(0.3, 4), rel=1e-4)
        # an FPIR the table cannot resolve at this gallery size: the strictest calibrated value, said so
        strict = ask(fpir="1e-6")
        assert strict["threshold_clamped"] == "strictest" and "clamped" in strict["warning"]
        assert strict["threshold"] == pytest.approx(table.quantiles[-1][1], abs=1e-6)
        assert strict["fpir_expected"] > 1e-6
        for bad in ({"fpir": "0"}, {"fpir": "1"}, {"fpir": "nan"}, {"fpir": "x"}, {"threshold": "0.3", "fpir": "0.1"}):
            assert_problem(c.post("/faces/identify", data={**NONE, **bad}, files=[img("image", pattern(500))]), 422)
        # /faces/verify keeps the model's 1:1 threshold
        v = c.post("/faces/verify", data=NONE, files=[img("image_a", pattern(1)), img("image_b", pattern(2))]).json()
        assert v["threshold"] == 1.0 and v["threshold_source"] == "model"
    # a server-wide fixed threshold (CNN_FACE_THRESHOLD) applies to identify too, unless a request asks otherwise
    with client_factory(settings.model_copy(update={"face_threshold": 0.25})) as c:
        body = c.post("/faces/identify", data=NONE, files=[img("image", pattern(500))]).json()
        assert body["threshold_source"] == "server" and body["threshold"] == 0.25 and body["gallery_size"] == 4
        by_fpir = c.post("/faces/identify", data={**NONE, "fpir": "0.05"}, files=[img("image", pattern(500))]).json()
        assert by_fpir["threshold_source"] == "identification-fpir"


def test_the_server_fpir_setting(calibrated: tuple[Settings, ImpostorTable], client_factory) -> None:
    settings, table = calibrated
    with client_factory(settings.model_copy(update={"face_identify_fpir": 0.1})) as c:
        enroll(c, "s0", 0)
        body = c.post("/faces/identify", data=NONE, files=[img("image", pattern(500))]).json()
        assert body["fpir"] == 0.1 and body["threshold"] == pytest.approx(table.threshold_for(0.1, 1).threshold,
                                                                            abs=1e-6)


def test_the_manifest_identification_entry_is_validated(face_settings: Settings, tmp_path: Path) -> None:
    from app.runtime.registry import LoadedFaceEmbedder, ModelRegistry, load_manifest

    good = {"impostor_quantiles": [[0.1, 1.5], [0.01, 1.1], [0.001, 0.8]], "impostor_pairs": 10_000,
            "source": "x.json", "identities": 5}
    _write_table(face_settings.weights_dir, good)
    entry = load_manifest(face_settings.weights_dir)["tiny-face"]
    assert entry.model_extra is not None and entry.model_extra["identification"] == good
    registry = ModelRegistry(face_settings.weights_dir, tmp_path / "hub", torch.device("cpu"), allow_download=False,
                             allow_untrained=False)
    loaded = registry.load("tiny-face", "face-embedding").loaded
    assert isinstance(loaded, LoadedFaceEmbedder) and loaded.identification is not None
    assert loaded.identification.pairs == 10_000 and loaded.identification.far_min == 0.001
    for bad, needle in [({**good, "impostor_quantiles": [[0.1, 1.5], [0.2, 1.1]]}, "decrease"),
                        ({**good, "impostor_pairs": 10}, "below one pair"),
                        ({"impostor_quantiles": "x", "impostor_pairs": 1}, "impostor_quantiles"),
                        ("a table", "object")]:
        _write_table(face_settings.weights_dir, bad)  # type: ignore[arg-type]
        with pytest.raises(RuntimeError, match=needle):
            load_manifest(face_settings.weights_dir)


# ----- enrolment quality checks: small, blurred, duplicate of another subject, unlike the subject's other faces
def flat(side: int, value: int = 120) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def post_enroll(c: TestClient, subject: str, images: list[bytes], **data: str):
    return c.post("/faces/enroll", data={"subject": subject, **NONE, **data},
                  files=[img("image", b, f"{subject}-{i}.png") for i, b in enumerate(images)])


def test_small_and_blurred_faces_are_reported_and_still_enrolled(fclient: TestClient) -> None:
    r = post_enroll(fclient, "dana", [flat(30), pattern(3, size=64)])
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["quality_check"] == "report" and body["limits"]["min_face_side"] == 40
    small, good = body["faces"]
    assert small["quality"]["face_side"] == 30 and small["quality"]["sharpness"] == 0.0
    assert "small" in small["issues"] and "blurred" in small["issues"]
    assert good["quality"]["face_side"] == 64 and good["quality"]["sharpness"] > 100
    assert "small" not in good["issues"] and "blurred" not in good["issues"]
    assert "quality issues" in body["warning"]
    assert fclient.get("/faces/subjects/dana").json()["faces"].__len__() == 2


def test_strict_refuses_the_whole_request_and_stores_nothing(fclient: TestClient) -> None:
    r = post_enroll(fclient, "erin", [pattern(4, size=64), flat(30)], quality="strict")
    assert_problem(r, 422)
    body = r.json()
    assert "'erin-1.png': small, blurred" in body["detail"] and "nothing was stored" in body["detail"]
    assert [i["issues"] for i in body["images"]][1][:2] == ["small", "blurred"]
    assert fclient.get("/faces/subjects/erin").status_code == 404
    assert fclient.get("/faces/gallery").json()["faces"] == 0
    ok = post_enroll(fclient, "erin", [pattern(4, size=64)], quality="strict")
    assert ok.status_code == 201 and ok.json()["faces"][0]["issues"] == []
    assert_problem(post_enroll(fclient, "erin", [pattern(4)], quality="lenient"), 422)


def test_a_photo_of_an_enrolled_subject_is_reported_as_a_duplicate(fclient: TestClient) -> None:
    assert post_enroll(fclient, "alice", [pattern(1, size=64)]).status_code == 201
    r = post_enroll(fclient, "bob", [pattern(1, size=64)])
    assert r.status_code == 201, r.text
    face = r.json()["faces"][0]
    assert face["issues"] == ["duplicate"]
    assert [d["subject"] for d in face["duplicates"]] == ["alice"] and face["duplicates"][0]["distance"] < 1e-6
    # the same photo again for alice duplicates bob now, never alice herself
    again = post_enroll(fclient, "alice", [pattern(1, size=64)]).json()["faces"][0]
    assert again["issues"] == ["duplicate"] and [d["subject"] for d in again["duplicates"]] == ["bob"]
    assert_problem(post_enroll(fclient, "carl", [pattern(1, size=64)], quality="strict"), 422)


def test_a_face_unlike_the_subjects_others_is_reported(fclient: TestClient) -> None:
    def distance(a: bytes, b: bytes) -> float:
        r = fclient.post("/faces/verify", data=NONE, files=[img("image_a", a), img("image_b", b)])
        assert r.status_code == 200, r.text
        return r.json()["distance"]

    base = pattern(10, size=64)
    fars = [p for p in (pattern(s, size=64) for s in range(11, 80)) if distance(base, p) > 1.0]
    far = fars[0]
    r = post_enroll(fclient, "fay", [base, base, far])
    assert r.status_code == 201, r.text
    issues = [f["issues"] for f in r.json()["faces"]]
    assert issues == [[], [], ["unlike-subject"]]
    assert r.json()["limits"]["unlike_threshold"] == 1.0
    # against the enrolled faces too: a photo farther than the threshold from all three
    farther = next(p for p in fars[1:] if distance(p, base) > 1.0 and distance(p, far) > 1.0)
    later = post_enroll(fclient, "fay", [farther]).json()["faces"][0]
    assert later["issues"] == ["unlike-subject"]
    near = post_enroll(fclient, "fay", [far]).json()["faces"][0]
    assert near["issues"] == []


def test_quality_reports_eye_positions_when_found(fclient: TestClient) -> None:
    face = post_enroll(fclient, "gus", [pattern(5, size=64)]).json()["faces"][0]
    assert face["quality"]["eyes"] is None  # a noise patch has no eyes (and the tiny model does not align)
    assert np.isfinite(face["quality"]["sharpness"])


def test_every_face_route_documents_its_answer(fclient: TestClient) -> None:
    """Each face route has a response model in /openapi.json (not an untyped object)."""
    schema = fclient.get("/openapi.json").json()
    routes = [(path, method, op) for path, ops in schema["paths"].items() if path.startswith("/faces")
              for method, op in ops.items()]
    assert len(routes) == 9
    for path, method, op in routes:
        ok = op["responses"].get("200") or op["responses"].get("201")
        ref = ok["content"]["application/json"]["schema"].get("$ref", "")
        assert ref.startswith("#/components/schemas/"), (method, path, ok)
        name = ref.rsplit("/", 1)[1]
        assert schema["components"]["schemas"][name]["properties"], (method, path)
    identify = schema["components"]["schemas"]["IdentifyResponse"]["properties"]
    assert {"threshold", "threshold_source", "fpir", "gallery_size", "faces"} <= set(identify)


def test_an_existing_gallery_keeps_the_model_that_made_it_when_the_default_changes(
        face_settings: Settings, client_factory) -> None:
    with client_factory(face_settings) as c:
        face_id = enroll(c, "alice", 1)["faces"][0]["face_id"]
    # an upgrade ships a new default face model ("tiny-face-2", listed first); the operator named none
    write_tiny_face_model(face_settings.weights_dir, "tiny-face-2", seed=7)
    upgraded = face_settings.model_copy(update={"face_models": ["tiny-face-2", "tiny-face"]})
    with client_factory(upgraded) as c:
        gallery = c.get("/faces/gallery").json()
        assert gallery["model"] == "tiny-face" and gallery["faces_from_other_models"] == 0
        hit = c.post("/faces/identify", data=NONE, files=[img("image", pattern(1))]).json()
        assert hit["model"] == "tiny-face" and hit["faces"][0]["subject"] == "alice"
        assert hit["faces"][0]["candidates"][0]["face_id"] == face_id
        # requests naming no model get the new default
        assert c.post("/faces/embed", data=NONE, files=[img("image", pattern(1))]).json()["model"] == "tiny-face-2"
    # naming the model moves the gallery to it: the old faces stay stored, unsearchable until enrolled again
    chosen = upgraded.model_copy(update={"face_model": "tiny-face-2"})
    with client_factory(chosen) as c:
        gallery = c.get("/faces/gallery").json()
        assert gallery["model"] == "tiny-face-2" and gallery["faces_from_other_models"] == 1


def test_the_gallery_model_rule() -> None:
    from app.apps.faces import gallery_model

    loaded = {"new": "n" * 64, "old": "o" * 64}
    old, new = ("old", "o" * 64), ("new", "n" * 64)
    assert gallery_model("new", False, loaded, {}) == ("new", None)  # no gallery yet
    assert gallery_model("new", False, loaded, {new: 1, old: 5}) == ("new", None)  # the default made some
    name, why = gallery_model("new", False, loaded, {old: 5})
    assert name == "old" and why is not None and "5 faces" in why and "CNN_FACE_MODEL=new" in why
    assert gallery_model("new", True, loaded, {old: 5}) == ("new", None)  # the operator chose
    assert gallery_model("new", False, loaded, {("old", "x" * 64): 5}) == ("new", None)  # other weights now
    assert gallery_model("new", False, loaded, {("gone", "g" * 64): 9}) == ("new", None)  # not loaded
    more = {"a": "a" * 64, "b": "b" * 64, "new": "n" * 64}
    assert gallery_model("new", False, more, {("a", "a" * 64): 2, ("b", "b" * 64): 3})[0] == "b"  # the most faces
    assert gallery_model(None, False, loaded, {old: 5}) == (None, None)
