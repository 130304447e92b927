"""A failure ends one run, never the sweep; a run folder always means one setting; Ctrl-C; resume."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cli
import runs
from config import DEFAULTS
from data_utils import Data, synthetic_dataset
from registry import make_registry

ROOT = Path(__file__).resolve().parents[1]
EXP10 = str(ROOT / "exp10_periodic_ses.py")
SETUP = dict(dataset="cifar10", layers="last3")
GRID = {"baseline": dict(ses=False), "ses": dict(ses=True)}


def script(*args, timeout=600):
    return subprocess.run([sys.executable, EXP10, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def in_process(tmp_path, *args):
    return cli.run_experiment(EXP10, SETUP, GRID, "doc", ["--smoke", "--out-dir", str(tmp_path), *args])


def test_non_finite_activations_end_their_run_with_one_line_and_the_sweep_goes_on(tmp_path):
    p = script("--smoke", "--configs", "ses_k1", "baseline", "--lr", "1e5", "--out-dir", tmp_path)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "LinAlgError" not in p.stderr
    exp = tmp_path / "smoke" / "exp10_periodic_ses"
    for name in ("ses_k1+lr=100000.0_seed0", "baseline+lr=100000.0_seed0"):
        failure = json.loads((exp / name / "failure.json").read_text())
        assert failure["stage"].startswith("epoch") and failure["message"]
        assert sum(name in line and "failed during" in line for line in p.stderr.splitlines()) == 1
    summary = json.loads((exp / "summary.json").read_text())
    assert {f["run"] for f in summary["failed"]} == {"ses_k1+lr=100000.0_seed0", "baseline+lr=100000.0_seed0"}


def test_error_in_final_metrics_keeps_the_checkpoint_and_the_rerun_redoes_only_the_final_stage(tmp_path, monkeypatch,
                                                                                               capsys):
    real = runs.final_metrics
    calls = []

    def broken(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom in the final metrics")
        return real(*a, **k)

    monkeypatch.setattr(runs, "final_metrics", broken)
    assert in_process(tmp_path) == 1  # baseline failed at the end, ses still ran
    exp = tmp_path / "smoke" / "exp10_periodic_ses"
    err = capsys.readouterr().err
    assert "baseline_seed0 failed during final metrics: boom in the final metrics" in err
    assert json.loads((exp / "baseline_seed0" / "failure.json").read_text())["stage"] == "final metrics"
    assert (exp / "ses_seed0" / "result.json").is_file() and not (exp / "baseline_seed0" / "result.json").exists()
    assert torch.load(exp / "baseline_seed0" / "checkpoint.pt", weights_only=False)["epoch"] == 2
    assert in_process(tmp_path) == 0
    out = capsys.readouterr().out
    assert "resuming baseline_seed0 after epoch 2/2" in out and "epoch 1/2" not in out
    assert (exp / "baseline_seed0" / "result.json").is_file() and not (exp / "baseline_seed0" / "failure.json").exists()


def test_out_of_memory_names_the_flag_to_lower(tmp_path, monkeypatch, capsys):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(runs, "final_metrics", oom)
    assert in_process(tmp_path, "--configs", "baseline") == 1
    err = capsys.readouterr().err
    assert "out of GPU memory during final metrics; lower --attack-batch-size" in err


def test_a_run_that_fails_its_checks_writes_nothing(tmp_path):
    p = script("--smoke", "--configs", "baseline", "--batch-size", "1000", "--out-dir", tmp_path)
    assert p.returncode == 1 and "--batch-size 1000 exceeds the 96 training samples" in p.stderr
    assert "Traceback" not in p.stderr
    exp = tmp_path / "smoke" / "exp10_periodic_ses"
    assert not [d for d in exp.iterdir() if d.is_dir()]  # no folder to block a later run
    p = script("--smoke", "--layers", "layer4.9", "--out-dir", tmp_path)
    assert p.returncode == 2 and "argument --layers: unknown layer name 'layer4.9'" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_force_restarts_only_the_selected_runs_and_no_message_suggests_deleting_all(tmp_path):
    assert in_process(tmp_path) == 0
    exp = tmp_path / "smoke" / "exp10_periodic_ses"
    before = (exp / "ses_seed0" / "result.json").stat().st_mtime_ns
    p = subprocess.run([sys.executable, "-c", f"import sys; sys.argv[0] = {EXP10!r}; import cli; "
                        f"sys.exit(cli.run_experiment({EXP10!r}, {SETUP!r}, {GRID!r}, 'doc', "
                        f"['--smoke', '--out-dir', {str(tmp_path)!r}, '--configs', 'baseline', '--force']))"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (exp / "ses_seed0" / "result.json").stat().st_mtime_ns == before
    assert "--force" not in p.stdout + p.stderr


def test_resume_across_precision_and_gpu_count(tmp_path, capsys):
    """A bf16 (no GradScaler state) checkpoint resumes under fp16; an old 2-GPU RNG list resumes on one."""
    tx, ty, vx, vy, _ = synthetic_dataset(10, 32, 64, 16)
    data = Data(tx, ty, vx, vy, dict(num_classes=10, image_size=32, pad=4, mean=(0.5,) * 3, std=(0.25,) * 3))
    cfg = dict(DEFAULTS, dataset="cifar10", layers="last3", batch_size=16, seed=0, epochs=2, amp="bf16",
               experiment="e", config="c")
    reg = make_registry()
    bf16 = runs.build_run(cfg, data, torch.device("cpu"), reg)
    assert not bf16.scaler.is_enabled()
    runs.save_checkpoint(bf16, tmp_path / "checkpoint.pt", 1, [dict(epoch=1)])
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert not ckpt["scaler"]  # GradScaler state only on the fp16 path
    ckpt["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]  # 2-GPU format
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    fp16 = runs.build_run(dict(cfg, amp="fp16"), data, torch.device("cpu"), reg)
    assert fp16.scaler.is_enabled()
    runs.save_checkpoint(fp16, tmp_path / "fp16.pt", 1, [dict(epoch=1)])
    assert torch.load(tmp_path / "fp16.pt", weights_only=False)["scaler"]["scale"] > 0
    history, epoch = runs.resume(fp16, tmp_path)
    assert epoch == 1 and history == [dict(epoch=1)]
    assert "the loss scale starts afresh" in capsys.readouterr().out
    assert runs.rng_state(torch.device("cpu"))["cuda"] is None  # only the device in use is saved


def test_ctrl_c_is_one_line_exit_130_and_keeps_the_last_checkpoint(tmp_path):
    run_dir = tmp_path / "smoke" / "exp10_periodic_ses" / "ses_k3+epochs=6_seed0"
    proc = subprocess.Popen([sys.executable, EXP10, "--smoke", "--configs", "ses_k3", "--epochs", "6",
                             "--out-dir", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((run_dir / "metrics.jsonl").is_file()
                                          and (run_dir / "metrics.jsonl").read_text().count("\n") >= 1):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "interrupted; rerun the same command to resume"
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["epoch"] >= 1
    assert not (run_dir / "result.json").exists()


@pytest.mark.parametrize("value,name", [("3", "ses_k1+every=3_seed0"), ("1", "ses_k1_seed0")])
def test_run_names_carry_the_overrides(value, name):
    from config import resolve_config, run_name
    import exp10_periodic_ses as exp10
    cfg, _ = resolve_config("exp10_periodic_ses", exp10.SETUP, exp10.GRID, "ses_k1", 0, False, {"every": int(value)})
    assert run_name(cfg) == name and cfg["every"] == int(value)


def test_two_concurrent_workers_train_each_run_exactly_once(tmp_path):
    args = [sys.executable, EXP10, "--smoke", "--configs", "baseline", "ses_k3", "ses_k10", "--seeds", "0", "1",
            "--out-dir", str(tmp_path)]
    procs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    started = [line.split(" / ")[1].split(" on ")[0] for out, _ in outs for line in out.splitlines()
               if line.startswith("== exp10_periodic_ses / ")]
    names = {f"{c}_seed{s}" for c in ("baseline", "ses_k3", "ses_k10") for s in (0, 1)}
    assert sorted(started) == sorted(names)  # every run trained once, by one of the two
    exp = tmp_path / "smoke" / "exp10_periodic_ses"
    assert all((exp / n / "result.json").is_file() and not (exp / n / "claim.json").exists() for n in names)
    summary = json.loads((exp / "summary.json").read_text())
    assert {f"{r['config']}_seed{r['seed']}" for r in summary["runs"]} == names


def test_a_stale_claim_is_taken_over_and_a_live_one_is_respected(tmp_path, monkeypatch, capsys):
    import claims
    run = tmp_path / "r_seed0"
    run.mkdir()
    (run / "claim.json").write_text(json.dumps(dict(host="elsewhere", pid=1, token="x")))
    assert claims.acquire(run) is None  # fresh heartbeat: another worker owns it
    old = time.time() - claims.STALE_S - 5
    os.utime(run / "claim.json", (old, old))
    claim = claims.acquire(run)
    assert claim is not None and claim.owned() and "taking over the stale claim" in capsys.readouterr().out
    claim.release()
    assert not (run / "claim.json").exists()
    import platform
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / "claim.json").write_text(json.dumps(dict(host=platform.node(), pid=int(dead.stdout), token="y")))
    claim = claims.acquire(run)  # a fresh claim of a process of this host that no longer exists
    assert claim is not None and claim.owned()
    claim.release()
