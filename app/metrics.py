"""Prometheus metrics of one app instance (its own registry, so several apps can coexist in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)


class Metrics:
    """HTTP and batching metrics; also the batcher's observer."""

    def __init__(self) -> None:
        # labels this process's own samples carry when merged with other processes' (a front worker: its id, so
        # each series stays one worker's whichever worker answers a scrape)
        self.process_labels: dict[str, str] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("cnn_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("cnn_http_request_duration_seconds", "HTTP request latency by route and status",
                                 ["route", "method", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth_gauge = Gauge("cnn_batch_queue_depth", "Items waiting in a model's batch queue",
                                       ["model"], registry=r)
        self.queue_wait_hist = Histogram("cnn_batch_queue_wait_seconds", "Time an item waited before its batch ran",
                                         ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size_hist = Histogram("cnn_batch_size", "Items per forward pass", ["model"],
                                         buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("cnn_batch_forward_seconds", "Duration of one batched forward pass",
                                       ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.rejected_items = Counter("cnn_batch_rejected", "Items refused (queue_full) or dropped unrun because "
                                      "their request's deadline passed (deadline)", ["model", "reason"], registry=r)
        self.inflight = Gauge("cnn_requests_in_flight", "Requests admitted and not yet answered, per application",
                              ["application"], registry=r)
        self.inflight_limit = Gauge("cnn_requests_in_flight_limit", "The in-flight bound of each application",
                                    ["application"], registry=r)
        self.admission_rejected = Counter("cnn_admission_rejected", "Requests answered 503 at the gate because "
                                          "their application was at its in-flight bound", ["application"], registry=r)
        self.style_jobs = Gauge("cnn_style_jobs", "Style-transfer jobs by state", ["state"], registry=r)
        self.style_queue = Gauge("cnn_style_queue_length", "Style-transfer jobs waiting", registry=r)
        self.style_counts_errors = Counter("cnn_style_counts_errors", "Scrapes whose style-job counts could not be "
                                           "read from the job store in time (the gauges keep their last values)",
                                           registry=r)
        self.style_seconds = Histogram("cnn_style_job_duration_seconds", "Run time of style-transfer jobs",
                                       ["status"], buckets=(1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 3600),
                                       registry=r)
        self.model_ready = Gauge("cnn_model_ready", "1 when a model is loaded and serving", ["model", "task"],
                                 registry=r)

    # BatchObserver protocol
    def batch_run(self, model: str, size: int, seconds: float) -> None:
        """Record one batch."""
        self.batch_size_hist.labels(model).observe(size)
        self.batch_seconds.labels(model).observe(seconds)

    def queue_wait(self, model: str, seconds: float) -> None:
        """Record one item's wait in the queue."""
        self.queue_wait_hist.labels(model).observe(seconds)

    def queue_depth(self, model: str, depth: int) -> None:
        """Record a model's queue depth."""
        self.queue_depth_gauge.labels(model).set(depth)

    def rejected(self, model: str, items: int, reason: str) -> None:
        """Record items a batcher refused or dropped."""
        self.rejected_items.labels(model, reason).inc(items)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Record one HTTP request. Callers pass bounded values only: a route template or 'unmatched', a known
        method or 'other', a status code, so no client can grow the label set."""
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method, str(status)).observe(seconds)

    def set_admission(self, snapshot: dict[str, dict[str, int]]) -> None:
        """In-flight counts and bounds per application, read from the gate at scrape time."""
        for application, v in snapshot.items():
            self.inflight.labels(application).set(v["in_flight"])
            self.inflight_limit.labels(application).set(v["limit"])

    def style_job_finished(self, status: str, seconds: float) -> None:
        """Record one finished style job."""
        self.style_seconds.labels(status).observe(seconds)

    def set_style_counts(self, counts: dict[str, int]) -> None:
        """Job counts by state, read from the store at scrape time."""
        for state, n in counts.items():
            self.style_jobs.labels(state).set(n)
        self.style_queue.set(counts.get("queued", 0))

    def render(self) -> bytes:
        """Prometheus text exposition."""
        return generate_latest(self.registry)


def merge_expositions(own: str, others: list[tuple[dict[str, str], str]],
                      own_labels: dict[str, str] | None = None) -> str:
    """One exposition from this process's (with `own_labels` added) and other processes' (each with labels added
    to its samples, e.g. the replica it came from): every family once, with the samples of all (Prometheus refuses
    a family twice)."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, tuple[str, str, list[str]]] = {}
    for extra, text in [(own_labels or {}, own), *others]:
        for fam in text_string_to_metric_families(text):
            _, _, lines = families.setdefault(fam.name, (fam.type, fam.documentation, []))
            for sample in fam.samples:
                labels = {**sample.labels, **extra}
                body = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                lines.append(f"{sample.name}{{{body}}} {_number(sample.value)}" if body
                             else f"{sample.name} {_number(sample.value)}")
    out = []
    for name, (kind, doc, lines) in families.items():
        exposed = f"{name}_total" if kind == "counter" else name  # the text format names a counter by its samples
        out.append(f"# HELP {exposed} {doc}")
        out.append(f"# TYPE {exposed} {kind}")
        out.extend(lines)
    return "\n".join(out) + "\n"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v: float) -> str:
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else f"{float(v):.1f}"
