"""Several workers on one out-dir: each run is claimed before it is trained, so it is trained once.

The claim of a run is a lease (plumbing/leases.py) in its folder: <run-dir>/claim.<gen>.json, created with
O_EXCL, its heartbeat time written in the file every HEARTBEAT_S seconds (SES_CLAIM_HEARTBEAT_S,
default 30). Another worker skips a run whose claim is live; it takes over a claim whose in-file
heartbeat is older than STALE_S (SES_CLAIM_STALE_S, default 180: its worker was killed, or its
notebook died, or the claim was copied back from another machine), or whose owner is provably dead
on this host (same host, boot id and pid namespace; the pid is gone). Takeover creates the next
generation's file with O_EXCL, so of any number of workers exactly one wins. A worker whose claim
was taken over (its heartbeat stalled past STALE_S, or its clock lags the taker's by more than
that) learns it from Claim.check(), meant to be called after every epoch before the checkpoint is
written: it raises ClaimLost with one line. result.json is checked again after claiming
(harness/sweep.py), so a finished run is never trained twice. A live run folder holds one claim.<gen>.json (two for an instant during a takeover), plus,
for an instant during each heartbeat, a .claim.<gen>.json.<random>.tmp; release deletes the claim.
"""
from __future__ import annotations

from pathlib import Path

from plumbing import leases
from plumbing.leases import HEARTBEAT_S, STALE_S  # noqa: F401  (the settings, for messages and tests)

STEM = "claim"


class ClaimLost(RuntimeError):
    """Another worker took this run's claim over: this worker must stop training the run."""


class Claim:
    """This worker's claim on one run: check() after every epoch, release() when done."""

    def __init__(self, run_dir: Path, lease: leases.Lease):
        self.run_dir, self.lease = Path(run_dir), lease
        self.path = lease.path

    def check(self) -> None:
        """Raise ClaimLost if another worker holds the run now (or the claim file was deleted)."""
        lost = self.lease.lost()
        if lost is not None:
            raise ClaimLost(f"the claim of {self.run_dir.name} was {lost}; this worker stops the run")

    def owned(self) -> bool:
        return self.lease.lost() is None

    def release(self) -> None:
        """Delete the claim; fine if the run folder is gone already (e.g. --force removed it)."""
        self.lease.release()


def acquire(run_dir: Path) -> Claim | None:
    """The claim of run_dir for this process, or None while a live worker holds it."""
    run_dir = Path(run_dir)
    lease = leases.try_acquire(run_dir, STEM, f"training {run_dir.name}")
    if lease is None:
        return None
    if lease.previous is not None:
        print(f"note: taking over the {lease.reason} claim of {run_dir.name} ({leases.who(lease.previous)})",
              flush=True)
    return Claim(run_dir, lease)


def describe(run_dir: Path) -> str:
    """Who holds the claim of run_dir and how old its heartbeat is, for the 'skipped' line."""
    try:
        return leases.who(leases.current(Path(run_dir), STEM)[1])
    except OSError:
        return "another worker"
