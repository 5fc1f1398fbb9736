"""The security baseline as data: one item per check, with its CIS and OWASP references.

Each item checks what the Docker Engine reports of a tool's canary container (GET
/containers/{id}/json), the daemon's GET /info, and, where the kernel's view matters,
/proc/self of the canary's process. `billy-tools doctor` runs them; docs/security-baseline.md
documents the same table (a test keeps the two in step). Ids are CIS Docker Benchmark
v1.6.0 section 4/5 ids as docker-bench-security numbers them; B.n are billy's own items.

Expected values come from the ToolSpec and the run's limits, never from
services/executor/policy.py, so that a weakened policy cannot pass its own check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.executor.model import RunContext
from services.executor.policy import pids_limit, tool_user

NANO_CPUS_PER_CPU = 1_000_000_000
NOFILE_LIMIT = 1024
WORKSPACE_TARGET = "/workspace"
TMP_TARGET = "/tmp"
TMP_FLAGS = {"noexec", "nosuid", "nodev"}
CAPABILITY_SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
# Seccomp: 2 in /proc/self/status is filter mode, the default profile in force.
SECCOMP_FILTER = "2"


@dataclass(frozen=True)
class Probe:
    """/proc/self of the canary's process: status, limits and mounts as the kernel has them."""

    status: dict[str, str]
    limits: dict[str, tuple[str, str]]  # "Max open files" -> (soft, hard)
    mounts: dict[str, tuple[str, frozenset[str]]]  # target -> (fstype, options)


@dataclass(frozen=True)
class Canary:
    """What the doctor saw of one tool's canary container."""

    context: RunContext
    image_id: str
    volume: str
    inspect: dict[str, Any]
    info: dict[str, Any]
    probe: Probe | None = None

    @property
    def host(self) -> dict[str, Any]:
        return self.inspect.get("HostConfig") or {}

    @property
    def config(self) -> dict[str, Any]:
        return self.inspect.get("Config") or {}


@dataclass(frozen=True)
class Verdict:
    passed: bool
    detail: str
    notes: list[str] = field(default_factory=list)


Check = Callable[[Canary], Verdict]


@dataclass(frozen=True)
class BaselineItem:
    """One baseline item: its id, what it checks, and the references it satisfies."""

    id: str
    title: str
    fields: str  # Docker Engine API fields checked
    owasp: str  # OWASP Docker Security Cheat Sheet rule
    check: Check
    relaxation: str | None = None  # operator-policy relaxation that may excuse a failure


def verdict(problems: list[str], passed_detail: str) -> Verdict:
    """FAIL listing the problems, or PASS with what was seen."""
    if problems:
        return Verdict(False, "; ".join(problems))
    return Verdict(True, passed_detail)


def parse_probe(text: str) -> Probe:
    """Parse `cat /proc/self/status /proc/self/limits /proc/self/mounts` output."""
    status: dict[str, str] = {}
    limits: dict[str, tuple[str, str]] = {}
    mounts: dict[str, tuple[str, frozenset[str]]] = {}
    for line in text.splitlines():
        if line.startswith("Max "):
            # Names are words separated by single spaces; columns by two or more.
            name, _, rest = line.partition("  ")
            values = rest.split()
            limits[name.strip()] = (values[0], values[1])
        elif ":" in line.split(" ", 1)[0]:
            key, _, value = line.partition(":")
            status[key] = value.strip()
        elif len(parts := line.split()) == 6 and parts[1].startswith("/"):
            mounts[parts[1]] = (parts[2], frozenset(parts[3].split(",")))
    return Probe(status, limits, mounts)


# -- checks -------------------------------------------------------------------------------


def check_user(canary: Canary) -> Verdict:
    uid, gid = tool_user(canary.context.spec.user)
    user = canary.config.get("User", "")
    problems = [] if user == f"{uid}:{gid}" else [f"User is {user!r}, expected '{uid}:{gid}'"]
    if uid == 0 or user.split(":")[0] in ("", "0", "root"):
        problems.append("runs as root")
    if canary.probe is not None:
        real_uids = set(canary.probe.status.get("Uid", "").split())
        if real_uids != {str(uid)}:
            problems.append(f"process uids are {sorted(real_uids)}, expected {uid}")
    return verdict(problems, f"User {user}")


