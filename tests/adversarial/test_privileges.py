"""Privilege attempts: mount, unshare, setns, setuid binaries and masked /proc files.

The container runs as 65534 with every capability dropped, no-new-privileges and
Docker's default seccomp profile: each attempt fails inside the container, and the tool
reports what it saw as JSON.
"""

from __future__ import annotations

import json

from tests.adversarial.conftest import assert_host_unaffected, assert_nothing_leaks, run_hostile

TOOL_UID = "65534"

# Shared by the probes: a libc call's outcome, as "ok" or the errno name.
LIBC = """
import ctypes, errno, json, os

libc = ctypes.CDLL(None, use_errno=True)

def call(function, *args):
    ctypes.set_errno(0)
    if getattr(libc, function)(*args) == 0:
        return "ok"
    return errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))

def attempt(action):
    try:
        action()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))

def status(*names):
    lines = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {name: lines[name].split() for name in names}
"""


async def probe(client, docker, marker: str, code: str, logs) -> dict:
    """Run a probe that prints JSON; check the run, the host and the caps; the JSON."""
    result, events = await run_hostile(client, f"# {marker}\n{LIBC}\n{code}")

    assert result.status == "succeeded", (result.reason, result.message, result.stderr)
    assert result.reason is None
    assert_nothing_leaks(result, events, logs.records)
    await assert_host_unaffected(client, docker, result, marker)
    return json.loads(result.stdout)


async def test_mount_fails_with_eperm(client, docker, marker, service_logs):
    code = """
os.makedirs("/tmp/target", exist_ok=True)
print(json.dumps({
    "tmpfs": call("mount", b"none", b"/tmp/target", b"tmpfs", 0, None),
    "bind_root": call("mount", b"/", b"/tmp/target", None, 4096, None),  # MS_BIND
    "proc": call("mount", b"proc", b"/tmp/target", b"proc", 0, None),
    "remount_root_rw": call("mount", None, b"/", None, 32, None),  # MS_REMOUNT
}))
"""
    found = await probe(client, docker, marker, code, service_logs)

    assert found == {
        "tmpfs": "EPERM",
        "bind_root": "EPERM",
        "proc": "EPERM",
        "remount_root_rw": "EPERM",
    }


async def test_unshare_of_every_namespace_fails_with_eperm(client, docker, marker, service_logs):
    code = """
flags = {
    "user": 0x10000000, "mount": 0x00020000, "net": 0x40000000,
    "pid": 0x20000000, "uts": 0x04000000, "ipc": 0x08000000, "cgroup": 0x02000000,
}
print(json.dumps({name: call("unshare", flag) for name, flag in flags.items()}))
"""
    found = await probe(client, docker, marker, code, service_logs)

    assert found == dict.fromkeys(("user", "mount", "net", "pid", "uts", "ipc", "cgroup"), "EPERM")


async def test_setns_into_any_namespace_fails_with_eperm(client, docker, marker, service_logs):
    # PID 1 is docker-init, running as the tool's user: its namespace files can be opened.
    code = """
found = {}
for pid in ("self", "1"):
    for kind in ("mnt", "net", "pid", "user"):
        fd = os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY)
        found[f"{pid}/{kind}"] = call("setns", fd, 0)
        os.close(fd)
print(json.dumps(found))
"""
    found = await probe(client, docker, marker, code, service_logs)

    assert len(found) == 8
    assert set(found.values()) == {"EPERM"}, found


async def test_no_new_privileges_holds_and_no_capability_is_left(
    client, docker, marker, service_logs
):
    code = """
names = ("NoNewPrivs", "Seccomp", "Uid", "Gid", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
print(json.dumps(status(*names)))
"""
    found = await probe(client, docker, marker, code, service_logs)

    assert found["NoNewPrivs"] == ["1"]
    assert found["Seccomp"] == ["2"]  # a filter is in force
    assert found["Uid"] == [TOOL_UID] * 4
    assert found["Gid"] == [TOOL_UID] * 4
    for capabilities in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(found[capabilities][0], 16) == 0, (capabilities, found[capabilities])


