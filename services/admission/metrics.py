"""Prometheus metrics of the admission service; labels stay few and bounded."""

from prometheus_client import Counter, Histogram

REQUESTS = Counter(
    "admission_requests_total",
    "Run requests answered, by tool, reply status and reason.",
    ["tool", "status", "reason"],
)
REQUEST_DURATION = Histogram(
    "admission_request_duration_seconds",
    "Time from receiving a run request to replying, by reply status.",
    ["status"],
)

UNKNOWN_TOOL = "unknown"
NO_REASON = "none"


def observe(tool: str, status: str, reason: str | None, elapsed_s: float) -> None:
    """Count one answered request; `tool` must already be a known tool or 'unknown'."""
    REQUESTS.labels(tool, status, reason or NO_REASON).inc()
    REQUEST_DURATION.labels(status).observe(elapsed_s)
