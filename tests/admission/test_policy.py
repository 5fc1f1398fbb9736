"""The operator policy: caps and approved relaxations, in the model and at admission
(against a real nats-server of this module's own)."""

from __future__ import annotations

import json
import uuid

import nats
import pytest

from services.admission.service import AdmissionService
from shared import subjects
from shared.operator_policy import (
    OperatorPolicy,
    PolicyFileError,
    load_operator_policy,
    policy_of,
)
from shared.settings import REPO_ROOT, Settings
from shared.toolspec import ToolCatalog, ToolSpec
from shared.wire import AdmissionReply, RequestedLimits, ToolList, decode
from tests.conftest import TEST_TOOLS_DIR, NatsServer, wait_for

MiB = 1024 * 1024
SHIPPED_POLICY = REPO_ROOT / "tool-images" / "policy.yaml"


def make_spec(name: str = "poltest-tool", **fields) -> ToolSpec:
    return ToolSpec(name=name, version="1", image={"ref": "x:1"}, command=["run"], **fields)


def writable_root_exception(tool: str) -> dict:
    return {
        "tool": tool,
        "allow_writable_root": True,
        "approved_by": "ops@example.com",
        "reason": "writes a cache under /var",
    }


# -- the policy model ---------------------------------------------------------------------


@pytest.mark.parametrize("path", [None, SHIPPED_POLICY], ids=["built-in", "shipped"])
def test_every_reference_and_test_tool_fits_the_builtin_and_the_shipped_policy(path):
    policy = load_operator_policy(path)
    catalog = ToolCatalog.load(REPO_ROOT / "tool-images", TEST_TOOLS_DIR)
    assert len(catalog) >= 2
    assert {spec.name: policy.check_toolspec(spec) for spec in catalog} == {
        spec.name: [] for spec in catalog
    }


def test_writable_root_without_an_approved_exception_is_a_violation():
    spec = make_spec(filesystem={"read_only_root": False})
    [violation] = OperatorPolicy().check_toolspec(spec)
    assert (violation.field, violation.asked, violation.allowed) == (
        "filesystem.read_only_root",
        False,
        True,
    )
    assert "filesystem.read_only_root false is not approved" in str(violation)


def test_writable_root_is_allowed_only_for_the_tool_the_exception_names():
    policy = OperatorPolicy.model_validate(
        {"exceptions": [writable_root_exception("poltest-tool")]}
    )
    assert policy.check_toolspec(make_spec(filesystem={"read_only_root": False})) == []
    other = make_spec("poltest-other", filesystem={"read_only_root": False})
    assert [v.field for v in policy.check_toolspec(other)] == ["filesystem.read_only_root"]
    relaxed = policy.approved_relaxations(make_spec(filesystem={"read_only_root": False}))
    assert relaxed["read_only_root"].approved_by == "ops@example.com"


def test_toolspec_over_a_cap_names_the_field_the_asked_and_the_allowed_value():
    policy = OperatorPolicy.model_validate({"caps": {"memory_bytes": "64MiB", "pids": 32}})
    spec = make_spec(limits={"memory_bytes": 128 * MiB, "pids": 33})
    messages = [str(v) for v in policy.check_toolspec(spec)]
    assert messages == [
        f"limits.memory_bytes {128 * MiB} exceeds the cap of {64 * MiB}",
        "limits.pids 33 exceeds the cap of 32",
    ]


def test_an_exception_raises_the_caps_of_its_tool_only():
    policy = OperatorPolicy.model_validate(
        {
            "caps": {"memory_bytes": "64MiB"},
            "exceptions": [
                {
                    "tool": "poltest-tool",
                    "caps": {"memory_bytes": "256MiB"},
                    "approved_by": "ops",
                    "reason": "large documents",
                }
            ],
        }
    )
    limits = {"memory_bytes": 128 * MiB}
    assert policy.check_toolspec(make_spec(limits=limits)) == []
    assert len(policy.check_toolspec(make_spec("poltest-other", limits=limits))) == 1


def test_runtime_outside_the_allowed_list_is_a_violation():
    policy = OperatorPolicy.model_validate({"runtimes": ["runsc"]})
    [violation] = policy.check_toolspec(make_spec(runtime="runc"))
    assert str(violation) == "runtime runc is not allowed (allowed: runsc)"
    assert policy.check_toolspec(make_spec(runtime="runsc")) == []


def test_requested_limits_over_the_caps_are_violations():
    policy = OperatorPolicy.model_validate({"caps": {"cpus": 1, "timeout_max_s": 60}})
    requested = RequestedLimits(cpus=2.0, timeout_s=30)
    [violation] = policy.check_requested("poltest-tool", requested)
    assert str(violation) == "limits.cpus 2 exceeds the cap of 1"


