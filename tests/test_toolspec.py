"""ToolSpec loading: errors name the file and the field; every shipped ToolSpec loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from shared.errors import ToolSpecError, UnknownToolError
from shared.settings import REPO_ROOT
from shared.toolspec import LOCK_FILE, ToolCatalog, load_toolspec

TOOLS_DIRS = [REPO_ROOT / "tool-images", REPO_ROOT / "tests" / "tools"]


def minimal_spec(name: str = "sample", **overrides) -> dict:
    return {
        "name": name,
        "version": "1.0.0",
        "image": {"ref": f"billy-test/{name}:1.0.0"},
        "command": ["echo", "{message}"],
        "arguments_schema": {
            "type": "object",
            "properties": {"message": {"type": "string"}},
        },
        **overrides,
    }


def write_tool(tools_dir: Path, folder: str, spec: dict) -> Path:
    path = tools_dir / folder / "tool.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec))
    return path


def test_minimal_spec_loads_with_safe_defaults(tmp_path: Path) -> None:
    spec = load_toolspec(write_tool(tmp_path, "sample", minimal_spec()))

    assert spec.user == "65534:65534"
    assert spec.network.mode == "none"
    assert spec.filesystem.read_only_root is True
    assert spec.placeholders() == ["message"]


def test_unknown_field_error_names_file_and_field(tmp_path: Path) -> None:
    path = write_tool(tmp_path, "sample", minimal_spec(limits={"memroy_bytes": "64MiB"}))

    with pytest.raises(ToolSpecError) as caught:
        load_toolspec(path)

    assert str(path) in str(caught.value)
    assert "limits.memroy_bytes" in str(caught.value)
    assert caught.value.path == str(path)


def test_bad_value_error_names_file_and_field(tmp_path: Path) -> None:
    path = write_tool(tmp_path, "sample", minimal_spec(limits={"pids": 2}))

    with pytest.raises(ToolSpecError, match=r"limits\.pids: Input should be greater") as caught:
        load_toolspec(path)

    assert str(path) in str(caught.value)


def test_timeout_default_above_max_is_refused(tmp_path: Path) -> None:
    timeout = {"default_s": 90, "max_s": 60}
    path = write_tool(tmp_path, "sample", minimal_spec(limits={"timeout": timeout}))

    with pytest.raises(ToolSpecError, match=r"limits\.timeout.*default_s 90.0 exceeds max_s 60"):
        load_toolspec(path)


def test_invalid_arguments_json_schema_is_refused_with_its_location(tmp_path: Path) -> None:
    schema = {"type": "object", "properties": {"message": {"type": 12}}}
    path = write_tool(tmp_path, "sample", minimal_spec(arguments_schema=schema))

    with pytest.raises(ToolSpecError) as caught:
        load_toolspec(path)

    message = str(caught.value)
    assert str(path) in message
    assert "arguments_schema" in message
    assert "not a valid JSON Schema at properties/message/type" in message


def test_invalid_stdout_schema_is_refused(tmp_path: Path) -> None:
    outputs = {"stdout": "json", "stdout_schema": {"type": "objekt"}}
    path = write_tool(tmp_path, "sample", minimal_spec(outputs=outputs))

    with pytest.raises(ToolSpecError, match=r"outputs: .*not a valid JSON Schema"):
        load_toolspec(path)


@pytest.mark.parametrize("user", ["0", "0:0", "0:65534"])
def test_root_user_is_refused(tmp_path: Path, user: str) -> None:
    path = write_tool(tmp_path, "sample", minimal_spec(user=user))

    with pytest.raises(ToolSpecError, match=r"user: .*uid 0 is not allowed") as caught:
        load_toolspec(path)

    assert str(path) in str(caught.value)


def test_reserved_environment_variable_is_refused(tmp_path: Path) -> None:
    path = write_tool(tmp_path, "sample", minimal_spec(env={"BILLY_OUTPUT_DIR": "/tmp"}))

    with pytest.raises(ToolSpecError, match=r"env: .*BILLY_OUTPUT_DIR is reserved"):
        load_toolspec(path)


def test_name_differing_from_folder_is_refused_by_catalog(tmp_path: Path) -> None:
    path = write_tool(tmp_path, "other-folder", minimal_spec("sample"))

    with pytest.raises(ToolSpecError) as caught:
        ToolCatalog.load(tmp_path)

    assert str(path) in str(caught.value)
    assert "'sample' differs from its folder 'other-folder'" in str(caught.value)


def test_name_outside_token_pattern_is_refused(tmp_path: Path) -> None:
    path = write_tool(tmp_path, "Bad_Name", minimal_spec("Bad Name"))

    with pytest.raises(ToolSpecError, match=r"name: String should match pattern"):
        load_toolspec(path)


def test_same_tool_in_two_directories_is_refused(tmp_path: Path) -> None:
    write_tool(tmp_path / "a", "sample", minimal_spec())
    second = write_tool(tmp_path / "b", "sample", minimal_spec())

    with pytest.raises(ToolSpecError, match="defined twice") as caught:
        ToolCatalog.load(tmp_path / "a", tmp_path / "b")

    assert str(second) in str(caught.value)


def test_unreadable_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sample" / "tool.yaml"
    path.parent.mkdir()
    path.write_text("name: [unclosed\n")

    with pytest.raises(ToolSpecError, match="cannot read") as caught:
        load_toolspec(path)

    assert caught.value.path == str(path)


def test_image_lock_fills_in_image_id_and_digest(tmp_path: Path) -> None:
    write_tool(tmp_path, "sample", minimal_spec())
    recorded = {"id": "sha256:" + "a" * 64, "digest": "sha256:" + "b" * 64, "ref": "x"}
    (tmp_path / LOCK_FILE).write_text(json.dumps({"sample": recorded}))

    spec = ToolCatalog.load(tmp_path).get("sample")

    assert spec.image.id == recorded["id"]
    assert spec.image.digest == recorded["digest"]
    assert spec.image.ref == "billy-test/sample:1.0.0"


def test_unknown_tool_is_reported_by_name(tmp_path: Path) -> None:
    write_tool(tmp_path, "sample", minimal_spec())

    with pytest.raises(UnknownToolError, match="unknown tool 'missing'"):
        ToolCatalog.load(tmp_path).get("missing")


def test_every_shipped_toolspec_loads() -> None:
    catalog = ToolCatalog.load(*TOOLS_DIRS)

    assert {"doc-stats", "echo", "shell", "python"} <= set(catalog.names())
    for spec in catalog:
        assert spec.image.build is not None, spec.name
        assert spec.user.split(":")[0] != "0", spec.name


def test_every_placeholder_is_a_declared_argument() -> None:
    for spec in ToolCatalog.load(*TOOLS_DIRS):
        declared = set(spec.arguments_schema.get("properties", {}))
        required = set(spec.arguments_schema.get("required", []))

        assert set(spec.placeholders()) <= declared, spec.name
        assert required <= declared, spec.name


def test_shell_test_tool_has_the_small_caps_tests_rely_on() -> None:
    limits = ToolCatalog.load(REPO_ROOT / "tests" / "tools").get("shell").limits

    assert limits.stdout_bytes == 64 * 1024
    assert limits.stderr_bytes == 16 * 1024
    assert limits.artifact_bytes == 64 * 1024
    assert limits.artifacts_total_bytes == 256 * 1024
    assert limits.artifact_count == 16
    assert limits.memory_bytes == 64 * 1024 * 1024
    assert (limits.timeout.default_s, limits.timeout.max_s) == (10, 60)
    assert limits.timeout.stop_grace_s == 1
