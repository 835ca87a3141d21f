"""POST /text/classify through the lifespan: batches, Unicode, long texts and every error path."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.settings import Settings
from tests.api.test_classify import assert_problem
from tests.conftest import TEXT_LABELS, write_tiny_text_model


@pytest.fixture
def text_settings(base_settings: Settings, weights_dir: Path) -> Settings:
    write_tiny_text_model(weights_dir)
    return base_settings.model_copy(update={"text_models": ["tiny-text"], "max_texts_per_request": 8,
                                            "max_text_chars": 5000})


@pytest.fixture
def tclient(text_settings: Settings, client_factory) -> TestClient:
    with client_factory(text_settings) as c:
        yield c


def test_classify_batch_of_texts(tclient: TestClient) -> None:
    r = tclient.post("/text/classify", json={"texts": ["Football final tonight", "Stocks fall"], "top_k": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny-text" and body["weights"] == "trained" and body["window"] == 64
    assert body["window_unit"] == "characters"
    assert len(body["results"]) == 2
    for res in body["results"]:
        assert len(res["top_k"]) == 2 and {p["label"] for p in res["top_k"]} <= set(TEXT_LABELS)
        assert res["top_k"][0]["probability"] >= res["top_k"][1]["probability"]
        assert res["truncated"] is False
    default = tclient.post("/text/classify", json={"texts": ["x"]}).json()
    assert len(default["results"][0]["top_k"]) == 3  # top_k 5 capped at the 3 labels
    assert abs(sum(p["probability"] for p in default["results"][0]["top_k"]) - 1) < 1e-4


def test_unicode_and_long_texts(tclient: TestClient) -> None:
    texts = ["Goal! ⚽🎉 2-1", "東京で株価が上昇", "הבורסה עלתה היום", "e\u0301te\u0301 café", "a" * 4000]
    r = tclient.post("/text/classify", json={"texts": texts})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 5 and results[-1]["truncated"] is True and results[0]["truncated"] is False


def test_same_text_same_answer_alone_or_batched(tclient: TestClient) -> None:
    alone = tclient.post("/text/classify", json={"texts": ["Oil prices rise"]}).json()["results"][0]
    batched = tclient.post("/text/classify", json={"texts": ["Other text", "Oil prices rise"]}).json()["results"][1]
    assert [p["label"] for p in alone["top_k"]] == [p["label"] for p in batched["top_k"]]
    for a, b in zip(alone["top_k"], batched["top_k"], strict=True):
        assert abs(a["probability"] - b["probability"]) < 1e-4


def test_small_inputs_are_checked_on_the_loop_large_ones_in_a_thread(
        tclient: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    import app.services.text as text_service

    hops: list[str] = []
    real = text_service.asyncio.to_thread

    async def counting(fn, *a, **kw):  # type: ignore[no-untyped-def]
        hops.append(getattr(fn, "__name__", "?"))
        return await real(fn, *a, **kw)

    monkeypatch.setattr(text_service.asyncio, "to_thread", counting)
    small = ["a" * 60, "b" * (text_service.INLINE_CHARS - 60)]  # exactly at the limit
    large = [*small, "c"]
    for texts, want in ((small, []), (large, ["check_and_measure"])):
        hops.clear()
        r = tclient.post("/text/classify", json={"texts": texts})
        assert r.status_code == 200, r.text
        assert hops == want
        assert [x["truncated"] for x in r.json()["results"]] == [False, True] + [False] * (len(texts) - 2)
    # the same checks either way: a blank text is refused with its index, however the request is sized
    for texts in (["ok", " "], ["x" * 3000, " "]):
        assert "texts[1]" in assert_problem(tclient.post("/text/classify", json={"texts": texts}), 422)["detail"]


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({"texts": ["ok", "   "]}, "texts[1]"),
        ({"texts": ["", "ok"]}, "texts[0]"),
        ({"texts": []}, "texts"),
        ({"texts": "not a list"}, "texts"),
        ({"texts": [1, 2]}, "texts"),
        ({"texts": ["ok"], "top_k": 0}, "top_k"),
        ({"texts": ["ok"], "top_k": "many"}, "top_k"),
        ({"texts": ["ok"], "unexpected": 1}, "unexpected"),
        ({}, "texts"),
        ({"texts": ["x"] * 9}, "at most 8"),
        ({"texts": ["x" * 5001]}, "texts[0]"),
    ],
)
def test_invalid_requests_are_422(tclient: TestClient, payload: dict, needle: str) -> None:
    body = assert_problem(tclient.post("/text/classify", json=payload), 422)
    assert needle in body["detail"]


def test_malformed_json_is_422_problem(tclient: TestClient) -> None:
    r = tclient.post("/text/classify", content=b"{not json", headers={"content-type": "application/json"})
    assert_problem(r, 422)


def test_unknown_model_404_and_image_model_is_not_a_text_model(tclient: TestClient) -> None:
    assert_problem(tclient.post("/text/classify", json={"texts": ["a"], "model": "nope"}), 404)
    assert_problem(tclient.post("/text/classify", json={"texts": ["a"], "model": "tiny-cifar"}), 404)


def test_oversized_body_is_413(text_settings: Settings, client_factory) -> None:
    with client_factory(text_settings.model_copy(update={"max_body_bytes": 10_000})) as c:
        assert_problem(c.post("/text/classify", json={"texts": ["word " * 5000]}), 413)


def test_no_text_model_configured_is_503(client: TestClient) -> None:
    assert_problem(client.post("/text/classify", json={"texts": ["a"]}), 503)


def test_models_lists_text_model(tclient: TestClient) -> None:
    body = tclient.get("/models").json()
    assert body["default_text_model"] == "tiny-text"
    m = next(x for x in body["models"] if x["name"] == "tiny-text")
    assert m["task"] == "text-classification" and m["status"] == "ready" and m["input_size"] == 64


def test_concurrent_text_requests_are_batched(text_settings: Settings, client_factory) -> None:
    s = text_settings.model_copy(update={"batch_max_wait_ms": 200.0})
    with client_factory(s) as c:
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda i: c.post("/text/classify", json={"texts": [f"t{i}"]}).status_code,
                                  range(8)))
        assert codes == [200] * 8
        text = c.get("/metrics").text
        count = float(text.split('cnn_batch_size_count{model="tiny-text"} ')[1].split()[0])
        total = float(text.split('cnn_batch_size_sum{model="tiny-text"} ')[1].split()[0])
        assert total == 8 and total / count > 1


def test_chunked_json_over_the_limit_is_413(text_settings: Settings, client_factory) -> None:
    with client_factory(text_settings.model_copy(update={"max_body_bytes": 10_000})) as c:
        chunks = [b'{"texts": ["'] + [b"word " * 1000] * 5 + [b'"]}']
        r = c.post("/text/classify", content=iter(chunks), headers={"content-type": "application/json"})
        assert_problem(r, 413)