def check_apparmor(canary: Canary) -> Verdict:
    if not _daemon_has(canary, "apparmor"):
        return Verdict(True, "host has no AppArmor; not applicable")
    profile = canary.inspect.get("AppArmorProfile", "")
    problems = [] if profile not in ("", "unconfined") else [f"AppArmorProfile {profile!r}"]
    return verdict(problems, f"AppArmorProfile {profile}")


def check_capabilities(canary: Canary) -> Verdict:
    dropped = [cap.upper() for cap in canary.host.get("CapDrop") or []]
    added = canary.host.get("CapAdd") or []
    problems = [] if dropped == ["ALL"] else [f"CapDrop is {dropped}, expected ['ALL']"]
    if added:
        problems.append(f"CapAdd is {added}")
    if canary.probe is not None:
        for name in CAPABILITY_SETS:
            value = canary.probe.status.get(name)
            if value is None or int(value, 16) != 0:
                problems.append(f"{name} of the process is {value}")
    return verdict(problems, "CapDrop ALL, no CapAdd; every capability set of the process 0")


def check_privileged(canary: Canary) -> Verdict:
    privileged = canary.host.get("Privileged")
    return verdict(["Privileged is true"] if privileged else [], "Privileged false")


def check_mounts(canary: Canary) -> Verdict:
    mounts = canary.inspect.get("Mounts") or []
    problems = [f"Binds {canary.host['Binds']}"] if canary.host.get("Binds") else []
    for mount in mounts:
        workspace = (
            mount.get("Type") == "volume"
            and mount.get("Name") == canary.volume
            and mount.get("Destination") == WORKSPACE_TARGET
        )
        if not workspace:
            problems.append(
                f"{mount.get('Type')} mount {mount.get('Source')} at {mount.get('Destination')}"
            )
    if len(mounts) != 1:
        problems.append(f"{len(mounts)} mounts, expected the workspace volume only")
    if canary.host.get("VolumesFrom"):
        problems.append(f"VolumesFrom {canary.host['VolumesFrom']}")
    return verdict(problems, f"only the run's workspace volume at {WORKSPACE_TARGET}")


def check_ports(canary: Canary) -> Verdict:
    bindings = canary.host.get("PortBindings") or {}
    problems = [f"PortBindings {sorted(bindings)}"] if bindings else []
    if canary.host.get("PublishAllPorts"):
        problems.append("PublishAllPorts is true")
    return verdict(problems, "no port published")


def check_network(canary: Canary) -> Verdict:
    mode = canary.host.get("NetworkMode")
    networks = sorted((canary.inspect.get("NetworkSettings") or {}).get("Networks") or {})
    problems = [] if mode == "none" else [f"NetworkMode is {mode!r}, expected 'none'"]
    if networks not in ([], ["none"]):
        problems.append(f"attached to networks {networks}")
    return verdict(problems, "NetworkMode none")


def check_memory(canary: Canary) -> Verdict:
    expected = canary.context.limits.memory_bytes
    memory, swap = canary.host.get("Memory") or 0, canary.host.get("MemorySwap")
    problems = [] if memory == expected > 0 else [f"Memory is {memory}, expected {expected}"]
    if swap != memory:
        problems.append(f"MemorySwap is {swap}, expected {memory} (no swap)")
    if canary.info.get("MemoryLimit") is False:
        problems.append("the daemon reports no memory limit support")
    return verdict(problems, f"Memory = MemorySwap = {memory} bytes")


def check_cpu(canary: Canary) -> Verdict:
    expected = int(canary.context.limits.cpus * NANO_CPUS_PER_CPU)
    nano_cpus = canary.host.get("NanoCpus") or 0
    problems = (
        [] if nano_cpus == expected > 0 else [f"NanoCpus is {nano_cpus}, expected {expected}"]
    )
    if canary.info.get("CpuCfsQuota") is False:
        problems.append("the daemon reports no CFS quota support")
    return verdict(problems, f"NanoCpus {nano_cpus}")


