"""Run claims (claims.py on leases.py) on real files with real processes: takeover races, heartbeats
that fail for a while, owners that learn they lost, and who counts as dead or alive."""
import json
import re
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import claims
from plumbing import leases

ROOT = Path(__file__).resolve().parents[1]


def wait_until(cond, procs=(), timeout=60.0):
    """Poll cond() (an event on disk) until true; fail early if a process died meanwhile."""
    deadline = time.monotonic() + timeout
    while not cond():
        dead = [p for p in procs if p.poll() not in (None, 0)]
        assert not dead, dead[0].communicate()[1][-2000:]
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.002)


def files(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir())


@pytest.fixture
def run(tmp_path):
    d = tmp_path / "exp" / "baseline_seed0"
    d.mkdir(parents=True)
    return d


# ----------------------------------------------------------------------------- live, stale, dead
def test_a_fresh_claim_of_another_host_is_respected_and_a_stale_one_taken_over(run, write_lease, capsys):
    write_lease(run / "claim.1.json", age=leases.STALE_S - 30, host="elsewhere", boot="b", pidns="p", pid=4242)
    assert claims.acquire(run) is None
    described = re.fullmatch(r"elsewhere pid 4242 \(training elsewhere, heartbeat (\d+) s ago\)", claims.describe(run))
    assert described and abs(int(described.group(1)) - (leases.STALE_S - 30)) <= 2  # the file's own age
    old = write_lease(run / "claim.1.json", age=leases.STALE_S + 5, host="elsewhere", boot="b", pidns="p")
    claim = claims.acquire(run)
    assert claim is not None and claim.lease.gen == 2 and claim.lease.previous["token"] == old["token"]
    assert "note: taking over the stale claim of baseline_seed0 (elsewhere pid" in capsys.readouterr().out
    assert files(run) == ["claim.2.json"]
    facts = json.loads((run / "claim.2.json").read_text())
    assert facts["pid"] == os.getpid() and facts["host"] == platform.node() and facts["gen"] == 2
    assert facts["boot"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert facts["pidns"] == os.readlink("/proc/self/ns/pid") and abs(facts["heartbeat"] - time.time()) < 60
    claim.check()
    claim.release()
    assert files(run) == []


def test_a_claim_of_a_dead_zombie_or_reused_pid_on_this_host_is_taken_at_once(run, write_lease, dead_pid):
    zombie = subprocess.Popen(["true"])  # exits, and stays a zombie until waited for
    wait_until(lambda: leases._proc_stat(zombie.pid)[0] == "Z")
    me = leases.owner_facts()
    for facts in (dict(pid=dead_pid), dict(pid=zombie.pid), dict(pid=os.getpid(), start=me["start"] + 1000)):
        write_lease(run / "claim.1.json", age=0, **facts)  # a fresh heartbeat, same host, boot id, pid namespace
        claim = claims.acquire(run)
        assert claim is not None and claim.lease.reason == "dead here", facts
        claim.release()
    zombie.wait()
    write_lease(run / "claim.1.json", age=0)  # this very process: alive
    assert claims.acquire(run) is None


@pytest.mark.parametrize("other", [dict(boot="0b1d0000-another-boot"), dict(pidns="pid:[4026500000]")])
def test_a_live_claim_of_another_container_with_this_host_name_is_respected(run, write_lease, dead_pid, other):
    # its pid means nothing here: another pid namespace or another boot of the machine
    write_lease(run / "claim.1.json", age=0, pid=dead_pid, **other)
    assert claims.acquire(run) is None
    assert claims.describe(run).startswith(f"{platform.node()} pid {dead_pid} (")


def test_a_claim_copied_back_with_cp_keeps_its_age(tmp_path, write_lease):
    kaggle = tmp_path / "kaggle" / "baseline_seed0"
    kaggle.mkdir(parents=True)
    old = write_lease(kaggle / "claim.1.json", age=leases.STALE_S + 60, host="kaggle-vm", boot="k", pidns="k")
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["cp", "-r", str(kaggle), str(out)], check=True)  # plain cp: the copy's mtime is now
    copy = out / "baseline_seed0"
    assert time.time() - (copy / "claim.1.json").stat().st_mtime < leases.STALE_S
    assert int(claims.describe(copy).split("heartbeat ")[1].split()[0]) >= leases.STALE_S + 60
    claim = claims.acquire(copy)
    assert claim is not None and claim.lease.previous["token"] == old["token"] and claim.lease.reason == "stale"
    claim.release()


