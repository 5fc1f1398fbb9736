"""The reference tool python-exec: its runner program on the host, and the tool through
the whole path (the adversarial suite in tests/adversarial/ uses it against the limits)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from shared.client import RunRejected
from shared.settings import REPO_ROOT
from tests.adversarial.conftest import run_hostile

PROGRAM = REPO_ROOT / "tool-images" / "python-exec" / "run_code.py"


def run_program(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-I", str(PROGRAM), *args], capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize(
    ("args", "stdout"),
    [
        (["python", "print(6 * 7)"], "42\n"),
        (["sh", "echo $((6 * 7))"], "42\n"),
        (["print('default is python')"], "default is python\n"),
    ],
)
def test_code_runs_in_the_chosen_interpreter(args, stdout):
    done = run_program(*args)
    assert (done.returncode, done.stdout, done.stderr) == (0, stdout, "")


def test_code_is_one_argv_element_and_never_reaches_another_shell():
    # Shell syntax in Python code is a Python syntax error, not a command.
    done = run_program("python", 'print("a"); echo injected $(id -u)')
    assert done.returncode == 1
    assert "SyntaxError" in done.stderr
    assert "injected" not in done.stdout


def test_exit_code_and_streams_are_the_snippets_own():
    done = run_program("sh", "echo out; echo err >&2; exit 7")
    assert (done.returncode, done.stdout, done.stderr) == (7, "out\n", "err\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ruby", "puts 1"], "language 'ruby' is not one of python, sh"),
        ([], "usage: run_code.py [LANGUAGE] CODE"),
        (["python", "print(1)", "extra"], "usage: run_code.py [LANGUAGE] CODE"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(args, message):
    done = run_program(*args)
    assert done.returncode == 2
    assert message in done.stderr


async def test_python_exec_runs_code_and_returns_output_and_artifacts(client, tmp_path):
    code = (
        "import os, sys\n"
        "print('hello from', sys.version_info[:2])\n"
        "open(os.path.join(os.environ['BILLY_OUTPUT_DIR'], 'plot.csv'), 'w').write('x,y\\n1,2\\n')"
    )
    result, events = await run_hostile(client, code)

    assert result.status == "succeeded", (result.reason, result.message, result.stderr)
    assert result.stdout == "hello from (3, 11)\n"
    assert [(ref.path, ref.size_bytes) for ref in result.artifacts] == [("plot.csv", 8)]
    assert events[-1].type == "finished"


async def test_python_exec_rejects_an_unknown_language_at_admission(client):
    with pytest.raises(RunRejected) as rejected:
        await client.submit("python-exec", {"language": "ruby", "code": "puts 1"})
    assert rejected.value.reply.reason == "invalid_arguments"
