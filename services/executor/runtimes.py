"""Container runtimes: whether the Docker daemon offers the one a ToolSpec asks for.

`runtime: runsc` (gVisor) only works on a daemon where runsc is registered in
daemon.json (scripts/setup.sh does it); docs/gvisor.md explains the choice.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import aiodocker

from services.executor.errors import RuntimeUnavailableError, docker_errors

logger = logging.getLogger(__name__)


def runtimes_of(info: Mapping[str, Any]) -> frozenset[str]:
    """The runtime names in a `GET /info` answer (its Runtimes mapping)."""
    return frozenset(info.get("Runtimes") or {})


def check_runtime(runtime: str, offered: frozenset[str]) -> None:
    """Raise RuntimeUnavailableError unless `runtime` is among the daemon's runtimes."""
    if runtime in offered:
        return
    names = ", ".join(sorted(offered)) or "none"
    raise RuntimeUnavailableError(
        runtime,
        f"the tool asks for container runtime {runtime!r}, which the Docker daemon does not "
        f"offer (it has: {names}); register it in daemon.json, see docs/gvisor.md",
    )


class DaemonRuntimes:
    """The daemon's runtimes, asked once and kept; asked again only for a missing one."""

    def __init__(self, docker: aiodocker.Docker) -> None:
        self._docker = docker
        self._offered: frozenset[str] | None = None

    async def require(self, runtime: str) -> None:
        """Return when the daemon offers `runtime`; raise RuntimeUnavailableError when not."""
        # A miss asks again, so that a daemon reloaded with runsc (SIGHUP) is seen at once.
        if self._offered is None or runtime not in self._offered:
            with docker_errors("list the daemon's runtimes"):
                info = await self._docker.system.info()
            self._offered = runtimes_of(info)
            logger.info("daemon_runtimes runtimes=%s", ",".join(sorted(self._offered)))
        check_runtime(runtime, self._offered)