# ----------------------------------------------------------------------------- the owner's side
def test_a_claim_whose_heartbeat_fails_for_a_while_is_kept_and_refreshed(run, monkeypatch, capsys):
    monkeypatch.setattr(leases, "HEARTBEAT_S", 0.01)
    real, failed = os.replace, []

    def flaky(src, dst):
        if Path(dst).name.startswith("claim.") and len(failed) < 3:
            failed.append(dst)
            raise OSError(5, "Input/output error")
        return real(src, dst)
    monkeypatch.setattr(os, "replace", flaky)
    claim = claims.acquire(run)
    first = json.loads(claim.path.read_text())
    wait_until(lambda: json.loads(claim.path.read_text())["beat"] >= 2)
    assert len(failed) == 3
    claim.check()  # still this worker's
    now = json.loads(claim.path.read_text())
    assert now["token"] == first["token"] and now["heartbeat"] > first["heartbeat"]
    assert claim.lease._thread.is_alive()
    claim.release()
    assert capsys.readouterr().err.count("could not refresh the heartbeat") == 1
    assert files(run) == []  # no heartbeat temp file left either


def test_an_owner_whose_claim_was_taken_over_gets_claim_lost_and_leaves_the_new_claim(run):
    mine = claims.acquire(run)
    mine.check()
    # another worker whose clock or patience judges this claim stale (STALE_S < 0) takes it over
    taker = subprocess.run([sys.executable, "-c", "import os, sys; from harness import claims; c = claims.acquire(sys.argv[1]); "
                            "print(c.lease.gen, os.getpid())", str(run)], cwd=ROOT, capture_output=True, text=True,
                           env=dict(os.environ, SES_CLAIM_STALE_S="-1"), timeout=60)
    assert taker.returncode == 0, taker.stderr
    gen, pid = taker.stdout.split()[-2:]
    assert gen == "2" and "taking over the stale claim of baseline_seed0" in taker.stdout
    with pytest.raises(claims.ClaimLost) as lost:
        mine.check()
    assert str(lost.value).startswith(f"the claim of baseline_seed0 was taken over by {platform.node()} pid {pid} (")
    assert str(lost.value).endswith("; this worker stops the run") and "\n" not in str(lost.value)
    assert isinstance(lost.value, RuntimeError)
    mine.release()
    assert files(run) == ["claim.2.json"]  # the taker's claim stays; the taker has exited: dead here
    again = claims.acquire(run)
    assert again is not None and again.lease.gen == 3 and again.lease.reason == "dead here"
    again.release()


def test_release_and_heartbeat_after_the_run_folder_was_deleted(run, monkeypatch):
    monkeypatch.setattr(leases, "HEARTBEAT_S", 0.01)
    claim = claims.acquire(run)
    wait_until(lambda: shutil.rmtree(run, ignore_errors=True) or not run.exists())  # e.g. --force in the parent
    wait_until(lambda: not claim.lease._thread.is_alive())  # the heartbeat ends: the claim is gone
    assert not run.exists()  # and it did not recreate anything
    with pytest.raises(claims.ClaimLost, match="baseline_seed0 was removed"):
        claim.check()
    claim.release()


# ----------------------------------------------------------------------------- the ABA cases
def test_a_slow_taker_acting_on_an_old_judgement_backs_off(run, write_lease):
    old = write_lease(run / "claim.1.json", age=leases.STALE_S + 5, host="elsewhere", boot="b", pidns="p")
    judged = leases.read(run / "claim.1.json")
    first = claims.acquire(run)  # a fast taker: claim.2, claim.1 deleted
    first.release()  # ... and done: the folder is empty again
    assert files(run) == [] and judged["token"] == old["token"]
    # the slow taker still acts on its judgement of claim.1: it may create claim.2, but the token it
    # judged is gone, so it backs off
    assert leases.take(run, "claim", 1, judged, "stale", "slow") is None and files(run) == []
    fresh = claims.acquire(run)  # a fresh acquire now: claim.1
    assert fresh.lease.gen == 1
    assert leases.take(run, "claim", 1, judged, "stale", "slow") is None  # a stale judgement of an old claim.1
    assert leases.take(run, "claim", 0, None, "free", "slow") is None  # judged the folder empty: claim.1 exists
    fresh.check()
    assert files(run) == ["claim.1.json"]
    fresh.release()


