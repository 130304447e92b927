"""What every bench record carries and how it is written: the UTC time, the git commit of the code that
made it, and an all-or-nothing text write (temp file in the same folder, then os.replace). Standard
library only, so the GPU check and the cost table run without torch."""
from __future__ import annotations

import datetime
import os
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def utc_now() -> str:
    """e.g. 2026-11-24T10:12:03+00:00"""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def commit(root: Path = ROOT) -> str | None:
    """The checkout's commit (12 hex digits), with "+dirty" when tracked files differ from it; None where
    there is no git or no checkout (a copied folder)."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=20)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name + ".", suffix=".tmp", delete=False) as f:
        f.write(text)
    try:
        os.replace(f.name, path)
    except OSError:
        os.unlink(f.name)
        raise
