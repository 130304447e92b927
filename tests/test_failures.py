"""A failure ends one run, never the sweep; a run folder always means one setting; Ctrl-C; resume; --force."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from harness import checkpoints
from harness import cli
import exp10_periodic_ses as exp10
from harness import runs
from harness.config import DEFAULTS
from data_utils import Data, synthetic_dataset
from helpers import EXP10, ROOT, SMOKE_EXP10, copy_out_dir
from harness.registry import make_registry

SETUP = dict(dataset="cifar10", layers="last3")
GRID = {"baseline": dict(ses=False), "ses": dict(ses=True)}


def in_process(tmp_path, *args, setup=SETUP, grid=GRID):
    return cli.run_experiment(str(EXP10), setup, grid, "doc", ["--smoke", "--out-dir", str(tmp_path), *args])


def exp10_in_process(out, *args):
    """exp10_periodic_ses.py's own grid and setup, in this process."""
    return in_process(out, *args, setup=exp10.SETUP, grid=exp10.GRID)


def test_non_finite_activations_end_their_run_with_one_line_and_the_sweep_goes_on(tmp_path, capsys):
    assert exp10_in_process(tmp_path, "--configs", "ses_k1", "baseline", "--lr", "1e5") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "LinAlgError" not in err
    exp = tmp_path / "smoke" / "exp10_periodic_ses"
    for name in ("ses_k1+lr=100000.0_seed0", "baseline+lr=100000.0_seed0"):
        failure = json.loads((exp / name / "failure.json").read_text())
        assert failure["stage"].startswith("epoch") and failure["message"]
        assert sum(name in line and "failed during" in line for line in err.splitlines()) == 1
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
    # smaller chunks, as the out-of-memory hint says: the same run (not part of its name) resumes
    assert in_process(tmp_path, "--attack-batch-size", "4", "--eval-batch-size", "4") == 0
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


def test_a_run_that_fails_its_checks_writes_nothing(tmp_path, capsys):
    assert exp10_in_process(tmp_path, "--configs", "baseline", "--batch-size", "1000") == 1
    err = capsys.readouterr().err
    assert "--batch-size 1000 exceeds the 16 training samples" in err and "Traceback" not in err
    exp = tmp_path / "smoke" / "exp10_periodic_ses"
    assert not [d for d in exp.iterdir() if d.is_dir()]  # no folder to block a later run
    with pytest.raises(SystemExit) as e:
        exp10_in_process(tmp_path, "--layers", "layer4.9")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --layers: unknown layer name 'layer4.9'" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.xdist_group("exp10_smoke")
def test_force_restarts_only_the_selected_runs_and_no_message_suggests_deleting_all(exp10_smoke, tmp_path, capsys):
    out = copy_out_dir(exp10_smoke[0], tmp_path / "out")
    exp = out.joinpath(*SMOKE_EXP10)
    before = {d.name: (d / "result.json").stat().st_mtime_ns for d in exp.iterdir() if d.is_dir()}
    assert exp10_in_process(out, "--configs", "baseline", "--force") == 0
    captured = capsys.readouterr()
    assert "--force" not in captured.out + captured.err and "Traceback" not in captured.err
    assert "baseline_seed0: deleted as asked; it runs again from epoch 1" in captured.out
    after = {d.name: (d / "result.json").stat().st_mtime_ns for d in exp.iterdir() if d.is_dir()}
    assert after.keys() == before.keys() and after["baseline_seed0"] != before["baseline_seed0"]
    assert all(after[n] == before[n] for n in before if n != "baseline_seed0")  # the others untouched