async def test_setuid_root_binary_of_the_image_runs_without_gaining_root(
    client, docker, marker, service_logs
):
    # su is setuid root in the image. While it waits at its password prompt, its own
    # /proc status shows the uids it runs with: without no-new-privileges, euid 0.
    code = """
import stat, subprocess
su = os.stat("/usr/bin/su")
process = subprocess.Popen(
    ["/usr/bin/su", "root", "-c", "id"],
    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
)
prompt = process.stderr.read(len("Password: ")).decode()
uids = open(f"/proc/{process.pid}/status").read().split("Uid:")[1].split()[:4]
process.kill()
process.wait()
print(json.dumps({
    "setuid_root": bool(su.st_mode & stat.S_ISUID) and su.st_uid == 0,
    "prompt": prompt,
    "uids_while_running": uids,
}))
"""
    found = await probe(client, docker, marker, code, service_logs)

    assert found["setuid_root"] is True
    assert found["prompt"] == "Password: "  # su was running when its status was read
    assert found["uids_while_running"] == [TOOL_UID] * 4


async def test_setuid_file_made_in_the_workspace_cannot_belong_to_root(
    client, docker, marker, service_logs
):
    code = """
import shutil, stat
path = "/workspace/out/escalate"
shutil.copyfile("/usr/bin/id", path)
os.chmod(path, 0o4755)
made = os.stat(path)
print(json.dumps({
    "owner": made.st_uid,
    "setuid": bool(made.st_mode & stat.S_ISUID),
    "chown_to_root": attempt(lambda: os.chown(path, 0, 0)),
    "setuid_on_root_file": attempt(lambda: os.chmod("/workspace/arguments.json", 0o4755)),
    "setgid_to_root": attempt(lambda: os.chown(path, -1, 0)),
    "owner_after": os.stat(path).st_uid,
    "mount_options": {
        fields[4]: fields[5].split(",")
        for fields in (line.split() for line in open("/proc/self/mountinfo"))
        if fields[4] in ("/workspace", "/tmp")
    },
}))
"""
    found = await probe(client, docker, marker, code, service_logs)

    # The bit can be set, but only on a file of the tool's own uid: it lends nothing.
    assert found["setuid"] is True
    assert found["owner"] == found["owner_after"] == int(TOOL_UID)
    assert found["chown_to_root"] == "EPERM"
    assert found["setgid_to_root"] == "EPERM"
    assert found["setuid_on_root_file"] == "EPERM"
    # And the kernel ignores the bit where the tool can write at all.
    assert sorted(found["mount_options"]) == ["/tmp", "/workspace"]
    for mount_point, options in found["mount_options"].items():
        assert "nosuid" in options, (mount_point, options)


async def test_kernel_memory_keys_and_timers_in_proc_are_masked_or_absent(
    client, docker, marker, service_logs
):
    code = """
def read(path):
    try:
        with open(path, "rb") as source:
            return len(source.read(4096))
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))

def write(path):
    # r+: no O_CREAT, so an absent file reads ENOENT rather than a file system error.
    return attempt(lambda: open(path, "r+").write("1"))

print(json.dumps({
    "read": {path: read(path) for path in (
        "/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug",
        "/proc/latency_stats",
    )},
    "firmware": os.listdir("/sys/firmware") if os.path.isdir("/sys/firmware") else [],
    "write": {path: write(path) for path in (
        "/proc/sysrq-trigger", "/proc/sys/kernel/hostname", "/proc/sys/vm/drop_caches",
    )},
}))
"""
    found = await probe(client, docker, marker, code, service_logs)

    # Masked (Docker binds /dev/null over it: 0 bytes), absent, or denied: never content.
    for path, outcome in found["read"].items():
        assert outcome in (0, "ENOENT", "EACCES", "EPERM"), (path, outcome)
    assert found["firmware"] == []
    for path, outcome in found["write"].items():
        assert outcome in ("ENOENT", "EROFS", "EACCES", "EPERM"), (path, outcome)
    # This one exists on every Linux: the refusal is the file system's, not an absence.
    assert found["write"]["/proc/sys/kernel/hostname"] in ("EROFS", "EACCES")
