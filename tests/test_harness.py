"""The harness (config, models, training, evaluation, runs, sweep, cli): AMP policy, models and presets, CLI errors, crash-safe resume, failure handling."""
import json
import sys

import pytest
import torch
import torch.nn as nn

from harness import cli
from harness import config
from harness import evaluation
import exp10_periodic_ses as exp10
from harness import models
from harness import runs
from harness import training
from data_utils import DATASETS
from helpers import EXP10, SMOKE_EXP10, copy_out_dir, read_run, run, self_killing


def exp10_in_process(*args):
    """exp10_periodic_ses.py's own grid and setup, in this process: its exit code."""
    return cli.run_experiment(str(EXP10), exp10.SETUP, exp10.GRID, exp10.__doc__, [str(a) for a in args])


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
    from perceiver.lamb import make_lamb
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
                                       (["--seeds", "x"], "--seeds"), (["--devices", "cuda:7"], "--devices"),
                                       (["--forc"], "--forc")])  # no abbreviations: workers must see what was meant
def test_bad_flags_one_line_exit_2(args, flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        exp10_in_process(*args, "--out-dir", tmp_path)
    err = capsys.readouterr().err
    assert e.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in err


def test_missing_data_is_one_clear_line(tmp_path, capsys):
    assert exp10_in_process("--no-download", "--device", "cpu", "--data-dir", tmp_path / "d",
                            "--out-dir", tmp_path / "r") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "error: cifar100 not found" in err and "cifar-100-python.tar.gz" in err


# ----------------------------------------------------------------------------- resume
@pytest.mark.end_to_end
def test_kill_9_then_rerun_equals_uninterrupted_run(tmp_path, capsys):
    args = ["--smoke", "--configs", "ses_k3", "--epochs", "4"]
    full = run([EXP10, *args, "--out-dir", tmp_path / "a"])
    assert full.returncode == 0, full.stderr[-2000:]

    out_b = tmp_path / "b"
    name = "ses_k3+epochs=4_seed0"  # --epochs overrides the smoke setting: part of the run's name
    run_dir = out_b / "smoke" / "exp10_periodic_ses" / name
    killed = run([self_killing(tmp_path, EXP10, epoch=3), *args, "--out-dir", out_b])  # SIGKILL in epoch 3
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (run_dir / "result.json").exists()
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["epoch"] == 2

    resumed = run([EXP10, *args, "--out-dir", out_b])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {name} after epoch 2/4" in resumed.stdout
    assert read_run(run_dir) == read_run(tmp_path / "a" / "smoke" / "exp10_periodic_ses" / name)

    capsys.readouterr()
    assert exp10_in_process(*args, "--out-dir", out_b) == 0
    assert "finished earlier, skipped" in capsys.readouterr().out


@pytest.mark.xdist_group("exp10_smoke")
def test_corrupt_checkpoint_restarts_the_run_with_a_warning(exp10_smoke, tmp_path, capsys):
    out = copy_out_dir(exp10_smoke[0], tmp_path / "out")
    run_dir = out.joinpath(*SMOKE_EXP10, "baseline_seed0")
    (run_dir / "result.json").unlink()
    (run_dir / "checkpoint.pt").write_bytes(b"truncated")
    assert exp10_in_process("--smoke", "--configs", "baseline", "--out-dir", out) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "cannot be read" in err and (run_dir / "result.json").is_file()
    assert (run_dir / "checkpoint.pt.corrupt").is_file()


@pytest.mark.xdist_group("exp10_smoke")
def test_an_override_gets_its_own_folder_and_is_never_mixed(exp10_smoke, tmp_path, capsys):
    out = copy_out_dir(exp10_smoke[0], tmp_path / "out")
    exp = out.joinpath(*SMOKE_EXP10)
    assert exp10_in_process("--smoke", "--configs", "baseline", "--lr", "0.05", "--out-dir", out) == 0
    assert sorted(d.name for d in exp.iterdir() if d.is_dir() and d.name.startswith("baseline")) == [
        "baseline+lr=0.05_seed0", "baseline_seed0"]
    plain = json.loads((exp / "baseline_seed0" / "result.json").read_text())
    changed = json.loads((exp / "baseline+lr=0.05_seed0" / "result.json").read_text())
    assert plain["variant"] == "baseline" and plain["overrides"] == {}
    assert changed["variant"] == "baseline+lr=0.05" and changed["overrides"] == {"lr": 0.05}
    cfg = json.loads((exp / "baseline+lr=0.05_seed0" / "config.json").read_text())["config"]
    assert cfg["lr"] == 0.05 and cfg["config"] == "baseline"
    capsys.readouterr()
    # a value equal to the config's own is no override: same folder, skipped as finished
    assert exp10_in_process("--smoke", "--configs", "baseline", "--lr", "0.1", "--out-dir", out) == 0
    assert "baseline_seed0: finished earlier, skipped" in capsys.readouterr().out


def test_non_finite_loss_stops_that_run_and_the_sweep_goes_on(tmp_path, capsys):
    assert exp10_in_process("--smoke", "--configs", "ses_k1", "baseline", "--epochs", "1", "--lr", "1e30",
                            "--out-dir", tmp_path) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "non-finite loss at epoch 1, step" in err and "SES term" in err
    assert "ses_k1+epochs=1+lr=1e+30_seed0" in err and "baseline+epochs=1+lr=1e+30_seed0" in err


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
    code = cli.run_experiment(str(EXP10), dict(dataset="cifar10", layers="last3"),
                             {"ses": dict(ses=True, every=1)}, "doc",
                             ["--smoke", "--epochs", "1", "--out-dir", str(tmp_path)])
    assert code == 0 and made and made[0].applied_steps == 2  # one epoch of the smoke's 2 steps


# ----------------------------------------------------------------------------- monitoring
def test_tensorboard_logs_every_epoch_with_per_layer_h_and_targets(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    assert exp10_in_process("--smoke", "--configs", "ses_k1", "--layers", "last3", "--tensorboard",
                            "--out-dir", tmp_path) == 0
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
    from harness import tensorboard_log
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import -> ImportError
    board = tensorboard_log.TensorBoard(tmp_path, {"fc": 1.0})
    board.epoch(dict(epoch=1, entropy={"fc": 2.0}))
    board.close()
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "pip install tensorboard" in out and not (tmp_path / "tensorboard").exists()


def test_compile_flag_trains_a_smoke_run_and_is_recorded_not_named(tmp_path):
    p = run([EXP10, "--smoke", "--configs", "ses_k3", "--layers", "last3", "--compile", "aot_eager",
             "--out-dir", tmp_path])  # a process of its own: --compile changes a process-wide dynamo setting
    assert p.returncode == 0, p.stderr[-2000:]
    run_dir = tmp_path / "smoke" / "exp10_periodic_ses" / "ses_k3+layers=last3_seed0"  # --compile is not in the name
    result = json.loads((run_dir / "result.json").read_text())
    assert result["compiled"] == "aot_eager" and result["ses_steps"] == len(range(0, result["total_steps"], 3))
