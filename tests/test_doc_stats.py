"""The reference tool doc-stats: its program on the host, and its image in a container."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiodocker
import jsonschema
import pytest

from shared.images import ImageBuilder
from shared.settings import REPO_ROOT
from shared.toolspec import ToolCatalog, ToolSpec

TOOL_DIR = REPO_ROOT / "tool-images" / "doc-stats"
PROGRAM = TOOL_DIR / "doc_stats.py"
GPL_3 = Path("/usr/share/common-licenses/GPL-3")


@dataclass
class Run:
    exit_code: int
    stdout: str
    stderr: str
    output_dir: Path

    def summary(self) -> dict:
        return json.loads(self.stdout)


@pytest.fixture(scope="module")
def spec() -> ToolSpec:
    return ToolCatalog.load(REPO_ROOT / "tool-images").get("doc-stats")


def run_program(workspace: Path, *args: str) -> Run:
    """Run doc_stats.py with this interpreter, input and output under `workspace`."""
    env = {
        "BILLY_INPUT_DIR": str(workspace / "in"),
        "BILLY_OUTPUT_DIR": str(workspace / "out"),
        "PATH": "/usr/bin:/bin",
    }
    done = subprocess.run(
        [sys.executable, "-I", str(PROGRAM), *args],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    return Run(done.returncode, done.stdout.decode(), done.stderr.decode(), workspace / "out")


def put_document(workspace: Path, name: str, data: bytes) -> None:
    (workspace / "in").mkdir(parents=True, exist_ok=True)
    (workspace / "in" / name).write_bytes(data)


def test_summary_counts_words_and_satisfies_the_stdout_schema(
    tmp_path: Path, spec: ToolSpec
) -> None:
    put_document(tmp_path, "doc.txt", b"The cat saw the other cat.\nThe end\n")

    run = run_program(tmp_path, "doc.txt", "2")

    assert run.exit_code == 0, run.stderr
    summary = run.summary()
    jsonschema.validate(summary, spec.outputs.stdout_schema)
    assert (summary["lines"], summary["words"], summary["unique_words"]) == (2, 8, 5)
    assert summary["top_words"] == [{"word": "the", "count": 3}, {"word": "cat", "count": 2}]
    assert summary["sha256"] == hashlib.sha256(b"The cat saw the other cat.\nThe end\n").hexdigest()


def test_artifacts_hold_every_word_frequency_and_a_markdown_summary(tmp_path: Path) -> None:
    put_document(tmp_path, "doc.txt", b"b a b c b a\n")

    run = run_program(tmp_path, "doc.txt")

    assert run.exit_code == 0, run.stderr
    with (run.output_dir / "word-frequencies.csv").open() as table:
        rows = list(csv.DictReader(table))
    assert [(row["word"], row["count"]) for row in rows] == [("b", "3"), ("a", "2"), ("c", "1")]
    markdown = (run.output_dir / "summary.md").read_text()
    assert markdown.startswith("# doc.txt\n")
    assert "| 1 | b | 3 |" in markdown


@pytest.mark.parametrize(
    ("data", "encoding"),
    [
        ("Grüße aus Köln".encode(), "utf-8"),
        ("Grüße aus Köln".encode("utf-8-sig"), "utf-8-sig"),
        ("Grüße aus Köln".encode("utf-16"), "utf-16"),
        ("Grüße aus Köln".encode("utf-16-le"), "utf-16-le"),
        ("Grüße aus Köln".encode("cp1252"), "cp1252"),
    ],
)
def test_document_in_any_common_encoding_is_decoded(
    tmp_path: Path, data: bytes, encoding: str
) -> None:
    put_document(tmp_path, "doc.txt", data)

    run = run_program(tmp_path, "doc.txt")

    assert run.exit_code == 0, run.stderr
    summary = run.summary()
    assert summary["encoding"] == encoding
    assert {item["word"] for item in summary["top_words"]} == {"grüße", "aus", "köln"}


def test_undecodable_bytes_still_give_a_summary(tmp_path: Path) -> None:
    put_document(tmp_path, "blob.bin", bytes(range(256)) * 4)

    run = run_program(tmp_path, "blob.bin")

    assert run.exit_code == 0, run.stderr
    assert run.summary()["bytes"] == 1024


def test_missing_document_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()

    run = run_program(tmp_path, "absent.txt")

    assert run.exit_code == 2
    assert run.stdout == ""
    assert "document 'absent.txt' not found in" in run.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["../etc/passwd"], "is not a plain file name"),
        (["doc.txt", "many"], "top 'many' is not an integer"),
        (["doc.txt", "0"], "top 0 is outside 1..100"),
        ([], "usage: doc_stats.py DOCUMENT [TOP]"),
    ],
)
def test_bad_arguments_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    put_document(tmp_path, "doc.txt", b"text\n")

    run = run_program(tmp_path, *args)

    assert run.exit_code == 2
    assert message in run.stderr


@pytest.fixture
async def doc_stats_image(docker: aiodocker.Docker) -> str:
    """The doc-stats image, built (or found up to date) the way `make images` builds it."""
    results = await ImageBuilder(docker).build_dir(REPO_ROOT / "tool-images", tools={"doc-stats"})
    return results[0].id


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    # The tool runs as nobody: it must enter the workspace and write into out/.
    tmp_path.chmod(0o755)
    (tmp_path / "in").chmod(0o755)
    (tmp_path / "out").chmod(0o777)
    return tmp_path


async def test_image_summarises_gpl3_as_nobody_without_network(
    docker: aiodocker.Docker, doc_stats_image: str, workspace: Path, spec: ToolSpec
) -> None:
    (workspace / "in" / "GPL-3").write_bytes(GPL_3.read_bytes())
    command = [{"{document}": "GPL-3", "{top}": "5"}.get(part, part) for part in spec.command]
    container = await docker.containers.create(
        {
            "Image": doc_stats_image,
            "Cmd": command,
            "User": spec.user,
            "Env": ["BILLY_OUTPUT_DIR=/workspace/out"],
            "Labels": {"billy.test": "test_doc_stats", "billy.tool": "doc-stats"},
            "HostConfig": {
                "Binds": [f"{workspace}:/workspace"],
                "NetworkMode": "none",
                "ReadonlyRootfs": True,
                "CapDrop": ["ALL"],
                "SecurityOpt": ["no-new-privileges"],
                "Memory": int(spec.limits.memory_bytes),
            },
        },
        name=f"billy-test-doc-stats-{uuid.uuid4().hex[:8]}",
    )
    try:
        await container.start()
        status = await container.wait(timeout=60)
        stdout = "".join(await container.log(stdout=True, stderr=False))
        stderr = "".join(await container.log(stdout=False, stderr=True))
    finally:
        await container.delete(force=True)

    assert status["StatusCode"] == 0, stderr
    summary = json.loads(stdout)
    jsonschema.validate(summary, spec.outputs.stdout_schema)
    assert summary["sha256"] == hashlib.sha256(GPL_3.read_bytes()).hexdigest()
    assert summary["top_words"][0]["word"] == "the"
    assert len(summary["top_words"]) == 5
    for artifact in spec.outputs.required_artifacts:
        assert (workspace / "out" / artifact).stat().st_size > 0
