"""Prometheus metrics of the executor."""

from prometheus_client import Counter, Gauge, Histogram

_RUN_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900)

RUNS = Counter("executor_runs_total", "Runs finished, by terminal status.", ["status"])
RUN_DURATION = Histogram(
    "executor_run_duration_seconds", "Dequeue to terminal status.", buckets=_RUN_BUCKETS
)
QUEUE_WAIT = Histogram("executor_queue_wait_seconds", "Admission to dequeue.", buckets=_RUN_BUCKETS)
CONTAINER_START = Histogram(
    "executor_container_start_seconds",
    "Container create + start latency.",
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
)
RUNNING_CONTAINERS = Gauge("executor_running_containers", "Runs in progress on this executor.")
CAPACITY = Gauge("executor_capacity", "Runs this executor may have in progress at once.")
DOCKER_UP = Gauge("executor_docker_up", "1 when the Docker daemon answers, else 0.")
UNSIGNED_WORK_ITEMS = Counter(
    "executor_unsigned_work_items_total", "Work items refused for a missing or bad signature."
)