def check_read_only_root(canary: Canary) -> Verdict:
    problems = [] if canary.host.get("ReadonlyRootfs") is True else ["ReadonlyRootfs is false"]
    if canary.probe is not None:
        _, options = canary.probe.mounts.get("/", ("", frozenset()))
        if "ro" not in options:
            problems.append(f"/ is mounted {','.join(sorted(options)) or 'unknown'}")
    return verdict(problems, "ReadonlyRootfs true; / mounted ro")


def check_restart(canary: Canary) -> Verdict:
    name = (canary.host.get("RestartPolicy") or {}).get("Name") or "no"
    return verdict([] if name == "no" else [f"RestartPolicy is {name!r}"], "RestartPolicy no")


def _namespace_check(field_name: str, private: tuple[str, ...]) -> Check:
    def check(canary: Canary) -> Verdict:
        mode = canary.host.get(field_name) or ""
        problems = [] if mode in private else [f"{field_name} is {mode!r}"]
        return verdict(problems, f"{field_name} {mode or 'private'}")

    return check


def check_devices(canary: Canary) -> Verdict:
    problems = [
        f"{name} {canary.host[name]}"
        for name in ("Devices", "DeviceRequests", "DeviceCgroupRules")
        if canary.host.get(name)
    ]
    return verdict(problems, "no host device")


def expected_ulimits(context: RunContext) -> dict[str, int]:
    """Ulimits the baseline sets, by Docker name."""
    fsize = max(context.limits.workspace_bytes, context.limits.tmp_bytes)
    return {"nofile": NOFILE_LIMIT, "core": 0, "fsize": fsize}


PROC_LIMIT_NAMES = {
    "nofile": "Max open files",
    "core": "Max core file size",
    "fsize": "Max file size",
}


def check_ulimits(canary: Canary) -> Verdict:
    expected = expected_ulimits(canary.context)
    found = {u["Name"]: (u["Soft"], u["Hard"]) for u in canary.host.get("Ulimits") or []}
    problems = [
        f"ulimit {name} is {found.get(name)}, expected {value}"
        for name, value in expected.items()
        if found.get(name) != (value, value)
    ]
    if canary.probe is not None:
        for name, value in expected.items():
            seen = canary.probe.limits.get(PROC_LIMIT_NAMES[name])
            if seen != (str(value), str(value)):
                problems.append(f"{PROC_LIMIT_NAMES[name]} of the process is {seen}")
    shown = ", ".join(f"{name} {value}" for name, value in expected.items())
    return verdict(problems, shown)


def check_propagation(canary: Canary) -> Verdict:
    shared = [
        mount.get("Destination")
        for mount in canary.inspect.get("Mounts") or []
        if mount.get("Propagation") in ("shared", "rshared")
    ]
    return verdict([f"shared propagation at {shared}"] if shared else [], "no shared mount")


def check_seccomp(canary: Canary) -> Verdict:
    options = canary.host.get("SecurityOpt") or []
    problems = [f"SecurityOpt {option}" for option in options if "unconfined" in option]
    if not _daemon_has(canary, "seccomp"):
        problems.append("the daemon has no seccomp support")
    # gVisor's Sentry filters its own syscalls; the tool's status shows gVisor's view.
    if canary.probe is not None and canary.context.spec.runtime == "runc":
        mode = canary.probe.status.get("Seccomp")
        if mode != SECCOMP_FILTER:
            problems.append(f"Seccomp of the process is {mode}, expected {SECCOMP_FILTER}")
    return verdict(problems, "Docker's default seccomp profile in force")


def check_cgroup_parent(canary: Canary) -> Verdict:
    parent = canary.host.get("CgroupParent") or ""
    return verdict([f"CgroupParent {parent!r}"] if parent else [], "daemon's default cgroup")


