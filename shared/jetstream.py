"""Connecting to NATS and declaring billy-tools' streams, consumer and buckets.

Every service calls `declare` at start-up: it creates what is missing, leaves what
matches alone, and updates (with a logged warning) what has drifted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from shared import subjects
from shared.errors import BillyToolsError
from shared.settings import Settings

logger = logging.getLogger(__name__)

# Work items carry inputs inline; 8 MiB matches the server's max_payload we configure.
MAX_WORK_ITEM_BYTES = 8 * 1024 * 1024


@dataclass
class Buckets:
    """Handles on the key-value buckets and object stores every service uses."""

    runs: KeyValue
    requests: KeyValue
    staging: ObjectStore
    artifacts: ObjectStore


async def connect(settings: Settings, name: str) -> NATS:
    """Connect with endless reconnects, logging connection changes."""

    async def on_error(exc: Exception) -> None:
        logger.warning("nats_error client=%s error=%s", name, exc)

    async def on_disconnected() -> None:
        logger.warning("nats_disconnected client=%s", name)

    async def on_reconnected() -> None:
        logger.info("nats_reconnected client=%s", name)

    try:
        return await nats.connect(
            servers=settings.nats_servers(),
            name=name,
            user=settings.nats_user,
            password=settings.nats_password.get_secret_value() if settings.nats_password else None,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=5,
            error_cb=on_error,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
        )
    except Exception as exc:
        raise BillyToolsError(f"cannot connect to NATS at {settings.nats_url}: {exc}") from exc


def work_stream_config(settings: Settings) -> StreamConfig:
    return StreamConfig(
        name=subjects.WORK_STREAM,
        description="Admitted runs waiting for an executor",
        subjects=[subjects.WORK_SUBJECT],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        discard=DiscardPolicy.NEW,
        duplicate_window=min(settings.duplicate_window_s, 3600.0),
        max_msg_size=MAX_WORK_ITEM_BYTES,
    )


def events_stream_config(settings: Settings) -> StreamConfig:
    return StreamConfig(
        name=subjects.EVENTS_STREAM,
        description="Run events, one subject per run",
        subjects=[f"{subjects.EVENTS_SUBJECT_PREFIX}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=settings.events_max_age_s,
        duplicate_window=120.0,
    )


def executor_consumer_config(settings: Settings) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=subjects.EXECUTOR_CONSUMER,
        description="Shared by every executor replica",
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=settings.executor_ack_wait_s,
        # Executors count deliveries themselves and end the run in infra_error, so
        # that a run never silently stops being delivered.
        max_deliver=-1,
        max_ack_pending=10_000,
        filter_subject=subjects.WORK_SUBJECT,
    )


# Fields compared to detect drift; the server fills in the others.
_STREAM_FIELDS = ("subjects", "retention", "max_age", "duplicate_window", "max_msg_size")


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream, or update it when its configuration drifted."""
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        await js.add_stream(config)
        logger.info("stream_created stream=%s", config.name)
        return
    drift = {
        field: (getattr(info.config, field), getattr(config, field))
        for field in _STREAM_FIELDS
        if getattr(config, field) is not None
        and getattr(info.config, field) != getattr(config, field)
    }
    if not drift:
        return
    logger.warning("stream_drift stream=%s drift=%s; updating", config.name, drift)
    try:
        await js.update_stream(config)
    except BadRequestError as exc:
        raise BillyToolsError(
            f"stream {config.name} exists with a different configuration {drift} "
            f"that cannot be updated: {exc.description}"
        ) from exc


async def ensure_consumer(js: JetStreamContext, stream: str, config: ConsumerConfig) -> None:
    """Create the durable consumer, or update its ack wait when it drifted."""
    try:
        info = await js.consumer_info(stream, config.durable_name)
    except NotFoundError:
        await js.add_consumer(stream, config)
        logger.info("consumer_created stream=%s consumer=%s", stream, config.durable_name)
        return
    if info.config.ack_wait != config.ack_wait or info.config.max_deliver != config.max_deliver:
        logger.warning(
            "consumer_drift consumer=%s ack_wait=%s->%s; updating",
            config.durable_name,
            info.config.ack_wait,
            config.ack_wait,
        )
        await js.add_consumer(stream, config)


async def declare(nc: NATS, settings: Settings) -> tuple[JetStreamContext, Buckets]:
    """Declare every stream, consumer and bucket; returns handles on the buckets."""
    js = nc.jetstream()
    await ensure_stream(js, work_stream_config(settings))
    await ensure_stream(js, events_stream_config(settings))
    await ensure_consumer(js, subjects.WORK_STREAM, executor_consumer_config(settings))
    runs = await js.create_key_value(
        KeyValueConfig(
            bucket=subjects.RUNS_BUCKET,
            description="Run ledger: run_id -> RunRecord",
            history=1,
            ttl=settings.runs_max_age_s,
            storage=StorageType.FILE,
        )
    )
    requests = await js.create_key_value(
        KeyValueConfig(
            bucket=subjects.REQUESTS_BUCKET,
            description="Idempotency: tenant + request_id -> run_id",
            history=1,
            ttl=settings.duplicate_window_s,
            storage=StorageType.FILE,
        )
    )
    staging = await js.create_object_store(
        subjects.STAGING_BUCKET,
        ObjectStoreConfig(description="Artifacts in transit to the artifacts service", ttl=3600),
    )
    artifacts = await js.create_object_store(
        subjects.ARTIFACTS_BUCKET,
        ObjectStoreConfig(
            description="Stored artifacts, <run_id>/<path>", ttl=settings.runs_max_age_s
        ),
    )
    return js, Buckets(runs=runs, requests=requests, staging=staging, artifacts=artifacts)
