"""What the two resource audits (triton_aot.py, cuda_resources.py) share: the commit in
their tables' headers, and how they report and exit."""

from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commit() -> str:
    """CK_COMMIT when set (the GPU machine's copy of the tree may carry a stale .git: an H200
    run named the landed commit instead of the one it ran), else git's short HEAD."""
    if os.environ.get("CK_COMMIT"):
        return os.environ["CK_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=ROOT, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out or "unknown"


def report(problems: list[str], where: str) -> int:
    """Prints each problem and a last line; the exit code (1 when any)."""
    for line in problems:
        print("FAIL", line)
    print(f"{len(problems)} problems; tables in {where}")
    return 1 if problems else 0
