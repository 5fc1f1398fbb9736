"""Prometheus metrics of the artifacts service."""

from prometheus_client import Counter, Histogram

ARTIFACTS_STORED = Counter("artifacts_stored_total", "Artifacts stored.")
ARTIFACTS_STORED_BYTES = Counter("artifacts_stored_bytes_total", "Bytes of artifacts stored.")
ARTIFACTS_REJECTED = Counter(
    "artifacts_rejected_total", "Output files refused, by reason.", ["reason"]
)
ARTIFACT_STORE_DURATION = Histogram(
    "artifacts_store_duration_seconds", "Time to validate, hash and store one artifact."
)
