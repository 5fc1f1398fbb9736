"""`python -m services.admission` as a process: starts, answers its ping, stops on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import nats
import nats.errors

from shared.settings import REPO_ROOT
from tests.conftest import wait_for

TOOL_YAML = """\
name: admtest-proc
version: 0.0.1
image: {ref: "billy/admtest-proc:0.0.1"}
command: ["true"]
"""


async def test_module_runs_as_a_process_answers_ping_and_exits_cleanly_on_sigterm(
    nats_server, tmp_path
):
    tools_dir = tmp_path / "tools"
    (tools_dir / "admtest-proc").mkdir(parents=True)
    (tools_dir / "admtest-proc" / "tool.yaml").write_text(TOOL_YAML)
    env = {**os.environ, "NATS_URL": nats_server.url, "BILLY_TOOLS_DIR": str(tools_dir)}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.admission",
        cwd=REPO_ROOT,
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    nc = await nats.connect(nats_server.url)
    try:
        pong = await wait_for(lambda: ping(nc, process.pid), timeout_s=20)
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=20)
    finally:
        await nc.close()
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert (pong["service"], pong["pid"]) == ("admission", process.pid)
    assert b"admission_started" in stderr
    assert b"tools=1" in stderr
    assert process.returncode == 0, stderr.decode()[-2000:]
    assert b"admission_stopped" in stderr


async def ping(nc, pid: int) -> dict | None:
    """The answer of process `pid` to billy.ping.admission (other replicas may answer too)."""
    inbox = nc.new_inbox()
    subscription = await nc.subscribe(inbox)
    try:
        await nc.publish("billy.ping.admission", b"", reply=inbox)
        while True:
            reply = await subscription.next_msg(timeout=0.5)
            if not reply.data:  # the server's "no responders" status
                return None
            answer = json.loads(reply.data)
            if answer["pid"] == pid:
                return answer
    except nats.errors.TimeoutError:
        return None
    finally:
        await subscription.unsubscribe()
