"""Merging Prometheus expositions of several processes (the Ray Serve ingress and its application replicas)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from app.metrics import Metrics, merge_expositions


def _replica(model: str, batches: list[int]) -> str:
    m = Metrics()
    for n in batches:
        m.batch_run(model, n, 0.01)
    m.model_ready.labels(model, "image-classification").set(1)
    return m.render().decode()


def test_each_family_once_with_every_process_samples_labelled() -> None:
    ingress = Metrics()
    ingress.requests.labels("/classify", "POST", "200").inc(3)
    merged = merge_expositions(ingress.render().decode(), [
        ({"application": "classification", "replica": "r1"}, _replica("m", [2, 4])),
        ({"application": "classification", "replica": "r2"}, _replica("m", [8])),
    ])
    families = list(text_string_to_metric_families(merged))
    names = [f.name for f in families]
    assert len(names) == len(set(names)), "a family appears twice"
    by_name = {f.name: f for f in families}
    counts = {s.labels["replica"]: s.value for s in by_name["cnn_batch_size"].samples
              if s.name == "cnn_batch_size_count"}
    sums = {s.labels["replica"]: s.value for s in by_name["cnn_batch_size"].samples if s.name == "cnn_batch_size_sum"}
    assert counts == {"r1": 2.0, "r2": 1.0} and sums == {"r1": 6.0, "r2": 8.0}
    ready = [s for s in by_name["cnn_model_ready"].samples]
    assert {(s.labels["replica"], s.labels["model"], s.value) for s in ready} == {("r1", "m", 1.0), ("r2", "m", 1.0)}
    http = [s for s in by_name["cnn_http_requests"].samples if s.name == "cnn_http_requests_total"]
    assert [(s.labels, s.value) for s in http] == [({"route": "/classify", "method": "POST", "status": "200"}, 3.0)]
    assert by_name["cnn_batch_size"].type == "histogram" and by_name["cnn_http_requests"].type == "counter"


def test_label_values_are_escaped() -> None:
    merged = merge_expositions(Metrics().render().decode(), [({"replica": 'a"b\\c'}, _replica("m", [1]))])
    ready = next(f for f in text_string_to_metric_families(merged) if f.name == "cnn_model_ready")
    assert ready.samples[0].labels["replica"] == 'a"b\\c'
