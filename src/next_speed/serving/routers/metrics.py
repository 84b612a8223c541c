"""GET /metrics: Prometheus metrics of the app (requests and errors by route and status, sentences,
tokens, queue length, latency per stage)."""

from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

router = APIRouter(tags=["metrics"])


class Metrics:
    """Prometheus metrics of one app (its own registry, so several apps can live in one process)."""

    def __init__(self, queue_len: Callable[[], int]):
        self.registry = reg = CollectorRegistry()
        self.requests = Counter(
            "nextspeed_requests", "HTTP requests answered, by route and status", ["endpoint", "status"], registry=reg
        )
        self.errors = Counter(
            "nextspeed_errors", "HTTP requests answered with a 4xx or 5xx status", ["endpoint", "status"], registry=reg
        )
        self.sentences = Counter("nextspeed_sentences", "sentences generated", registry=reg)
        self.tokens = Counter("nextspeed_tokens", "decoder tokens of the generated sentences", registry=reg)
        self.queue = Gauge("nextspeed_queue_length", "generation requests in flight (waiting or running)", registry=reg)
        self.queue.set_function(queue_len)
        self.stage = Histogram(
            "nextspeed_stage_seconds",
            "latency per stage: prompt, planner, decoder and rerank per sentence step; queued and total per generation",
            ["stage"],
            registry=reg,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )

    def count(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            self.errors.labels(endpoint, str(status)).inc()

    def record(self, res) -> None:
        """Count one finished generation's sentences, tokens and stage latencies."""
        for st in res.steps:
            for stage in ("planner", "decoder", "rerank"):
                if stage in st.timings:
                    self.stage.labels(stage).observe(st.timings[stage])
            if st.chosen is not None:
                self.tokens.inc(st.tokens)
        self.sentences.inc(len(res.sentences))
        for stage in ("prompt", "queued", "total"):
            if stage in res.timings:
                self.stage.labels(stage).observe(res.timings[stage])


@router.get("/metrics", response_class=Response)
async def prom_metrics(request: Request):
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