def test_resume_across_precision_and_gpu_count(tmp_path, capsys):
    """A bf16 (no GradScaler state) checkpoint resumes under fp16; an old 2-GPU RNG list resumes on one."""
    tx, ty, vx, vy, _ = synthetic_dataset(10, 32, 64, 16)
    data = Data(tx, ty, vx, vy, dict(num_classes=10, image_size=32, pad=4, mean=(0.5,) * 3, std=(0.25,) * 3))
    cfg = dict(DEFAULTS, dataset="cifar10", layers="last3", batch_size=16, seed=0, epochs=2, amp="bf16",
               experiment="e", config="c")
    reg = make_registry()
    bf16 = runs.build_run(cfg, data, torch.device("cpu"), reg)
    assert not bf16.scaler.is_enabled()
    checkpoints.save_checkpoint(bf16, tmp_path / "checkpoint.pt", 1, [dict(epoch=1)])
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert not ckpt["scaler"]  # GradScaler state only on the fp16 path
    ckpt["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]  # 2-GPU format
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    fp16 = runs.build_run(dict(cfg, amp="fp16"), data, torch.device("cpu"), reg)
    assert fp16.scaler.is_enabled()
    checkpoints.save_checkpoint(fp16, tmp_path / "fp16.pt", 1, [dict(epoch=1)])
    assert torch.load(tmp_path / "fp16.pt", weights_only=False)["scaler"]["scale"] > 0
    history, epoch = checkpoints.resume(fp16, tmp_path)
    assert epoch == 1 and history == [dict(epoch=1)]
    assert "the loss scale starts afresh" in capsys.readouterr().out
    assert checkpoints.rng_state(torch.device("cpu"))["cuda"] is None  # only the device in use is saved


def test_ctrl_c_is_one_line_exit_130_and_keeps_the_last_checkpoint(tmp_path):
    """SIGINT from outside once the first epoch's checkpoint is written; the run is too long to end first."""
    run_dir = tmp_path / "smoke" / "exp10_periodic_ses" / "ses_k3+epochs=1000_seed0"
    proc = subprocess.Popen([sys.executable, str(EXP10), "--smoke", "--configs", "ses_k3", "--epochs", "1000",
                             "--out-dir", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (
            (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().count("\n") >= 1):
        time.sleep(0.05)  # polls for the event: the first epoch's line
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "interrupted; rerun the same command to resume"
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["epoch"] >= 1
    assert not (run_dir / "result.json").exists()


@pytest.mark.parametrize("value,name", [("3", "ses_k1+every=3_seed0"), ("1", "ses_k1_seed0")])
def test_run_names_carry_the_overrides(value, name):
    from harness.config import resolve_config, run_name
    import exp10_periodic_ses as exp10
    cfg, _ = resolve_config("exp10_periodic_ses", exp10.SETUP, exp10.GRID, "ses_k1", 0, False, {"every": int(value)})
    assert run_name(cfg) == name and cfg["every"] == int(value)


@pytest.mark.xdist_group("exp10_smoke")
def test_an_unreadable_config_ends_that_run_with_one_line_and_failed_runs_are_retried_last(exp10_smoke, tmp_path,
                                                                                        capsys):
    out = copy_out_dir(exp10_smoke[0], tmp_path / "out")
    exp = out.joinpath(*SMOKE_EXP10)
    (exp / "ses_k1_seed0" / "config.json").write_text('{"config": {"lr": 0.1')  # a copy cut short
    (exp / "ses_k1_seed0" / "result.json").unlink()
    (exp / "baseline_seed0" / "result.json").unlink()  # baseline failed in an earlier command
    (exp / "baseline_seed0" / "failure.json").write_text(json.dumps(dict(stage="epoch 1", message="boom")))
    os.utime(exp / "baseline_seed0" / "failure.json", (time.time() - 3600,) * 2)  # by an earlier command
    assert exp10_in_process(out, "--configs", "baseline", "ses_k1", "ses_k3") == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert f"error: ses_k1_seed0: {exp / 'ses_k1_seed0' / 'config.json'} cannot be read" in captured.err
    assert "note: 1 run(s) that failed earlier are retried after the others: baseline_seed0" in captured.out
    order = [line.split(":")[0] for line in captured.out.splitlines()
             if line.startswith(("baseline_seed0", "ses_k3_seed0")) or line.startswith("== ")]
    assert order.index("ses_k3_seed0") < next(i for i, line in enumerate(order) if "baseline_seed0" in line)
    assert (exp / "baseline_seed0" / "result.json").is_file()  # retried, and done


def test_with_force_every_hint_says_rerun_without_it(tmp_path, monkeypatch, capsys):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(runs, "final_metrics", oom)
    assert in_process(tmp_path, "--configs", "baseline", "--force") == 1
    err = capsys.readouterr().err
    assert "rerun the command without --force to retry" in err and "rerun the same command" not in err


def test_a_run_another_worker_failed_during_this_command_is_not_tried_again(tmp_path):
    from harness import sweep
    run_dir = tmp_path / "baseline_seed0"
    run_dir.mkdir()
    (run_dir / "failure.json").write_text("{}")
    claim, verdict, line = sweep.claim_run(run_dir, since=time.time() - 60)  # this command began before it
    assert claim is None and verdict == "skip" and "failed on another worker during this command" in line
    claim, verdict, _ = sweep.claim_run(run_dir, since=time.time() + 60)  # an earlier command's: retried
    assert verdict == "go"
    claim.release()


def test_a_worker_whose_claim_is_taken_over_stops_the_run_and_writes_nothing_more(tmp_path, capsys):
    from plumbing import leases

    def taken_over(model, data, run_dir, epoch, cfg):  # what another worker's takeover leaves in the folder
        gen = max(leases.generations(run_dir, "claim"))
        leases.take(run_dir, "claim", gen, leases.read(run_dir / f"claim.{gen}.json"), "stale", "training")
    code = cli.run_experiment(str(EXP10), SETUP, {"baseline": dict(ses=False)}, "doc",
                              ["--smoke", "--out-dir", str(tmp_path)], epoch_callbacks=[taken_over])
    run_dir = tmp_path.joinpath(*SMOKE_EXP10, "baseline_seed0")
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err
    assert "baseline_seed0: the claim of baseline_seed0 was taken over by" in err and "this worker stops the run" in err
    assert not any((run_dir / f).exists() for f in ("checkpoint.pt", "result.json", "failure.json"))