def test_a_fresh_acquire_that_missed_a_takeover_backs_off(run, write_lease):
    write_lease(run / "claim.2.json", age=0, host="elsewhere", boot="b", pidns="p")  # a live claim, generation 2
    # an acquirer whose listing saw no file creates claim.1, then sees generation 2 and backs off
    assert leases.take(run, "claim", 0, None, "free", "late") is None
    assert files(run) == ["claim.2.json"]


RACER = r"""
import sys, time
from pathlib import Path
from harness import claims
from plumbing import leases
assert "torch" not in sys.modules
root, me, races = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])

def wait_for(path):
    while not path.exists():
        time.sleep(0.001)

held = None
for r in range(races):
    run = root / f"race{r}"
    wait_for(root / f"prep.{r}")
    g = max(leases.generations(run, "claim"), default=0)  # everyone judges the claim before the start
    judged = leases.read(run / f"claim.{g}.json") if g else None
    reason = leases.is_free(judged)
    (root / f"ready.{r}.{me}").touch()
    wait_for(root / f"go.{r}")
    if held is not None:
        held.release()
    if r % 2:  # all act on the judgement made before the start: the O_EXCL create decides
        lease = leases.take(run, "claim", g, judged, reason, "racing")
        held = claims.Claim(run, lease) if lease is not None else None
    else:  # claims.acquire from scratch, as the sweep calls it
        held = claims.acquire(run)
    (root / f".result.{r}.{me}").write_text(f"won {held.lease.gen} {held.lease.token}" if held else "lost")
    (root / f".result.{r}.{me}").rename(root / f"result.{r}.{me}")
wait_for(root / "done")
if held is not None:
    held.release()
"""


def test_eight_processes_racing_for_one_claim_exactly_one_wins_every_time(tmp_path, write_lease, dead_pid):
    """Odd races: every racer judged the claim free before the start and acts on that judgement;
    even races: every racer calls claims.acquire after the start."""
    n, races = 8, 24
    kinds = ["stale", "dead here", "free"]  # an old heartbeat, a dead pid of this host, no claim at all
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), str(i), str(races)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]
    try:
        for r in range(races):
            run, kind = tmp_path / f"race{r}", kinds[r % 3]
            run.mkdir()
            if kind == "stale":
                write_lease(run / "claim.1.json", age=leases.STALE_S + 60, host="elsewhere", boot="b", pidns="p")
            elif kind == "dead here":
                write_lease(run / "claim.1.json", age=0, pid=dead_pid)
            (tmp_path / f"prep.{r}").touch()
            wait_until(lambda: all((tmp_path / f"ready.{r}.{i}").exists() for i in range(n)), procs)
            (tmp_path / f"go.{r}").touch()  # all eight start this race together
            wait_until(lambda: all((tmp_path / f"result.{r}.{i}").exists() for i in range(n)), procs)
            results = [(tmp_path / f"result.{r}.{i}").read_text() for i in range(n)]
            won = [x.split() for x in results if x.startswith("won")]
            assert len(won) == 1, (r, kind, results)
            gen = 1 if kind == "free" else 2
            assert won[0][1] == str(gen) and files(run) == [f"claim.{gen}.json"], (r, kind, files(run))
            assert json.loads((run / f"claim.{gen}.json").read_text())["token"] == won[0][2]
        (tmp_path / "done").touch()
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    assert not any("Traceback" in e for _, e in outs)
    notes = sum(o.count("note: taking over the") for o, _ in outs)  # one line per takeover by acquire
    assert notes == sum(kinds[r % 3] != "free" and r % 2 == 0 for r in range(races))
    assert all(files(tmp_path / f"race{r}") == [] for r in range(races))  # every claim released
