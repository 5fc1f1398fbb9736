"""The hardened baseline: every item of the container's create body."""

from __future__ import annotations

import pytest

from services.executor.command import Argv
from services.executor.policy import container_config, tool_user

MiB = 1024 * 1024
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def config(make_spec, make_context):
    spec = make_spec(
        ["run"],
        user="1000:2000",
        env={"LANG": "C.UTF-8"},
        filesystem={"read_only_root": True, "tmp_bytes": 8 * MiB},
    )
    context = make_context(
        spec,
        trace_env={"TRACEPARENT": TRACEPARENT},
        cpus=0.5,
        memory_bytes=64 * MiB,
        pids=64,
        stop_grace_s=1.5,
    )
    context.run_id = "run-policy"
    argv = Argv(entrypoint=None, command=["run", "--fast"])
    return container_config(context, "sha256:" + "cd" * 32, argv, "billy-run-policy-abc")


def test_container_is_created_from_the_image_id_with_the_argv(config):
    assert config["Image"] == "sha256:" + "cd" * 32
    assert config["Cmd"] == ["run", "--fast"]
    assert "Entrypoint" not in config


def test_container_runs_as_the_toolspec_user_in_the_workspace(config):
    assert config["User"] == "1000:2000"
    assert config["WorkingDir"] == "/workspace"


def test_user_without_group_gets_its_uid_as_gid_not_root_group():
    assert tool_user("1234") == (1234, 1234)
    assert tool_user("1000:2000") == (1000, 2000)


def test_env_holds_spec_env_runtime_paths_and_traceparent(config):
    assert config["Env"] == [
        "LANG=C.UTF-8",
        "BILLY_RUN_ID=run-policy",
        "BILLY_INPUT_DIR=/workspace/in",
        "BILLY_OUTPUT_DIR=/workspace/out",
        "BILLY_ARGUMENTS=/workspace/arguments.json",
        f"TRACEPARENT={TRACEPARENT}",
    ]


def test_container_carries_the_run_labels(config, runner_executor):
    assert config["Labels"] == {
        "billy.managed": "true",
        "billy.run_id": "run-policy",
        "billy.tool": "test-tool",
        "billy.tenant": "test-tenant",
        "billy.executor": runner_executor,
    }


def test_no_network_no_tty_no_stdin_and_output_attached(config):
    assert config["NetworkDisabled"] is True
    assert config["HostConfig"]["NetworkMode"] == "none"
    assert config["Tty"] is False
    assert config["OpenStdin"] is False
    assert config["AttachStdin"] is False
    assert config["AttachStdout"] is True
    assert config["AttachStderr"] is True


def test_stop_is_sigterm_then_kill_after_the_grace_period(config):
    assert config["StopSignal"] == "SIGTERM"
    assert config["StopTimeout"] == 2  # 1.5 s rounded up: Docker counts whole seconds


def test_privileges_are_dropped_and_default_seccomp_kept(config):
    host = config["HostConfig"]
    assert host["CapDrop"] == ["ALL"]
    assert host["CapAdd"] is None
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert not any("seccomp" in option for option in host["SecurityOpt"])
    assert host["Privileged"] is False


def test_root_filesystem_is_read_only_with_a_small_noexec_tmp(config):
    host = config["HostConfig"]
    assert host["ReadonlyRootfs"] is True
    assert host["Tmpfs"] == {"/tmp": f"rw,noexec,nosuid,nodev,size={8 * MiB},uid=1000,gid=2000"}


def test_writable_root_when_the_spec_allows_it(make_spec, make_context):
    spec = make_spec(["run"], filesystem={"read_only_root": False})
    config = container_config(make_context(spec), "sha256:" + "cd" * 32, Argv(None, ["x"]), "v")
    assert config["HostConfig"]["ReadonlyRootfs"] is False


