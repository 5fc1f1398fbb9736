"""`make demo`: start the embedded stack and run the reference tool on a real document.

Runs exactly what a user would type: `billy-tools up`, then `billy-tools run doc-stats`
on /usr/share/common-licenses/GPL-3 (shipped by Debian's base-files), which prints the
run's events as they arrive, the result, and where the artifacts were stored and saved.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from shared.settings import Settings

DOCUMENT = Path("/usr/share/common-licenses/GPL-3")


def billy_tools(*args: str) -> int:
    executable = Path(sys.executable).parent / "billy-tools"
    print(f"\n$ billy-tools {' '.join(args)}", flush=True)
    return subprocess.call([str(executable), *args])


def main() -> int:
    if not DOCUMENT.is_file():
        print(f"demo: {DOCUMENT} is missing (Debian's base-files package ships it)")
        return 1
    settings = Settings()
    out_dir = settings.state_dir / "demo-artifacts"

    code = billy_tools("up")
    if code != 0:
        return code
    code = billy_tools(
        "run",
        "doc-stats",
        "--input",
        str(DOCUMENT),
        "--arg",
        f"document={DOCUMENT.name}",
        "--arg",
        "top=10",
        "--out",
        str(out_dir),
    )
    print(
        "\nThe stack is still running (state and logs in "
        f"{settings.state_dir}). Stop it with `make down` "
        "(or `.venv/bin/billy-tools down`)."
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
