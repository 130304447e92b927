"""Leases on a shared folder: one holder at a time, a heartbeat, and takeover of a dead holder's lease.

Used for the claim of a run (harness/claims.py: <run-dir>/claim.<gen>.json) and for the lock on a data folder
(plumbing.files.prepare_once: <data>/.lock-<dataset>.<gen>.json). Standard library only.

A lease is a file <stem>.<gen>.json, created with O_CREAT | O_EXCL by its holder and written only by
it. It holds the owner's facts: host, pid, the pid's start time (/proc/<pid>/stat), boot id, pid
namespace, a random token, the generation, what it is held for, and the heartbeat time and a beat
counter, both written IN the file. A thread rewrites the file every HEARTBEAT_S seconds (temp name +
os.replace); an OSError there (a flaky network filesystem) is retried at the next beat, never ends
the heartbeat. The heartbeat ends on release, or when the lease is found lost.

Protocol (the current lease is the one with the highest generation g present):
1. List the folder. No lease file: the judged generation is g = 0. Otherwise read <stem>.<g>.json;
   if its owner is live, the acquirer gets nothing (a waiter polls again).
2. Free (g = 0), stale or dead: create <stem>.<g+1>.json with O_EXCL. Of any number of racing
   acquirers exactly one creates it; the others get EEXIST and go back to 1.
3. The creator then checks (a) that <stem>.<g>.json still holds the token it judged (for g >= 1)
   and (b) that no generation above g+1 exists. If either fails it deletes its own file and goes
   back to 1. Only then does it hold the lease; it deletes the lower generations, in increasing
   order, and starts its heartbeat.
4. Release stops the heartbeat (joined, so no write comes later) and deletes the holder's own file.
   A holder has lost its lease when a higher generation exists or its own file is gone or changed;
   `Lease.lost()` says so, the heartbeat then stops writing.

Why the ABA cases are safe. Generation names are reused only after deletion (cleanup in 3, release
in 4), so a slow acquirer may create a name that existed before. (a) A slow taker that judged
generation g stale long ago, after g was taken over (g+1) and released: if g+1 still exists its
O_EXCL fails; if g+1 was released, g was deleted before it (the winner of g+1 deletes g right
after winning), so check (a) fails: the token it judged is gone. (b) A fresh acquirer (it saw no
file) racing a takeover: a takeover winner's file existed before the predecessor it verified was
deleted, so the fresh acquirer's check (b) sees it and backs off; two fresh acquirers meet at
O_EXCL of generation 1. Tokens are random and never reused, so "the same token" means "the same
lease". No sleep decides anything: a waiter's poll interval only says how soon it looks again.

Live, stale, dead. A lease is stale when the heartbeat time in the file is older than STALE_S by the
reader's clock. That assumes the hosts sharing a folder keep their clocks within well under
STALE_S - HEARTBEAT_S of each other (NTP does, to milliseconds): a writer's clock that lags by more
makes its live lease look stale (it is taken over, and its owner learns it at its next check()); a
clock that runs ahead keeps a dead lease looking live for that much longer. A lease copied with
`cp` keeps the time in its file, so it looks exactly as old as it is; file mtimes are never used
(except for a file that cannot be parsed). A lease is dead at once, whatever its heartbeat, only
when it is provably dead HERE: same host name, same boot id and same pid namespace as the reader,
and the pid is gone, a zombie, or a different process (another start time). A process in another
container with the same host name (another pid namespace or boot id) is judged by its heartbeat.
Filesystems: O_EXCL is atomic on local filesystems and NFS v3+; listings and reads on NFS may lag
by the attribute-cache time, which only delays a takeover (the O_EXCL create decides).
"""
from __future__ import annotations

import json
import os
import platform
import re
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path

HEARTBEAT_S = float(os.environ.get("SES_CLAIM_HEARTBEAT_S", 30))
STALE_S = float(os.environ.get("SES_CLAIM_STALE_S", 180))
POLL_S = 0.2  # how soon a waiter looks at a held lease again