def check_no_new_privileges(canary: Canary) -> Verdict:
    options = canary.host.get("SecurityOpt") or []
    set_ = any(o in ("no-new-privileges", "no-new-privileges:true") for o in options)
    problems = [] if set_ else [f"SecurityOpt {options} lacks no-new-privileges"]
    if canary.probe is not None and canary.probe.status.get("NoNewPrivs") != "1":
        problems.append(f"NoNewPrivs of the process is {canary.probe.status.get('NoNewPrivs')}")
    return verdict(problems, "no-new-privileges; NoNewPrivs 1")


def check_pids(canary: Canary) -> Verdict:
    expected = pids_limit(canary.context)
    pids = canary.host.get("PidsLimit") or 0
    problems = [] if pids == expected > 0 else [f"PidsLimit is {pids}, expected {expected}"]
    if canary.info.get("PidsLimit") is False:
        problems.append("the daemon reports no pids cgroup support")
    return verdict(problems, f"PidsLimit {pids}")


def check_docker_socket(canary: Canary) -> Verdict:
    mounted = [
        f"{mount.get('Source')}:{mount.get('Destination')}"
        for mount in canary.inspect.get("Mounts") or []
        if "docker.sock" in f"{mount.get('Source')}{mount.get('Destination')}"
    ]
    mounted += [bind for bind in canary.host.get("Binds") or [] if "docker.sock" in bind]
    return verdict([f"docker.sock mounted: {mounted}"] if mounted else [], "not mounted")


def check_init(canary: Canary) -> Verdict:
    return verdict([] if canary.host.get("Init") is True else ["Init is not true"], "Init true")


def check_tmp(canary: Canary) -> Verdict:
    uid, gid = tool_user(canary.context.spec.user)
    size = canary.context.limits.tmp_bytes
    expected = {TMP_TARGET: f"rw,noexec,nosuid,nodev,size={size},uid={uid},gid={gid}"}
    tmpfs = canary.host.get("Tmpfs") or {}
    problems = [] if tmpfs == expected else [f"Tmpfs is {tmpfs}, expected {expected}"]
    if canary.probe is not None:
        fstype, options = canary.probe.mounts.get(TMP_TARGET, ("", frozenset()))
        if fstype != "tmpfs" or not TMP_FLAGS.issubset(options):
            problems.append(f"{TMP_TARGET} is {fstype or 'not mounted'} {sorted(options)}")
    return verdict(problems, f"{TMP_TARGET} tmpfs noexec,nosuid,nodev of {size} bytes")


def check_runtime(canary: Canary) -> Verdict:
    runtime, expected = canary.host.get("Runtime"), canary.context.spec.runtime
    problems = [] if runtime == expected else [f"Runtime is {runtime!r}, expected {expected!r}"]
    return verdict(problems, f"Runtime {runtime}")


def check_log_config(canary: Canary) -> Verdict:
    log_type = (canary.host.get("LogConfig") or {}).get("Type")
    return verdict([] if log_type == "none" else [f"LogConfig.Type is {log_type!r}"], "none")


def check_image_pinned(canary: Canary) -> Verdict:
    image, config_image = canary.inspect.get("Image"), canary.config.get("Image")
    problems = [] if image == canary.image_id else [f"Image is {image}"]
    if config_image != canary.image_id:
        problems.append(f"created from {config_image!r}, not the verified id")
    return verdict(problems, f"verified id {canary.image_id[:19]}")


def check_labels(canary: Canary) -> Verdict:
    labels = canary.config.get("Labels") or {}
    missing = {k: v for k, v in canary.context.labels().items() if labels.get(k) != v}
    return verdict([f"labels missing or different: {missing}"] if missing else [], "billy.*")


def _daemon_has(canary: Canary, option: str) -> bool:
    return any(f"name={option}" in entry for entry in canary.info.get("SecurityOptions") or [])


# -- the table ----------------------------------------------------------------------------

