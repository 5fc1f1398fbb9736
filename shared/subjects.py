"""Every NATS subject, stream, consumer, bucket and header name of the wire contract.

docs/docker-execution.md documents each one; change both together.
"""

# Request/reply: Billy (or any client) submits a run to admission.
SUBMIT_SUBJECT = "billy.runs.submit"
# Request/reply: list the ToolSpecs admission knows.
TOOLS_SUBJECT = "billy.tools.list"
# Queue groups, so that replicas of a service share the load.
ADMISSION_QUEUE = "billy-admission"
ARTIFACTS_QUEUE = "billy-artifacts"

# JetStream work queue between admission and the executors.
WORK_STREAM = "BILLY_WORK"
WORK_SUBJECT = "billy.work.runs"
EXECUTOR_CONSUMER = "billy-executors"

# JetStream stream of run events: billy.events.<tenant>.<run_id>.
EVENTS_STREAM = "BILLY_EVENTS"
EVENTS_SUBJECT_PREFIX = "billy.events"

# Request/reply: the executor hands each collected artifact to the artifacts service.
ARTIFACT_INGEST_SUBJECT = "billy.artifacts.ingest"

# Key-value buckets.
RUNS_BUCKET = "billy_runs"  # run_id -> RunRecord (the run ledger)
REQUESTS_BUCKET = "billy_requests"  # tenant + request_id -> run_id (idempotency)

# Object stores.
STAGING_BUCKET = "billy_staging"  # executor -> artifacts service hand-off
ARTIFACTS_BUCKET = "billy_artifacts"  # stored artifacts, named <run_id>/<path>

# Headers.
TRACEPARENT_HEADER = "traceparent"
TRACESTATE_HEADER = "tracestate"
MSG_ID_HEADER = "Nats-Msg-Id"
RUN_ID_HEADER = "Billy-Run-Id"


def events_subject(tenant: str, run_id: str) -> str:
    """Subject of one run's events."""
    return f"{EVENTS_SUBJECT_PREFIX}.{tenant}.{run_id}"


def run_events_filter(run_id: str) -> str:
    """Subject filter matching one run's events whatever its tenant."""
    return f"{EVENTS_SUBJECT_PREFIX}.*.{run_id}"


def tenant_events_filter(tenant: str | None = None) -> str:
    """Subject filter matching every event of a tenant, or of all tenants."""
    return f"{EVENTS_SUBJECT_PREFIX}.{tenant or '*'}.*"
