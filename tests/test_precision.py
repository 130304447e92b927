"""The GPU-only paths exercised on the CPU: --amp bf16/fp16, float32 FGSM in chunks, spectral norm under
autocast, --preflight writing nothing, --synthetic results kept apart, and the no-GPU guard."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from harness import cli
from harness import evaluation
from harness import models
from harness.config import DEFAULTS
from data_utils import DATASETS
from harness.training import amp_policy

ROOT = Path(__file__).resolve().parents[1]
EXP10 = str(ROOT / "exp10_periodic_ses.py")


def script(*args, timeout=600, env=None):
    return subprocess.run([sys.executable, EXP10, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


# CPU fp16 autocast is emulated and, on some CPUs, a hundred times slower than bf16: the precision
# path needs a step or two, not a real image size, to show it runs.
TINY_SETUP = dict(dataset="cifar100", model="resnet18", layers="all",
                  smoke=dict(batch_size=2, eval_batch_size=4, attack_batch_size=2, n_train=4, n_test=4))
TINY_CIFAR = dict(DATASETS["cifar100"], image_size=8)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_smoke_grid_runs_under_low_precision_autocast(amp, tmp_path):
    import exp10_periodic_ses as exp10
    code = cli.run_experiment(EXP10, TINY_SETUP, {c: exp10.GRID[c] for c in ("baseline", "ses_k1")}, "doc",
                              ["--smoke", "--amp", amp, "--out-dir", str(tmp_path)], datasets={"cifar100": TINY_CIFAR})
    assert code == 0
    exp = tmp_path / "smoke" / "exp10_periodic_ses"
    for config in ("baseline", "ses_k1"):
        run = exp / f"{config}+amp={amp}_seed0"
        result = json.loads((run / "result.json").read_text())
        assert result["amp"] == amp and json.loads((run / "config.json").read_text())["amp"] == amp
        assert all(0 <= v <= 1 for v in result["robustness"].values())
        assert result["ses_steps"] == (4 if config == "ses_k1" else 0)  # every step of 2 epochs x 2 steps
        assert not (run / "checkpoint.pt").exists()  # a finished smoke run drops its checkpoint


def test_amp_flag_forces_the_path():
    assert amp_policy("cpu", "fp16").use_scaler and amp_policy("cpu", "bf16").dtype == torch.bfloat16
    assert amp_policy("cpu", "fp32").dtype is None
    with pytest.raises(ValueError, match="unknown amp mode"):
        amp_policy("cpu", "fp8")


def confident() -> nn.Module:
    """A linear model whose logits on x = 0.5 are +-10: p(wrong) = e^-20 ~ 2e-9, below fp16's smallest
    subnormal (6e-8), so a gradient taken under fp16 autocast is exactly 0 and FGSM would not move x."""
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[5.0] * 4, [-5.0] * 4]))
    return nn.Sequential(nn.Flatten(), lin)


def test_fgsm_input_gradient_is_float32_and_not_zeroed_under_fp16():
    x = torch.full((3, 1, 2, 2), 0.5)
    y = torch.zeros(3, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.float16):
        grad = evaluation.input_gradient(confident(), x, y)
        adv = evaluation.fgsm(1 / 255)(confident(), x, y, None)
    assert grad.dtype == torch.float32 and (grad != 0).all()
    assert ((adv - x).abs() - 1 / 255).abs().max() < 1e-6  # every pixel moved by eps


NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")  # torch >= 2.9; the legacy flags before
SWITCHES = ((torch.backends.cuda.matmul, "fp32_precision"), (torch.backends.cudnn.conv, "fp32_precision")) if NEW_API \
    else ((torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"))
TF32, IEEE = ("tf32", "ieee") if NEW_API else (True, False)


def tf32_flags():
    return tuple(getattr(obj, attr) for obj, attr in SWITCHES)


class RecordsTF32(torch.autograd.Function):
    """Identity that notes the TF32 switches when its forward and its backward run."""
    seen = []

    @staticmethod
    def forward(ctx, x):
        RecordsTF32.seen.append(("forward", tf32_flags()))
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        RecordsTF32.seen.append(("backward", tf32_flags()))
        return grad


def test_fgsm_runs_in_ieee_float32_with_tf32_off_and_puts_the_switches_back(monkeypatch):
    """On Ampere and newer cuBLAS and cuDNN default to TF32 for float32; the attack turns it off for its
    forward and backward (so an L40S computes the T4's attack) and restores the user's switches after."""
    for obj, attr in SWITCHES:
        monkeypatch.setattr(obj, attr, TF32)
    RecordsTF32.seen.clear()
    model = confident()
    spy = nn.Sequential(nn.Identity(), model)
    spy[0].forward = RecordsTF32.apply
    x, y = torch.full((3, 1, 2, 2), 0.5), torch.zeros(3, dtype=torch.long)
    evaluation.fgsm(1 / 255)(spy, x, y, None)
    assert RecordsTF32.seen == [("forward", (IEEE, IEEE)), ("backward", (IEEE, IEEE))]
    assert tf32_flags() == (TF32, TF32)


def test_fgsm_runs_in_chunks_of_attack_batch_size():
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3 * 4 * 4, 5)

        def forward(self, x):
            seen.append((len(x), torch.is_grad_enabled()))
            return self.lin(x.flatten(1))

    x = torch.randint(0, 256, (12, 3, 4, 4), dtype=torch.uint8)
    y = torch.randint(0, 5, (12,))
    cfg = dict(DEFAULTS, eval_batch_size=8, attack_batch_size=5, noise_sigmas=[0.1], fgsm_eps=[1 / 255])
    evaluation.robustness_suite(Spy(), x, y, amp_policy("cpu"), cfg)
    attack = [n for n, grad in seen if grad]
    assert attack == [5, 5, 2]                                   # the backward graphs: attack chunks
    assert [n for n, grad in seen if not grad] == [8, 4, 5, 5, 2]  # noise at eval size, FGSM's eval passes


def test_spectral_norm_power_iteration_runs_without_autocast(monkeypatch):
    states = []
    real_mv = torch.mv

    def spy_mv(*a, **k):
        states.append(torch.is_autocast_enabled("cpu"))
        return real_mv(*a, **k)

    model = models.build_resnet(dict(DEFAULTS, spectral_norm=True), DATASETS["cifar10"])
    monkeypatch.setattr(torch, "mv", spy_mv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(2, 3, 32, 32))
    assert states and not any(states) and out.shape == (2, 10)
    sn = model.fc
    assert sn.weight.dtype == torch.float32 and sn.weight_u.dtype == torch.float32


def test_preflight_prints_the_table_and_writes_no_run_folder(tmp_path):
    p = script("--smoke", "--preflight", "--configs", "baseline", "ses_k3", "--out-dir", tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "step ms" in p.stdout and "SES +%" in p.stdout and "projected sweep" in p.stdout
    lines = {line.split()[0]: line for line in p.stdout.splitlines() if line.split()[:1] in (["baseline"], ["ses_k3"])}
    assert lines.keys() == {"baseline", "ses_k3"} and lines["baseline"].split()[4] == "-"
    float(lines["ses_k3"].split()[4])  # the overhead against the twin measured in the same process
    assert not tmp_path.exists() or not any(tmp_path.rglob("*.json"))


def test_synthetic_data_has_the_real_shapes_and_its_runs_stay_apart(tmp_path):
    small = dict(DATASETS["cifar10"], sizes=(48, 16))  # the real sizes would take hours on a CPU
    code = cli.run_experiment(EXP10, dict(dataset="cifar10", layers="last3"), {"baseline": dict(ses=False)}, "doc",
                              ["--synthetic", "--device", "cpu", "--epochs", "1", "--batch-size", "16",
                               "--out-dir", str(tmp_path)], datasets={"cifar10": small})
    assert code == 0
    run = tmp_path / "synthetic" / "exp10_periodic_ses" / "baseline+batch_size=16+epochs=1_seed0"
    assert (run / "result.json").is_file() and not (tmp_path / "exp10_periodic_ses").exists()
    assert DATASETS["cifar100"]["sizes"] == (50_000, 10_000) and DATASETS["tinyimagenet"]["sizes"] == (100_000, 10_000)


def test_no_gpu_means_no_silent_cpu_training(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as e:
        cli.run_experiment(EXP10, {}, {"baseline": dict(ses=False)}, "doc", ["--configs", "baseline", "--out-dir",
                                                                            str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no GPU on this machine" in err and "--smoke" in err and "--device cpu" in err
    assert len(err.strip().splitlines()) == 1 and not any(tmp_path.iterdir())


def test_a_config_that_fails_in_the_preflight_is_one_line_the_others_are_measured_and_it_exits_1(tmp_path, capsys):
    grid = {"baseline": dict(ses=False), "blowup": dict(ses=False, lr=1e30)}  # NaN weights after one SGD step
    code = cli.run_experiment(EXP10, dict(dataset="cifar10", layers="last3"), grid, "doc",
                              ["--smoke", "--preflight", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1, out
    lines = out.splitlines()
    failed = [line for line in lines if line.startswith("  blowup:")]
    assert len(failed) == 1 and "NonFiniteLoss: non-finite loss at epoch" in failed[0]
    header = next(i for i, line in enumerate(lines) if line.startswith("config"))
    table = [line.split()[0] for line in lines[header + 1:]]  # the table rows, then the sweep line
    assert table == ["baseline", "projected"] and "for 1 measured run(s)" in out and "not measured: blowup" in out
    assert not tmp_path.exists() or not any(tmp_path.rglob("*.json"))


def test_a_samples_noise_and_so_rob_do_not_depend_on_the_evaluation_chunk_size():
    """--eval-batch-size only changes how the evaluation is chunked (a run may resume with another one
    after running out of memory): each sample's noise is fixed by its index, so accuracy and loss under
    noise are the same for every chunk size."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    x = torch.rand(600, 3, 4, 4)
    y = torch.randint(0, 5, (600,))
    noise = evaluation.gaussian_noise(0.3)
    results = {bs: evaluation.evaluate(model, x, y, amp_policy("cpu"), bs, noise) for bs in (7, 256, 1000)}
    (acc, loss), *others = results.values()
    assert all(a == acc and abs(l_ - loss) < 1e-6 for a, l_ in others), results
    clean = evaluation.evaluate(model, x, y, amp_policy("cpu"), 1000)
    assert clean != (acc, loss)  # the noise is there
    block = evaluation.fixed_noise(300, 10, (3, 4, 4), "cpu")  # samples 300..309, across no block edge
    assert torch.equal(block, evaluation.fixed_noise(0, 600, (3, 4, 4), "cpu")[300:310])