@pytest.mark.parametrize(
    ("document", "field"),
    [
        (
            {"exceptions": [{"tool": "t", "allow_writable_root": True, "reason": "r"}]},
            "approved_by",
        ),
        ({"exceptions": [{"tool": "t", "approved_by": "", "reason": "r"}]}, "approved_by"),
        ({"network_modes": ["host"]}, "network_modes"),
        ({"caps": {"memroy_bytes": 1}}, "memroy_bytes"),
        (
            {"exceptions": [writable_root_exception("t"), writable_root_exception("t")]},
            "more than one entry for t",
        ),
    ],
)
def test_an_invalid_policy_file_is_refused_naming_the_field(tmp_path, document, field):
    path = tmp_path / "policy.yaml"
    path.write_text(json.dumps(document))
    with pytest.raises(PolicyFileError, match=field) as caught:
        load_operator_policy(path)
    assert str(path) in str(caught.value)


def test_policy_file_setting_wins_then_tools_dir_policy_then_builtin(tmp_path, monkeypatch):
    assert Settings(tools_dir=tmp_path).operator_policy_path() is None
    assert policy_of(Settings(tools_dir=tmp_path)).source == "built-in baseline"

    (tmp_path / "policy.yaml").write_text("caps: {pids: 16}\n")
    assert policy_of(Settings(tools_dir=tmp_path)).caps.pids == 16

    explicit = tmp_path / "elsewhere.yaml"
    explicit.write_text("caps: {pids: 8}\n")
    monkeypatch.setenv("BILLY_POLICY_FILE", str(explicit))
    assert policy_of(Settings(tools_dir=tmp_path)).caps.pids == 8


# -- at admission -------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def policy_admission(tmp_path_factory):
    """Admission on its own nats-server, with one tool the policy refuses."""
    server = NatsServer(tmp_path_factory.mktemp("nats-policy"))
    server.start()
    served = make_spec(
        "poltest-served", limits={"memory_bytes": 64 * MiB, "timeout": {"max_s": 60}}
    )
    refused = make_spec("poltest-writable", filesystem={"read_only_root": False})
    catalog = ToolCatalog({spec.name: spec for spec in (served, refused)})
    policy = OperatorPolicy.model_validate(
        {"caps": {"memory_bytes": "128MiB", "timeout_max_s": 60}}
    )
    settings = Settings(
        nats_url=server.url,
        tools_dir=tmp_path_factory.mktemp("tools"),
        state_dir=tmp_path_factory.mktemp("state"),
    )
    service = AdmissionService(settings, catalog, policy)
    nc = None
    try:
        await service.start()
        nc = await nats.connect(server.url)
        yield nc
    finally:
        if nc is not None:
            await nc.close()
        await service.stop()
        server.stop()


async def submit(nc, tool: str, **fields) -> AdmissionReply:
    request = {"request_id": uuid.uuid4().hex, "tool": tool, "arguments": {}, **fields}
    reply = await nc.request(subjects.SUBMIT_SUBJECT, json.dumps(request).encode(), timeout=10)
    return decode(reply.data, AdmissionReply)


async def served_tools(nc) -> list[str]:
    async def listed():
        try:
            reply = await nc.request(subjects.TOOLS_SUBJECT, b"", timeout=1)
        except nats.errors.NoRespondersError:
            return None
        return [tool.name for tool in decode(reply.data, ToolList).tools]

    return await wait_for(listed, timeout_s=10)


async def test_tool_asking_an_unapproved_relaxation_is_not_served(policy_admission):
    assert await served_tools(policy_admission) == ["poltest-served"]
    reply = await submit(policy_admission, "poltest-writable")
    assert (reply.status, reply.reason) == ("rejected", "policy_violation")
    assert "tool poltest-writable is not served" in reply.message
    assert "filesystem.read_only_root false is not approved" in reply.message


async def test_request_over_the_policy_cap_is_rejected_naming_asked_and_allowed(
    policy_admission,
):
    await served_tools(policy_admission)
    reply = await submit(policy_admission, "poltest-served", limits={"memory_bytes": 512 * MiB})
    assert (reply.status, reply.reason) == ("rejected", "policy_violation")
    assert f"limits.memory_bytes {512 * MiB} exceeds the cap of {128 * MiB}" in reply.message
    assert reply.run_id is None


async def test_request_within_the_cap_but_over_the_toolspec_gets_limit_exceeds_spec(
    policy_admission,
):
    await served_tools(policy_admission)
    reply = await submit(policy_admission, "poltest-served", limits={"memory_bytes": 100 * MiB})
    assert (reply.status, reply.reason) == ("rejected", "limit_exceeds_spec")


def test_shipped_policy_file_is_the_default_of_the_reference_tools_dir():
    settings = Settings(tools_dir=REPO_ROOT / "tool-images")
    assert settings.operator_policy_path() == SHIPPED_POLICY
    assert policy_of(settings).source == str(SHIPPED_POLICY)