BASELINE: tuple[BaselineItem, ...] = (
    BaselineItem("4.1", "runs as a non-root user", "User", "#2", check_user),
    BaselineItem("5.2", "AppArmor profile, if applicable", "AppArmorProfile", "#6", check_apparmor),
    BaselineItem(
        "5.4", "capabilities restricted", "HostConfig.CapDrop, CapAdd", "#3", check_capabilities
    ),
    BaselineItem("5.5", "not privileged", "HostConfig.Privileged", "#3", check_privileged),
    BaselineItem(
        "5.6",
        "no host directory mounted",
        "HostConfig.Binds, Mounts, VolumesFrom",
        "#8",
        check_mounts,
    ),
    BaselineItem("5.8", "no privileged port mapped", "HostConfig.PortBindings", "#5a", check_ports),
    BaselineItem(
        "5.9",
        "only needed ports open",
        "HostConfig.PortBindings, PublishAllPorts",
        "#5a",
        check_ports,
    ),
    BaselineItem("5.10", "host network not shared", "HostConfig.NetworkMode", "#5", check_network),
    BaselineItem("5.11", "memory limited", "HostConfig.Memory, MemorySwap", "#7", check_memory),
    BaselineItem("5.12", "CPU limited", "HostConfig.NanoCpus", "#7", check_cpu),
    BaselineItem(
        "5.13",
        "root filesystem read-only",
        "HostConfig.ReadonlyRootfs",
        "#8",
        check_read_only_root,
        relaxation="read_only_root",
    ),
    BaselineItem(
        "5.14", "no port bound to a host interface", "HostConfig.PortBindings", "#5a", check_ports
    ),
    BaselineItem("5.15", "never restarted", "HostConfig.RestartPolicy", "#7", check_restart),
    BaselineItem(
        "5.16",
        "host PID namespace not shared",
        "HostConfig.PidMode",
        "-",
        _namespace_check("PidMode", ("",)),
    ),
    BaselineItem(
        "5.17",
        "host IPC namespace not shared",
        "HostConfig.IpcMode",
        "-",
        _namespace_check("IpcMode", ("private",)),
    ),
    BaselineItem(
        "5.18", "no host device", "HostConfig.Devices, DeviceRequests", "-", check_devices
    ),
    BaselineItem("5.19", "ulimits set", "HostConfig.Ulimits", "#7", check_ulimits),
    BaselineItem(
        "5.20", "mount propagation not shared", "Mounts[].Propagation", "-", check_propagation
    ),
    BaselineItem(
        "5.21",
        "host UTS namespace not shared",
        "HostConfig.UTSMode",
        "-",
        _namespace_check("UTSMode", ("",)),
    ),
    BaselineItem(
        "5.22",
        "default seccomp profile not disabled",
        "HostConfig.SecurityOpt",
        "#6",
        check_seccomp,
    ),
    BaselineItem("5.25", "cgroup confirmed", "HostConfig.CgroupParent", "#7", check_cgroup_parent),
    BaselineItem(
        "5.26", "no new privileges", "HostConfig.SecurityOpt", "#4", check_no_new_privileges
    ),
    BaselineItem("5.29", "PIDs cgroup limit used", "HostConfig.PidsLimit", "#7", check_pids),
    BaselineItem(
        "5.30", "default bridge docker0 not used", "HostConfig.NetworkMode", "#5", check_network
    ),
    BaselineItem(
        "5.31",
        "host user namespace not shared",
        "HostConfig.UsernsMode",
        "#2",
        _namespace_check("UsernsMode", ("",)),
    ),
    BaselineItem(
        "5.32", "Docker socket not mounted", "HostConfig.Binds, Mounts", "#1", check_docker_socket
    ),
    BaselineItem("B.1", "/tmp is a small noexec tmpfs", "HostConfig.Tmpfs", "#8", check_tmp),
    BaselineItem("B.2", "init reaps the tool's processes", "HostConfig.Init", "-", check_init),
    BaselineItem("B.3", "runtime named by the ToolSpec", "HostConfig.Runtime", "#6", check_runtime),
    BaselineItem(
        "B.4", "daemon keeps no log of the output", "HostConfig.LogConfig", "-", check_log_config
    ),
    BaselineItem("B.5", "image run by its verified id", "Image", "#13", check_image_pinned),
    BaselineItem("B.6", "labelled as billy's", "Labels", "-", check_labels),
)