def test_runtime_is_runc_unless_the_spec_asks_for_gvisor(config, make_spec, make_context):
    assert config["HostConfig"]["Runtime"] == "runc"
    spec = make_spec(["run"], runtime="runsc")
    config = container_config(make_context(spec), "sha256:" + "cd" * 32, Argv(None, ["x"]), "v")
    assert config["HostConfig"]["Runtime"] == "runsc"


def test_gvisor_pids_limit_leaves_room_for_the_sandbox_threads(make_spec, make_context):
    # runsc's own threads count in the container's pids cgroup; the tool keeps its 16.
    context = make_context(make_spec(["run"], runtime="runsc"), pids=16)
    config = container_config(context, "sha256:" + "cd" * 32, Argv(None, ["x"]), "v")
    assert config["HostConfig"]["PidsLimit"] == 64 + 8 * 16


def test_toolspec_rejects_an_unknown_runtime(make_spec):
    with pytest.raises(ValueError, match="runtime"):
        make_spec(["run"], runtime="kata")


def test_resource_limits_come_from_the_effective_limits(config):
    host = config["HostConfig"]
    assert host["PidsLimit"] == 64
    assert host["Memory"] == 64 * MiB
    assert host["MemorySwap"] == 64 * MiB
    assert host["NanoCpus"] == 500_000_000
    assert host["Ulimits"] == [
        {"Name": "nofile", "Soft": 1024, "Hard": 1024},
        {"Name": "core", "Soft": 0, "Hard": 0},
        {"Name": "fsize", "Soft": 100 * MiB, "Hard": 100 * MiB},
    ]


def test_no_file_may_outgrow_the_largest_filesystem_the_tool_is_given(make_spec, make_context):
    spec = make_spec(["run"])
    ulimits = {
        limit["Name"]: limit
        for limit in container_config(
            make_context(spec, workspace_bytes=32 * MiB, tmp_bytes=48 * MiB),
            "sha256:" + "cd" * 32,
            Argv(None, ["x"]),
            "v",
        )["HostConfig"]["Ulimits"]
    }
    assert ulimits["fsize"] == {"Name": "fsize", "Soft": 48 * MiB, "Hard": 48 * MiB}


def test_nproc_is_not_set_since_it_counts_the_uid_across_the_host(config):
    # PidsLimit bounds each container; RLIMIT_NPROC would add up every container of uid 65534.
    names = [limit["Name"] for limit in config["HostConfig"]["Ulimits"]]
    assert "nproc" not in names
    assert config["HostConfig"]["PidsLimit"] == 64


def test_namespaces_are_private_and_init_reaps_zombies(config):
    host = config["HostConfig"]
    assert host["Init"] is True
    assert host["IpcMode"] == "private"
    assert host["PidMode"] == ""
    assert host["UTSMode"] == ""


def test_no_devices_ports_restarts_or_auto_remove(config):
    host = config["HostConfig"]
    assert host["Devices"] == []
    assert host["PortBindings"] == {}
    assert host["PublishAllPorts"] is False
    assert host["RestartPolicy"] == {"Name": "no"}
    assert host["AutoRemove"] is False


def test_daemon_keeps_no_log_of_the_output(config):
    assert config["HostConfig"]["LogConfig"] == {"Type": "none", "Config": {}}


def test_only_mount_is_the_workspace_volume(config):
    host = config["HostConfig"]
    assert host["Binds"] is None
    assert host["VolumesFrom"] is None
    assert host["Mounts"] == [
        {
            "Type": "volume",
            "Source": "billy-run-policy-abc",
            "Target": "/workspace",
            "ReadOnly": False,
            "VolumeOptions": {"NoCopy": True},
        }
    ]
    assert "docker.sock" not in repr(config)


def test_entrypoint_is_set_when_the_spec_has_one(make_spec, make_context):
    context = make_context(make_spec(["x"]))
    config = container_config(context, "sha256:" + "cd" * 32, Argv(["/bin/tool"], ["x"]), "v")
    assert config["Entrypoint"] == ["/bin/tool"]
