"""python-exec: runs a snippet of Python or shell code, the code interpreter of an agent.

Usage: run_code.py [LANGUAGE] CODE, LANGUAGE being python (the default) or sh. CODE
becomes the single argument after `-c` of python3 or sh: it is never interpolated into
a command line, so no shell reads it except the one it is meant for. This program then
replaces itself with the interpreter (exec): the snippet's exit code, signals and output
are the run's own.
Files the snippet writes to $BILLY_OUTPUT_DIR become the run's artifacts.
Exit codes: the snippet's; 2 for bad arguments.
"""

from __future__ import annotations

import os
import sys

# The Python that runs this program runs the snippet too, wherever the image installs it.
INTERPRETERS = {"python": sys.executable, "sh": "/bin/sh"}


def interpreter_argv(language: str, code: str) -> list[str]:
    """The argv that runs `code` in `language`; ValueError for what cannot run."""
    if language not in INTERPRETERS:
        raise ValueError(f"language {language!r} is not one of {', '.join(INTERPRETERS)}")
    if "\0" in code:
        raise ValueError("code holds a NUL character, which no command line can carry")
    return [INTERPRETERS[language], "-c", code]


def main(argv: list[str]) -> int:
    # An absent `language` argument drops out of the command line: Python is the default.
    if len(argv) == 1:
        argv = ["python", *argv]
    if len(argv) != 2:
        print("usage: run_code.py [LANGUAGE] CODE", file=sys.stderr)
        return 2
    try:
        command = interpreter_argv(*argv)
    except ValueError as exc:
        print(f"python-exec: {exc}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    os.execv(command[0], command)
    return 127  # not reached: execv returns only by raising


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
