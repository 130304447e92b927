"""Several workers on one out-dir: each run is claimed atomically before it is trained.

A claim is <run-dir>/claim.json, created with O_CREAT | O_EXCL (atomic on local and NFS v3+
filesystems), naming the owner's host, pid and a random token; a thread refreshes its mtime every
HEARTBEAT_S seconds while the run trains. Another worker skips a run whose claim is fresh; a claim
whose heartbeat is older than STALE_S (its worker was killed, or its notebook died), or that names
this host and a process that no longer exists, is taken over:
the taker replaces it atomically and then checks that its own token is the one on disk, so two
takers cannot both win. result.json is checked again after claiming, so a finished run is never
trained twice.
"""
from __future__ import annotations

import json
import os
import platform
import threading
import time
import uuid
from pathlib import Path

HEARTBEAT_S = float(os.environ.get("SES_CLAIM_HEARTBEAT_S", 30))
STALE_S = float(os.environ.get("SES_CLAIM_STALE_S", 180))


class Claim:
    def __init__(self, path: Path, token: str):
        self.path, self.token = path, token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="ses-claim-heartbeat")
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def owned(self) -> bool:
        try:
            return json.loads(self.path.read_text()).get("token") == self.token
        except (OSError, ValueError):
            return False

    def release(self) -> None:
        self._stop.set()
        if self.owned():
            self.path.unlink(missing_ok=True)


def _payload(token: str) -> str:
    return json.dumps(dict(host=platform.node(), pid=os.getpid(), token=token,
                           started=time.strftime("%Y-%m-%d %H:%M:%S")))


def describe(path: Path) -> str:
    try:
        c = json.loads(path.read_text())
        return f"{c.get('host')} pid {c.get('pid')}, heartbeat {time.time() - path.stat().st_mtime:.0f} s ago"
    except (OSError, ValueError):
        return "another worker"


def _dead_here(path: Path) -> bool:
    """The claim names this host and a process that no longer exists (killed, or a previous shell)."""
    try:
        c = json.loads(path.read_text())
        if c.get("host") != platform.node() or not isinstance(c.get("pid"), int):
            return False
        os.kill(c["pid"], 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError):
        return False
    return _zombie(c["pid"])


def _zombie(pid: int) -> bool:
    """A killed process nobody has reaped yet (a torchrun rank whose parent was killed too) still
    answers kill(pid, 0); Linux's /proc says it is a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def acquire(run_dir: Path) -> Claim | None:
    """The claim of run_dir for this process, or None if a live worker holds it."""
    path = run_dir / "claim.json"
    token = uuid.uuid4().hex
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(_payload(token))
        return Claim(path, token)
    except FileExistsError:
        pass
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:  # released meanwhile: try once more
        return acquire(run_dir) if not (run_dir / "result.json").exists() else None
    if age < STALE_S and not _dead_here(path):
        return None
    print(f"note: taking over the stale claim of {run_dir.name} ({describe(path)})")
    tmp = path.with_name(f"claim.{token}.tmp")
    tmp.write_text(_payload(token))
    os.replace(tmp, path)
    time.sleep(0.2)  # a concurrent taker's replace lands now or never: the token on disk decides
    claim = Claim(path, token)
    if claim.owned():
        return claim
    claim._stop.set()
    return None
