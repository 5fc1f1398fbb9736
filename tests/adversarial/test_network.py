"""Network attempts under the default policy (NetworkMode none): each one fails inside the
container, at once, with the errno of a host that has no interface but lo and no route.

No packet can leave: without an interface there is no route, so the kernel refuses the
attempt before anything is sent.
"""

from __future__ import annotations

import json

from tests.adversarial.conftest import assert_host_unaffected, assert_nothing_leaks, run_hostile

# Far below the probe's own socket timeout: a refusal by the kernel, not a lost packet.
INSTANT_S = 0.5
CAP_NET_RAW_BIT = 13

# Shared by the probes: one attempt, as {"outcome": errno name | "ok" | "timeout", ...}.
# Should the policy ever regress to a real network, nothing is sent: the probe refuses to
# try as soon as it sees an interface other than lo, and the test fails on that outcome.
ATTEMPT = """
import errno, json, socket, time

ISOLATED = [name for _, name in socket.if_nameindex()] == ["lo"]

def attempt(action, outward=True):
    started = time.monotonic()
    try:
        if outward and not ISOLATED:
            raise RuntimeError("not attempted: the container has a network interface")
        action()
        outcome = "ok"
    except RuntimeError as exc:
        outcome = str(exc)
    except TimeoutError:
        outcome = "timeout"
    except socket.gaierror as exc:
        outcome = {socket.EAI_AGAIN: "EAI_AGAIN", socket.EAI_NONAME: "EAI_NONAME"}.get(
            exc.errno, f"gaierror {exc.errno}"
        )
    except OSError as exc:
        outcome = errno.errorcode.get(exc.errno, str(exc.errno))
    return {"outcome": outcome, "elapsed_s": time.monotonic() - started}

def connect(host, port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(3)
        sock.connect((host, port))

def send_udp(host, port):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)
        sock.sendto(b"\\0", (host, port))
"""


async def probe(client, docker, marker: str, code: str, logs) -> dict:
    """Run a probe that prints JSON; check the run, the host and the caps; the JSON."""
    result, events = await run_hostile(client, f"# {marker}\n{ATTEMPT}\n{code}")

    assert result.status == "succeeded", (result.reason, result.message, result.stderr)
    assert result.reason is None
    assert_nothing_leaks(result, events, logs.records)
    await assert_host_unaffected(client, docker, result, marker)
    return json.loads(result.stdout)


async def test_connect_to_an_ip_address_fails_at_once_as_network_unreachable(
    client, docker, marker, service_logs
):
    code = """
print(json.dumps({
    "tcp": attempt(lambda: connect("1.1.1.1", 53)),
    "udp": attempt(lambda: send_udp("1.1.1.1", 53)),
}))
"""
    found = await probe(client, docker, marker, code, service_logs)

    for kind in ("tcp", "udp"):
        assert found[kind]["outcome"] == "ENETUNREACH", found
        assert found[kind]["elapsed_s"] < INSTANT_S, found


async def test_cloud_metadata_address_is_unreachable(client, docker, marker, service_logs):
    code = """
print(json.dumps({
    "http": attempt(lambda: connect("169.254.169.254", 80)),
    "udp": attempt(lambda: send_udp("169.254.169.254", 80)),
}))
"""
    found = await probe(client, docker, marker, code, service_logs)

    for kind in ("http", "udp"):
        assert found[kind]["outcome"] == "ENETUNREACH", found
        assert found[kind]["elapsed_s"] < INSTANT_S, found


async def test_dns_lookup_fails_without_reaching_any_resolver(client, docker, marker, service_logs):
    # The resolver's query to each nameserver fails locally, as any other packet does.
    code = """
nameservers = [
    line.split()[1] for line in open("/etc/resolv.conf")
    if line.startswith("nameserver") and ":" not in line.split()[1]
]
print(json.dumps({
    "lookup": attempt(lambda: socket.getaddrinfo("example.com", 443)),
    "nameservers": [attempt(lambda ns=ns: send_udp(ns, 53)) for ns in nameservers],
}))
"""
    found = await probe(client, docker, marker, code, service_logs)

    assert found["lookup"]["outcome"] in ("EAI_AGAIN", "EAI_NONAME"), found
    assert found["lookup"]["elapsed_s"] < INSTANT_S, found
    assert all(query["outcome"] == "ENETUNREACH" for query in found["nameservers"]), found


async def test_raw_and_packet_sockets_are_refused_without_cap_net_raw(
    client, docker, marker, service_logs
):
    code = """
def capabilities(name):
    line = next(l for l in open("/proc/self/status") if l.startswith(name + ":"))
    return int(line.split()[1], 16)

print(json.dumps({
    "raw": attempt(
        lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP), outward=False
    ),
    "packet": attempt(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW), outward=False),
    "cap_eff": capabilities("CapEff"),
    "cap_bnd": capabilities("CapBnd"),
}))
"""
    found = await probe(client, docker, marker, code, service_logs)

    assert found["raw"]["outcome"] == "EPERM", found
    assert found["packet"]["outcome"] == "EPERM", found
    # Dropped from the bounding set too: nothing the tool executes can get it back.
    assert not found["cap_eff"] & (1 << CAP_NET_RAW_BIT)
    assert not found["cap_bnd"] & (1 << CAP_NET_RAW_BIT)


async def test_container_has_only_the_loopback_interface_and_no_route(
    client, docker, marker, service_logs
):
    code = """
import os
print(json.dumps({
    "interfaces": [name for _, name in socket.if_nameindex()],
    "sys_class_net": sorted(os.listdir("/sys/class/net")),
    "routes": open("/proc/net/route").read().splitlines()[1:],
    "loopback": attempt(lambda: connect("127.0.0.1", 9), outward=False),
}))
"""
    found = await probe(client, docker, marker, code, service_logs)

    assert found["interfaces"] == ["lo"], found
    assert found["sys_class_net"] == ["lo"], found
    assert found["routes"] == [], found
    # lo itself works: the kernel answers at once that nothing listens there.
    assert found["loopback"]["outcome"] == "ECONNREFUSED", found
