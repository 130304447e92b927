"""One run across processes (torchrun, gloo on the CPU): SES on the global batch equals the
single-process penalty and gradient; dropout streams per rank that a resume restores; the process
group torn down at the end; a two-process smoke run killed and resumed to the same result; a grid
under two ranks where one run diverges, one resumes from a corrupt checkpoint and hooks a BatchNorm."""
import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from harness import checkpoints
from harness import multigpu
from harness import runs
from harness.config import DEFAULTS
from data_utils import Data, synthetic_dataset
from helpers import EXP10, ROOT, read_run, run, self_killing
from harness.registry import make_registry
from ses_core import SES

BATCH, WORLD = 12, 2
GLOO_THREADS = {"pt_gloo_runloop", "gloo_tcp_loop"}


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


def tiny_run():
    """A real run (the CIFAR-stem ResNet-18, SES off) on 8 generated 8x8 images."""
    tx, ty, vx, vy, _ = synthetic_dataset(10, 8, 8, 4)
    data = Data(tx, ty, vx, vy, dict(num_classes=10, image_size=8, pad=1, mean=(0.5,) * 3, std=(0.25,) * 3))
    cfg = dict(DEFAULTS, dataset="cifar10", layers="last3", batch_size=4, seed=3, epochs=1, experiment="e", config="c")
    return runs.build_run(cfg, data, torch.device("cpu"), make_registry())


def gloo_threads() -> set:
    return {Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task")} & GLOO_THREADS


def worker(rank: int, store: str, out: str):
    multigpu.join("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    report = {}
    try:
        model = make_model()
        ses = SES(model, ["1", "3", "6"], lam=1.0, beta=0.7, solver="float64")  # a weight that makes R count
        ses.gather = multigpu.gather_rows
        ddp = multigpu.wrap(model, torch.device("cpu"))
        x, y = batch()
        rows = multigpu.shard(multigpu.current(), BATCH)
        report.update(reg=step(ddp, ses, x[rows], y[rows]), grads=[p.grad for p in model.parameters()])
        # dropout: one stream per rank after a run is built; a checkpoint restores each rank's own
        r = tiny_run()
        first = F.dropout(torch.ones(256), 0.5).bool()
        state = checkpoints.checkpoint_state(r, 1, [dict(epoch=1)])
        if rank == 0:
            torch.save(state, Path(out).with_name("checkpoint.pt"))
        multigpu.barrier()
        after = F.dropout(torch.ones(256), 0.5).bool()
        F.dropout(torch.ones(999), 0.5)  # move every stream on
        checkpoints.resume(r, Path(out).parent)
        again = F.dropout(torch.ones(256), 0.5).bool()
        report.update(masks=multigpu.gather_objects(first), restored=bool(torch.equal(after, again)),
                      restored_all=multigpu.gather_objects(bool(torch.equal(after, again))))
        r.close()
        del ddp, model, ses, r
    finally:
        multigpu.finish()
    report["threads_after_finish"] = gloo_threads()
    if rank == 0:
        torch.save(report, out)


def test_ses_on_two_processes_equals_one_process_and_each_rank_draws_its_own_dropout(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "store"), str(tmp_path / "out.pt")), nprocs=WORLD, join=True)
    got = torch.load(tmp_path / "out.pt", weights_only=False)
    model = make_model()
    ses = SES(model, ["1", "3", "6"], lam=1.0, beta=0.7, solver="float64")
    reg = step(model, ses, *batch())
    assert torch.allclose(got["reg"], reg, rtol=1e-10, atol=1e-12)
    for g2, g1 in zip(got["grads"], (p.grad for p in model.parameters())):
        assert torch.allclose(g2, g1, rtol=1e-8, atol=1e-10), (g2 - g1).abs().max()
    m0, m1 = got["masks"]
    assert not torch.equal(m0, m1)  # the shards draw independent masks
    single = tiny_run()  # rank 0 keeps the stream one process would draw
    assert torch.equal(F.dropout(torch.ones(256), 0.5).bool(), m0)
    single.close()
    assert got["restored_all"] == [True, True]  # resume gives each rank its own state back
    assert got["threads_after_finish"] == set()  # finish() stopped gloo's threads (DDP was built)


def torchrun(out: Path, *extra, script=EXP10, timeout=900):
    return run(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", script, "--smoke",
                *extra, "--out-dir", out], timeout=timeout)