# ----------------------------------------------------------------------------- who is this process
def _read_first(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of a Linux process, None if unreadable."""
    text = _read_first(f"/proc/{pid}/stat")
    try:
        fields = text.rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (AttributeError, IndexError, ValueError):
        return None


def _pidns() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def owner_facts() -> dict:
    """What a reader needs to judge "dead here": host, pid, pid start time, boot id, pid namespace."""
    stat = _proc_stat(os.getpid())
    return dict(host=platform.node(), pid=os.getpid(), start=stat[1] if stat else None,
                boot=_read_first("/proc/sys/kernel/random/boot_id"), pidns=_pidns())


def dead_here(facts: dict) -> bool:
    """The owner ran on this host, this boot, this pid namespace, and its process no longer runs."""
    me = owner_facts()
    pid = facts.get("pid")
    if not isinstance(pid, int) or me["boot"] is None or me["pidns"] is None:
        return False
    if any(facts.get(k) != me[k] for k in ("host", "boot", "pidns")):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it exists, run by another user
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return False
    return stat[0] == "Z" or (isinstance(facts.get("start"), int) and stat[1] != facts["start"])


def who(facts: dict | None, now: float | None = None) -> str:
    """'<host> pid <pid> (<what>, heartbeat 12 s ago)' for messages."""
    if not facts:
        return "nobody"
    if "token" not in facts:
        return "a worker whose lease file cannot be read"
    age = (time.time() if now is None else now) - facts.get("heartbeat", 0)
    what = f"{facts['what']}, " if facts.get("what") else ""
    return f"{facts.get('host')} pid {facts.get('pid')} ({what}heartbeat {max(age, 0):.0f} s ago)"


# ----------------------------------------------------------------------------- lease files
def _path(folder: Path, stem: str, gen: int) -> Path:
    return folder / f"{stem}.{gen}.json"


def generations(folder: Path, stem: str) -> list[int]:
    """The generations of <stem>.<gen>.json present in folder, ascending ([] if the folder is gone)."""
    pattern = re.compile(re.escape(stem) + r"\.(\d+)\.json")
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(int(m.group(1)) for n in names if (m := pattern.fullmatch(n)))


def read(path: Path) -> dict | None:
    """A lease file's facts; None if it does not exist; {'mtime': ...} if it cannot be parsed (its
    creator is between O_EXCL and its one write, or died there)."""
    try:
        text = path.read_text()
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        facts = json.loads(text)
        if isinstance(facts, dict) and "token" in facts:
            return facts
    except ValueError:
        pass
    return dict(mtime=mtime)


def current(folder: Path, stem: str) -> tuple[Path | None, dict | None]:
    """(file, facts) of the highest generation present; (None, None) when there is no lease."""
    for gen in reversed(generations(folder, stem)):
        facts = read(_path(folder, stem, gen))
        if facts is not None:
            return _path(folder, stem, gen), facts
    return None, None


def is_free(facts: dict | None, now: float | None = None) -> str | None:
    """None while the lease is live; else why it may be taken: 'free', 'stale' or 'dead here'."""
    if facts is None:
        return "free"
    now = time.time() if now is None else now
    beat = facts.get("heartbeat", facts.get("mtime", 0))
    if not isinstance(beat, (int, float)) or now - beat > STALE_S:
        return "stale"
    return "dead here" if dead_here(facts) else None


def _identity(facts: dict | None):
    return None if facts is None else facts.get("token", ("unparsed", facts.get("mtime")))


class Lease:
    """A held lease: its file, its heartbeat thread, lost() and release()."""

    def __init__(self, folder: Path, stem: str, gen: int, what: str):
        self.folder, self.stem, self.gen, self.what = Path(folder), stem, gen, what
        self.path = _path(self.folder, stem, gen)
        self.token = secrets.token_hex(8)
        self.facts = dict(owner_facts(), token=self.token, gen=gen, what=what, since=time.time(),
                          heartbeat=time.time(), beat=0)
        self.previous: dict | None = None  # the facts of the lease this one replaced, if any
        self.reason = "free"  # why it could be taken: 'free', 'stale' or 'dead here'
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"lease-heartbeat-{stem}")

    def _create(self) -> bool:
        """O_EXCL create with the facts in one write; False if the name exists."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, json.dumps(self.facts).encode())
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return True

    def _write(self) -> None:
        self.facts.update(heartbeat=time.time(), beat=self.facts["beat"] + 1)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.facts, f)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def lost(self) -> str | None:
        """None while this process holds the lease; else 'taken over by <who>' or 'removed (...)'.
        A higher generation counts once it holds a taker's facts (a file still being written, or
        gone again because its taker backed off, does not); once lost, always lost."""
        if self._lost is None:
            for g in reversed([g for g in generations(self.folder, self.stem) if g > self.gen]):
                facts = read(_path(self.folder, self.stem, g))
                if facts is not None and "token" in facts:
                    self._lost = f"taken over by {who(facts)}"
                    break
            else:
                if _identity(read(self.path)) != self.token:
                    self._lost = f"removed ({self.path} is gone or was rewritten by another process)"
        return self._lost

    def _beat(self) -> None:
        failing = False
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if self.lost() is not None:
                    return  # another process holds it now: never write over its state
                self._write()
                failing = False
            except OSError as e:  # transient (network filesystem, full disk): retry at the next beat
                if not failing:
                    print(f"warning: could not refresh the heartbeat of {self.path} ({e}); retrying every "
                          f"{HEARTBEAT_S:g} s", file=sys.stderr, flush=True)
                failing = True

    def release(self) -> None:
        """Stop the heartbeat and delete this holder's file (fine if it or its folder is gone)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if _identity(read(self.path)) == self.token:
            self.path.unlink(missing_ok=True)


def take(folder: Path, stem: str, g: int, judged: dict | None, reason: str, what: str) -> Lease | None:
    """Steps 2-3 for a lease judged free: generation g (0: no file) with the facts `judged`, found
    `reason` ('free', 'stale', 'dead here'). The held lease, or None if another process moved first."""
    lease = Lease(folder, stem, g + 1, what)
    if not lease._create():
        return None
    if (g and _identity(read(_path(folder, stem, g))) != _identity(judged)) or \
            max(generations(folder, stem), default=0) > g + 1:
        lease.path.unlink(missing_ok=True)  # check (a) or (b) failed: someone else moved first
        return None
    for old in generations(folder, stem):
        if old < lease.gen:
            _path(folder, stem, old).unlink(missing_ok=True)
    lease.previous, lease.reason = judged, reason
    lease._thread.start()
    return lease


def try_acquire(folder: Path, stem: str, what: str, attempts: int = 100) -> Lease | None:
    """The lease <folder>/<stem>.<gen>.json for this process, or None while a live owner holds it
    (steps 1-3 of the protocol). OSError (folder not writable) propagates."""
    folder = Path(folder)
    for _ in range(attempts):
        gens = generations(folder, stem)
        g = gens[-1] if gens else 0
        judged = read(_path(folder, stem, g)) if g else None
        if g and judged is None:
            continue  # released or cleaned up between the listing and the read: look again
        reason = is_free(judged)
        if reason is None:
            return None
        lease = take(folder, stem, g, judged, reason, what)
        if lease is not None:
            return lease
    return None


def wait_acquire(folder: Path, stem: str, what: str, done=lambda: None) -> tuple[Lease | None, object]:
    """(lease, None) once this process holds the lease, or (None, result) as soon as done() returns
    a result other than None while it waits (the holder finished the work). While a live owner holds
    it: one line per holder waited for, then done() and the lease file are polled every POLL_S
    seconds; a released, stale or dead lease is taken (protocol above)."""
    told = None
    while True:
        lease = try_acquire(folder, stem, what)
        if lease is not None:
            return lease, None
        path, holder = current(Path(folder), stem)
        if holder is not None and "token" in holder and holder["token"] != told:  # not while it is being written
            told = holder["token"]
            print(f"waiting for {who(holder)} to finish: it holds {path}", flush=True)
        time.sleep(POLL_S)
        result = done()
        if result is not None:
            return None, result
