"""One run across processes (torchrun, gloo on the CPU): SES on the global batch equals the
single-process penalty and gradient; a two-process smoke run is killed and resumes to the same result."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import multigpu
from ses_core import SES

ROOT = Path(__file__).resolve().parents[1]
BATCH, WORLD = 12, 2
TIMING = {"epoch_time_s", "images_per_s", "overhead", "peak_mem_bytes", "solver_timings"}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 10)).double()


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (BATCH,), generator=g)


def step(model, ses, x, y):
    """One SES step: returns the penalty; leaves the gradients in the model."""
    ses.begin_step()
    loss = F.cross_entropy(model(x), y)
    reg = ses.penalty()
    (loss + reg).backward()
    return reg.detach()


def worker(rank: int, store: str, out: str):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        model = make_model()
        ses = SES(model, ["1", "3", "6"], lam=1.0, beta=0.7, solver="float64")  # a weight that makes R count
        ses.gather = multigpu.gather_rows
        ddp = multigpu.wrap(model, torch.device("cpu"))
        x, y = batch()
        rows = multigpu.shard(multigpu.current(), BATCH)
        reg = step(ddp, ses, x[rows], y[rows])
        if rank == 0:
            torch.save(dict(reg=reg, grads=[p.grad for p in model.parameters()]), out)
    finally:
        dist.destroy_process_group()


def test_ses_on_two_processes_equals_one_process_at_the_same_global_batch(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "store"), str(tmp_path / "out.pt")), nprocs=WORLD, join=True)
    got = torch.load(tmp_path / "out.pt")
    model = make_model()
    ses = SES(model, ["1", "3", "6"], lam=1.0, beta=0.7, solver="float64")
    reg = step(model, ses, *batch())
    assert torch.allclose(got["reg"], reg, rtol=1e-10, atol=1e-12)
    for g2, g1 in zip(got["grads"], (p.grad for p in model.parameters())):
        assert torch.allclose(g2, g1, rtol=1e-8, atol=1e-10), (g2 - g1).abs().max()


def torchrun(out: Path, *extra, wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           str(ROOT / "exp10_periodic_ses.py"), "--smoke", "--configs", "ses_k3", "--layers", "last3", "--epochs", "4",
           "--out-dir", str(out), *extra]
    if wait:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def descendants(pid: int) -> list[int]:
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    out, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        out += kids
        frontier = kids
    return out


def read_run(run_dir: Path):
    result = {k: v for k, v in json.loads((run_dir / "result.json").read_text()).items() if k not in TIMING}
    metrics = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
               for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return result, metrics


def test_two_process_smoke_run_is_killed_and_resumes_to_the_same_result(tmp_path):
    name = "ses_k3+epochs=4+layers=last3_seed0"
    full = torchrun(tmp_path / "a")
    assert full.returncode == 0, full.stderr[-3000:]
    ref = tmp_path / "a" / "smoke" / "exp10_periodic_ses" / name
    assert json.loads((ref / "result.json").read_text())["processes"] == WORLD

    run_dir = tmp_path / "b" / "smoke" / "exp10_periodic_ses" / name
    proc = torchrun(tmp_path / "b", wait=False)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    for pid in descendants(proc.pid):  # both ranks (torchrun starts them in sessions of their own), then torchrun
        os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "result.json").exists(), "the run finished before it could be killed"
    resumed = torchrun(tmp_path / "b")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout and resumed.stdout.count("== exp10_periodic_ses") == 1  # rank 0 alone prints
    assert read_run(run_dir) == read_run(ref)
