"""EffectiveLimits: a ToolSpec's limits, lowered but never raised by the request."""

from __future__ import annotations

import pytest

from services.admission.errors import RequestRejected
from services.admission.limits import effective_limits
from shared.toolspec import ToolSpec
from shared.wire import RequestedLimits

MiB = 1024 * 1024


def make_spec() -> ToolSpec:
    return ToolSpec.model_validate(
        {
            "name": "admtest-limits",
            "version": "1",
            "image": {"ref": "billy/admtest-limits:1"},
            "command": ["true"],
            "limits": {
                "cpus": 0.5,
                "memory_bytes": 64 * MiB,
                "pids": 32,
                "timeout": {"default_s": 10, "max_s": 60, "stop_grace_s": 1},
                "stdout_bytes": 1000,
            },
            "filesystem": {"tmp_bytes": 2 * MiB},
        }
    )


def test_without_requested_limits_the_run_gets_the_spec_defaults():
    limits = effective_limits(make_spec(), None)

    assert (limits.cpus, limits.memory_bytes, limits.timeout_s) == (0.5, 64 * MiB, 10.0)
    assert (limits.pids, limits.stop_grace_s, limits.stdout_bytes) == (32, 1.0, 1000)
    assert limits.tmp_bytes == 2 * MiB


def test_requested_limits_lower_the_spec_limits():
    requested = RequestedLimits(timeout_s=60, memory_bytes=32 * MiB, cpus=0.25)

    limits = effective_limits(make_spec(), requested)

    assert (limits.timeout_s, limits.memory_bytes, limits.cpus) == (60, 32 * MiB, 0.25)


def test_requested_limits_above_the_spec_are_rejected_with_asked_and_allowed_numbers():
    requested = RequestedLimits(timeout_s=61, memory_bytes=128 * MiB, cpus=0.5)

    with pytest.raises(RequestRejected) as caught:
        effective_limits(make_spec(), requested)

    assert caught.value.reason == "limit_exceeds_spec"
    assert "timeout_s 61 > 60.0" in caught.value.message
    assert f"memory_bytes {128 * MiB} > {64 * MiB}" in caught.value.message
    assert "cpus" not in caught.value.message


def test_requested_memory_below_what_docker_accepts_is_rejected():
    with pytest.raises(RequestRejected) as caught:
        effective_limits(make_spec(), RequestedLimits(memory_bytes=1024))

    assert caught.value.reason == "limit_below_minimum"
    assert "memory_bytes 1024 <" in caught.value.message