@pytest.mark.end_to_end
def test_two_process_smoke_run_is_killed_and_resumes_to_the_same_result(tmp_path):
    args = ["--configs", "ses_k3", "--layers", "last3", "--epochs", "4"]
    name = "ses_k3+epochs=4+layers=last3_seed0"
    full = torchrun(tmp_path / "a", *args)
    assert full.returncode == 0, full.stderr[-3000:]
    ref = tmp_path / "a" / "smoke" / "exp10_periodic_ses" / name
    assert json.loads((ref / "result.json").read_text())["processes"] == WORLD

    run_dir = tmp_path / "b" / "smoke" / "exp10_periodic_ses" / name
    killed = torchrun(tmp_path / "b", *args, script=self_killing(tmp_path, EXP10, epoch=3))  # rank 0: SIGKILL
    assert killed.returncode != 0 and not (run_dir / "result.json").exists()
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["epoch"] == 2
    resumed = torchrun(tmp_path / "b", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout and resumed.stdout.count("== exp10_periodic_ses") == 1  # rank 0 alone prints
    assert read_run(run_dir) == read_run(ref)


@pytest.mark.end_to_end
def test_a_run_resumes_across_process_counts(tmp_path):
    """One process killed in epoch 2, resumed under two ranks and killed in epoch 3, resumed by one
    process to the end: each resume goes on from the last checkpoint, whatever the process count."""
    args = ["--smoke", "--configs", "ses_k3", "--layers", "last3", "--epochs", "4", "--out-dir", tmp_path]
    run_dir = tmp_path / "smoke" / "exp10_periodic_ses" / "ses_k3+epochs=4+layers=last3_seed0"
    assert run([self_killing(tmp_path, EXP10, epoch=2), *args]).returncode == -9
    two = torchrun(tmp_path, *args[1:-2], script=self_killing(tmp_path, EXP10, epoch=3))
    assert two.returncode != 0 and "resuming ses_k3+epochs=4+layers=last3_seed0 after epoch 1/4" in two.stdout
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 2 and len(ckpt["rng_ranks"]) == WORLD
    one = run([EXP10, *args])
    assert one.returncode == 0, one.stderr[-3000:]
    assert "resuming ses_k3+epochs=4+layers=last3_seed0 after epoch 2/4" in one.stdout
    result = json.loads((run_dir / "result.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert result["epochs"] == 4 and result["processes"] == 1 and [r["epoch"] for r in rows] == [1, 2, 3, 4]


GRID_SCRIPT = """import sys
sys.path.insert(0, {root!r})
from harness.cli import run_experiment
SETUP = dict(dataset="cifar10", model="resnet18", layers="last3")
GRID = {{"unreadable": dict(ses=False), "diverges": dict(ses=True, lr=1e30),
         "bn_hooks": dict(ses=True, layers="bn1,layer4.1")}}
sys.exit(run_experiment({exp10!r}, SETUP, GRID, "doc", sys.argv[1:]))
"""


def test_under_two_ranks_a_diverging_run_fails_alone_a_corrupt_checkpoint_is_moved_once_and_bn_can_be_hooked(tmp_path):
    script = tmp_path / "grid.py"
    script.write_text(GRID_SCRIPT.format(root=str(ROOT), exp10=str(EXP10)))
    exp = tmp_path / "out" / "smoke" / "exp10_periodic_ses"
    (exp / "bn_hooks_seed0").mkdir(parents=True)
    (exp / "bn_hooks_seed0" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    (exp / "unreadable_seed0").mkdir()
    (exp / "unreadable_seed0" / "config.json").write_text('{"config": {')  # a copy cut short: rank 0 alone reads it
    p = torchrun(tmp_path / "out", script=script)
    assert p.returncode == 1, p.stderr[-3000:]  # runs failed; the job went on (torchrun adds its own report)
    assert not [line for line in p.stderr.splitlines() if line.strip().startswith(f'File "{ROOT}')]  # no traceback of ours
    assert p.stderr.count("error: 2 run(s) failed: unreadable_seed0, diverges_seed0") == 1
    assert p.stderr.count("failed during") == 1 and p.stderr.count("config.json cannot be read") == 1
    failure = json.loads((exp / "diverges_seed0" / "failure.json").read_text())
    assert failure["error"] == "NonFiniteLoss" and failure["stage"].startswith("epoch")
    assert failure["message"].startswith("non-finite loss at epoch 1, step ") and "(on rank " in failure["message"]
    result = json.loads((exp / "bn_hooks_seed0" / "result.json").read_text())
    assert result["processes"] == WORLD and set(result["entropy"]) == {"bn1", "layer4.1"}
    assert [f.name for f in (exp / "bn_hooks_seed0").glob("checkpoint.pt.corrupt*")] == ["checkpoint.pt.corrupt"]
    assert p.stderr.count("warning: checkpoint") == 1  # rank 0 alone read it and moved it aside


def test_batchnorm_becomes_syncbatchnorm_before_the_hooks_are_attached(monkeypatch):
    monkeypatch.setattr(multigpu, "uses_sync_batchnorm", lambda device: True)  # as on several GPUs
    tx, ty, vx, vy, _ = synthetic_dataset(10, 8, 8, 4)
    data = Data(tx, ty, vx, vy, dict(num_classes=10, image_size=8, pad=1, mean=(0.5,) * 3, std=(0.25,) * 3))
    cfg = dict(DEFAULTS, dataset="cifar10", layers="bn1,layer4.1", ses=True, batch_size=4, seed=0, epochs=1,
               experiment="e", config="c")
    run_ = runs.build_run(cfg, data, torch.device("cpu"), make_registry())
    assert isinstance(run_.model.bn1, nn.SyncBatchNorm)  # (one process, no group: it runs as BatchNorm)
    run_.ses.begin_step()
    run_.model(torch.rand(4, 3, 8, 8))
    assert list(run_.ses.collector.activations) == ["bn1", "layer4.1"]  # the hook sits on the module that ran
    run_.close()
