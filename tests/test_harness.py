"""The harness (config, models, training, evaluation, runs, sweep, cli): AMP policy, models and presets, CLI errors, crash-safe resume, failure handling."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import cli
import config
import evaluation
import models
import runs
import training
from data_utils import DATASETS

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"epoch_time_s", "images_per_s", "overhead", "peak_mem_bytes"}


def run_script(script, *args, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


# ----------------------------------------------------------------------------- AMP
@pytest.mark.parametrize("cap,dtype,scaler", [((7, 5), torch.float16, True), ((8, 9), torch.bfloat16, False),
                                              ((8, 0), torch.bfloat16, False)])
def test_amp_policy_by_capability(monkeypatch, cap, dtype, scaler):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # a T4 says True too
    amp = training.amp_policy("cuda")
    assert amp.dtype == dtype and amp.use_scaler == scaler


def test_amp_policy_cpu_is_fp32():
    amp = training.amp_policy("cpu")
    assert amp.dtype is None and not amp.use_scaler and amp.name == "fp32"
    assert not amp.scaler().is_enabled()


# ----------------------------------------------------------------------------- models, presets
@pytest.mark.parametrize("arch,preset,dims", [("resnet18", "all", [64, 64, 128, 128, 256, 256, 512, 512, 512]),
                                              ("resnet18", "last3", [512, 512, 512]),
                                              ("resnet50", "layer4+avgpool", [2048] * 4)])
def test_cifar_stem_and_hook_presets(arch, preset, dims):
    cfg = dict(config.DEFAULTS, model=arch, layers=preset)
    model = models.build_resnet(cfg, DATASETS["cifar100"]).eval()
    conv = model.conv1[1]
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    layers = models.resolve_layers(cfg, model)
    with torch.no_grad():
        ent, d = evaluation.measure_entropy(model, layers, torch.rand(4, 3, 32, 32), training.amp_policy("cpu"))
    assert list(d.values()) == dims and list(ent) == layers
    assert all(0 <= h <= 1.1 for h in ent.values())  # rank <= n - 1 = 3: H <= log 3


def test_layers_by_name_and_unknown_layer():
    cfg = dict(config.DEFAULTS, layers="layer3.1,avgpool")
    model = models.build_resnet(cfg, DATASETS["cifar100"])
    assert models.resolve_layers(cfg, model) == ["layer3.1", "avgpool"]
    with pytest.raises(ValueError, match="layer9"):
        models.resolve_layers(dict(cfg, layers="layer9.0"), model)


def test_spectral_norm_variant_wraps_every_conv_and_linear():
    model = models.build_resnet(dict(config.DEFAULTS, spectral_norm=True), DATASETS["cifar10"])
    mods = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert mods and all(hasattr(m, "weight_orig") for m in mods)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name,check", [
    ("multistep", lambda lrs: lrs[:3] == [0.1] * 3 and lrs[3] == pytest.approx(0.01)),
    ("cosine", lambda lrs: lrs[0] == 0.1 and lrs[-1] < 0.01 and all(a >= b for a, b in zip(lrs, lrs[1:]))),
    ("step", lambda lrs: lrs[0] == 0.1 and min(lrs) < 0.1)])
def test_schedulers(name, check):
    cfg = dict(config.DEFAULTS, scheduler=name, epochs=6, milestones=[30, 45], schedule_epochs=60, step_size=20)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = training.build_scheduler(cfg, opt)
    lrs = []
    for _ in range(cfg["epochs"]):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert check(lrs), lrs


@pytest.mark.parametrize("name", ["sgd", "adamw", "lamb"])
def test_optimizers_build_and_step(name):
    model = nn.Linear(3, 2)
    from lamb import make_lamb
    opt = training.build_optimizer(dict(config.DEFAULTS, optimizer=name, lr=0.01), model,
                                   {**training.OPTIMIZERS, "lamb": make_lamb})
    before = model.weight.detach().clone()
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert not torch.equal(before, model.weight)


def test_milestones_scale_with_epochs():
    assert training.scaled_milestones(dict(config.DEFAULTS)) == [25, 40, 52]
    assert training.scaled_milestones(dict(config.DEFAULTS, epochs=30)) == [12, 20, 26]


# ----------------------------------------------------------------------------- CLI errors
@pytest.mark.parametrize("args,flag", [(["--beta", "1.5"], "--beta"), (["--lam", "-1"], "--lam"),
                                       (["--every", "0"], "--every"), (["--configs", "nope"], "--configs"),
                                       (["--seeds", "x"], "--seeds")])
def test_bad_flags_one_line_exit_2(args, flag, tmp_path):
    p = run_script("exp10_periodic_ses.py", *args, "--out-dir", str(tmp_path))
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in p.stderr


def test_missing_data_is_one_clear_line(tmp_path):
    p = run_script("exp10_periodic_ses.py", "--no-download", "--device", "cpu", "--data-dir", str(tmp_path / "d"),
                   "--out-dir", str(tmp_path / "r"))
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "error: cifar100 not found" in p.stderr and "cifar-100-python.tar.gz" in p.stderr


# ----------------------------------------------------------------------------- resume
def strip_timing(obj):
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def read_run(run_dir: Path):
    result = json.loads((run_dir / "result.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return strip_timing(result), strip_timing(metrics)


def test_kill_9_then_rerun_equals_uninterrupted_run(tmp_path):
    args = ["--smoke", "--configs", "ses_k3", "--epochs", "4"]
    full = run_script("exp10_periodic_ses.py", *args, "--out-dir", str(tmp_path / "a"))
    assert full.returncode == 0, full.stderr[-2000:]

    out_b = tmp_path / "b"
    name = "ses_k3+epochs=4_seed0"  # --epochs overrides the smoke setting: part of the run's name
    run_dir = out_b / "smoke" / "exp10_periodic_ses" / name
    proc = subprocess.Popen([sys.executable, str(ROOT / "exp10_periodic_ses.py"), *args, "--out-dir", str(out_b)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "result.json").exists(), "the run finished before it could be killed"
    assert (run_dir / "checkpoint.pt").is_file()

    resumed = run_script("exp10_periodic_ses.py", *args, "--out-dir", str(out_b))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {name} after epoch" in resumed.stdout
    assert read_run(run_dir) == read_run(tmp_path / "a" / "smoke" / "exp10_periodic_ses" / name)

    again = run_script("exp10_periodic_ses.py", *args, "--out-dir", str(out_b))
    assert "finished earlier, skipped" in again.stdout


def test_corrupt_checkpoint_restarts_the_run_with_a_warning(tmp_path):
    args = ["--smoke", "--configs", "baseline", "--epochs", "1", "--out-dir", str(tmp_path)]
    run_dir = tmp_path / "smoke" / "exp10_periodic_ses" / "baseline+epochs=1_seed0"
    assert run_script("exp10_periodic_ses.py", *args).returncode == 0
    (run_dir / "result.json").unlink()
    (run_dir / "checkpoint.pt").write_bytes(b"truncated")
    p = run_script("exp10_periodic_ses.py", *args)
    assert p.returncode == 0 and "Traceback" not in p.stderr
    assert "cannot be read" in p.stderr and (run_dir / "result.json").is_file()
    assert (run_dir / "checkpoint.pt.corrupt").is_file()


def test_an_override_gets_its_own_folder_and_is_never_mixed(tmp_path):
    args = ["--smoke", "--configs", "baseline", "--out-dir", str(tmp_path)]
    exp = tmp_path / "smoke" / "exp10_periodic_ses"
    assert run_script("exp10_periodic_ses.py", *args).returncode == 0
    p = run_script("exp10_periodic_ses.py", *args, "--lr", "0.05")
    assert p.returncode == 0, p.stderr[-2000:]
    assert sorted(d.name for d in exp.iterdir() if d.is_dir()) == ["baseline+lr=0.05_seed0", "baseline_seed0"]
    plain = json.loads((exp / "baseline_seed0" / "result.json").read_text())
    changed = json.loads((exp / "baseline+lr=0.05_seed0" / "result.json").read_text())
    assert plain["variant"] == "baseline" and plain["overrides"] == {}
    assert changed["variant"] == "baseline+lr=0.05" and changed["overrides"] == {"lr": 0.05}
    cfg = json.loads((exp / "baseline+lr=0.05_seed0" / "config.json").read_text())["config"]
    assert cfg["lr"] == 0.05 and cfg["config"] == "baseline"
    # a value equal to the config's own is no override: same folder, skipped as finished
    again = run_script("exp10_periodic_ses.py", *args, "--lr", "0.1")
    assert again.returncode == 0 and "baseline_seed0: finished earlier, skipped" in again.stdout


def test_non_finite_loss_stops_that_run_and_the_sweep_goes_on(tmp_path):
    p = run_script("exp10_periodic_ses.py", "--smoke", "--configs", "ses_k1", "baseline", "--epochs", "1",
                   "--lr", "1e30", "--out-dir", str(tmp_path))
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "non-finite loss at epoch 1, step" in p.stderr and "SES term" in p.stderr
    assert "ses_k1+epochs=1+lr=1e+30_seed0" in p.stderr and "baseline+epochs=1+lr=1e+30_seed0" in p.stderr


# ----------------------------------------------------------------------------- eval never collects
def test_evaluation_runs_with_the_ses_collector_disabled(monkeypatch, tmp_path):
    made = []

    class SpySES(runs.SES):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    real_eval = evaluation.evaluate

    def checked_eval(model, *a, **k):
        assert made and not any(s.collector.enabled for s in made)
        out = real_eval(model, *a, **k)
        assert not any(s.collector.activations for s in made)
        return out

    monkeypatch.setattr(runs, "SES", SpySES)
    monkeypatch.setattr(runs, "evaluate", checked_eval)
    monkeypatch.setattr(evaluation, "evaluate", checked_eval)
    code = cli.run_experiment(str(ROOT / "exp10_periodic_ses.py"), dict(dataset="cifar10", layers="last3"),
                             {"ses": dict(ses=True, every=1)}, "doc",
                             ["--smoke", "--epochs", "1", "--out-dir", str(tmp_path)])
    assert code == 0 and made and made[0].applied_steps == 3


# ----------------------------------------------------------------------------- monitoring
def test_tensorboard_logs_every_epoch_with_per_layer_h_and_targets(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    p = run_script("exp10_periodic_ses.py", "--smoke", "--configs", "ses_k1", "--layers", "last3", "--tensorboard",
                   "--out-dir", str(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]
    run_dir = next((tmp_path / "smoke" / "exp10_periodic_ses").glob("ses_k1*_seed0"))
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    result = json.loads((run_dir / "result.json").read_text())
    for layer in metrics[0]["entropy"]:
        assert {f"entropy/{layer}/probe", f"entropy/{layer}/penalised", f"entropy/{layer}/target"} <= tags
        logged = [e.value for e in events.Scalars(f"entropy/{layer}/penalised")]
        assert logged == pytest.approx([m["ses_entropy"][layer] for m in metrics])  # the same numbers as the file
        assert events.Scalars(f"entropy/{layer}/target")[0].value == pytest.approx(result["entropy_target"][layer])
    assert {"loss/train", "acc/test", "lr", "images_per_s"} <= tags
    assert [e.step for e in events.Scalars("acc/test")] == [1, 2]


def test_tensorboard_missing_is_one_line_not_a_failure(tmp_path, monkeypatch, capsys):
    import tensorboard_log
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import -> ImportError
    board = tensorboard_log.TensorBoard(tmp_path, {"fc": 1.0})
    board.epoch(dict(epoch=1, entropy={"fc": 2.0}))
    board.close()
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "pip install tensorboard" in out and not (tmp_path / "tensorboard").exists()


def test_compile_flag_trains_a_smoke_run_and_is_recorded_not_named(tmp_path):
    p = run_script("exp10_periodic_ses.py", "--smoke", "--configs", "ses_k3", "--layers", "last3", "--compile",
                   "aot_eager", "--out-dir", str(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]
    run_dir = tmp_path / "smoke" / "exp10_periodic_ses" / "ses_k3+layers=last3_seed0"  # --compile is not in the name
    result = json.loads((run_dir / "result.json").read_text())
    assert result["compiled"] == "aot_eager" and result["ses_steps"] == len(range(0, result["total_steps"], 3))
