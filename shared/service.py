"""Process lifecycle shared by the admission, executor and artifacts services.

Each service is a class with `start()` and `stop()`; `serve()` runs one until SIGTERM or
SIGINT, with logging, tracing and the Prometheus endpoint set up. Every running service
answers `billy.ping.<service>` so that the CLI can tell when the stack is ready.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import time
from typing import Protocol

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from prometheus_client import start_http_server

from shared import logs, tracing
from shared.settings import Settings

logger = logging.getLogger(__name__)

PING_SUBJECT_PREFIX = "billy.ping"


class Service(Protocol):
    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def ping_subject(service: str) -> str:
    return f"{PING_SUBJECT_PREFIX}.{service}"


async def answer_pings(nc: NATS, service: str, instance: str) -> None:
    """Reply to billy.ping.<service> with who answered; replicas all answer."""
    started_at = time.time()

    async def on_ping(msg: Msg) -> None:
        body = {
            "service": service,
            "instance": instance,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "uptime_s": round(time.time() - started_at, 3),
        }
        await msg.respond(json.dumps(body).encode())

    await nc.subscribe(ping_subject(service), cb=on_ping)


def start_metrics(port: int, service: str, addr: str = "127.0.0.1") -> None:
    """Serve Prometheus metrics on `addr:port` (port 0 leaves them unserved)."""
    if not port:
        return
    try:
        start_http_server(port, addr=addr)
    except OSError as exc:
        # Metrics are worth a warning, not a service that refuses to run.
        logger.warning("metrics_unavailable service=%s port=%d error=%s", service, port, exc)
        return
    logger.info("metrics_serving service=%s port=%d", service, port)


async def serve(service: Service, settings: Settings, metrics_port: int) -> None:
    """Run `service` until SIGTERM or SIGINT, then stop it cleanly."""
    logs.configure(settings.log_level, service.name)
    tracing.configure(f"billy-{service.name}")
    start_metrics(metrics_port, service.name, settings.metrics_addr)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    await service.start()
    logger.info("service_started service=%s pid=%d", service.name, os.getpid())
    try:
        await stop.wait()
    finally:
        logger.info("service_stopping service=%s", service.name)
        await service.stop()
