"""Several workers on one out-dir, as real processes: two independent commands, --devices with
--force, a worker killed by a signal, and what each --devices worker is given."""
import json
import os
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

from harness import cli
import exp10_periodic_ses as exp10
from helpers import EXP10, ROOT, SMOKE_EXP10, copy_out_dir, descendants, started_runs


def test_two_concurrent_workers_train_each_run_exactly_once(tmp_path):
    args = [sys.executable, str(EXP10), "--smoke", "--configs", "baseline", "ses_k3", "--seeds", "0", "1",
            "--out-dir", str(tmp_path)]
    procs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    started = [name for out, _ in outs for name in started_runs(out)]
    names = {f"{c}_seed{s}" for c in ("baseline", "ses_k3") for s in (0, 1)}
    assert sorted(started) == sorted(names)  # every run trained once, by one of the two
    exp = tmp_path.joinpath(*SMOKE_EXP10)
    assert all((exp / n / "result.json").is_file() and not list((exp / n).glob("claim*")) for n in names)
    summary = json.loads((exp / "summary.json").read_text())
    assert {f"{r['config']}_seed{r['seed']}" for r in summary["runs"]} == names


@pytest.mark.xdist_group("exp10_smoke")
def test_force_with_two_workers_deletes_once_and_trains_each_selected_run_once(exp10_smoke, tmp_path):
    out = copy_out_dir(exp10_smoke[0], tmp_path / "out")
    exp = out.joinpath(*SMOKE_EXP10)
    before = {d.name: (d / "result.json").stat().st_mtime_ns for d in exp.iterdir() if d.is_dir()}
    p = subprocess.run([sys.executable, str(EXP10), "--smoke", "--devices", "cpu,cpu", "--force",
                        "--configs", "baseline", "ses_k1", "--out-dir", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert sorted(started_runs(p.stdout)) == ["baseline_seed0", "ses_k1_seed0"]  # each once, by one worker
    assert p.stdout.count("deleted as asked") == 2  # by the parent, once each
    after = {d.name: (d / "result.json").stat().st_mtime_ns for d in exp.iterdir() if d.is_dir()}
    assert after.keys() == before.keys()
    assert {n for n in before if after[n] != before[n]} == {"baseline_seed0", "ses_k1_seed0"}


def test_a_worker_killed_by_a_signal_fails_the_command(tmp_path):
    proc = subprocess.Popen([sys.executable, str(EXP10), "--smoke", "--devices", "cpu,cpu", "--configs", "baseline",
                             "--epochs", "1", "--out-dir", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(descendants(proc.pid)) < 2:  # the event: both workers exist
        time.sleep(0.02)
    worker = descendants(proc.pid)[0]
    os.kill(worker, signal.SIGKILL)  # a worker takes seconds to import torch: it is still alive here
    out, err = proc.communicate(timeout=600)
    assert proc.returncode != 0
    assert "was killed by signal 9" in err and "rerun the same command" in err and "Traceback" not in err


def test_each_device_worker_sees_only_its_own_gpu_and_never_gets_force(tmp_path, monkeypatch):
    started = []

    def popen(cmd, env=None):
        started.append((cmd, env))
        return types.SimpleNamespace(wait=lambda: 0)
    monkeypatch.setattr(cli.subprocess, "Popen", popen)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")  # the parent's own view: physical GPUs 2 and 3
    for spelling in (["--devices=all"], ["--devices", "all"], ["--devices", "cuda:0,cuda:1"]):
        started.clear()
        argv = ["--smoke", *spelling, "--force", "--device", "cpu", "--configs", "baseline", "--out-dir", str(tmp_path)]
        assert cli.run_experiment(str(EXP10), exp10.SETUP, exp10.GRID, "doc", argv) == 0
        assert [env["CUDA_VISIBLE_DEVICES"] for _, env in started] == ["2", "3"]
        for cmd, _ in started:
            args = cmd[2:]
            assert args[-2:] == ["--device", "cuda:0"] and args.count("--device") == 1
            assert not any(a.startswith("--devices") or a == "--force" for a in args), args
    started.clear()
    assert cli.run_experiment(str(EXP10), exp10.SETUP, exp10.GRID, "doc",
                              ["--smoke", "--devices", "cuda:1", "--out-dir", str(tmp_path)]) == 0
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in started] == ["3"]


@pytest.mark.xdist_group("exp10_smoke")
def test_a_preflight_with_force_and_devices_deletes_nothing(exp10_smoke, tmp_path, monkeypatch):
    out = copy_out_dir(exp10_smoke[0], tmp_path / "out")
    before = sorted(p.name for p in out.joinpath(*SMOKE_EXP10).iterdir())
    monkeypatch.setattr(cli.subprocess, "Popen", lambda cmd, env=None: types.SimpleNamespace(wait=lambda: 0))
    assert cli.run_experiment(str(EXP10), exp10.SETUP, exp10.GRID, "doc", ["--smoke", "--preflight", "--force",
                                                                           "--devices", "cpu", "--out-dir", str(out)]) == 0
    assert sorted(p.name for p in out.joinpath(*SMOKE_EXP10).iterdir()) == before
