"""Every script's GPU path, taken on a CPU: under fake_cuda.PretendGPUs (CUDA's bookkeeping for an
L40S or a T4, torch's own argument checks kept) each command a user runs on a GPU -- the plain
command, --device cuda and cuda:1, --preflight, --synthetic, --devices all, a torchrun rank -- gets
as far as the first real CUDA work, and torch's own error for a machine without a driver is the
first thing that stops it. Not a GPU test: the guard for every line that only a GPU takes before it
does any work. Per card, the precision, exp11's fit check and the solver route's availability."""
import importlib
import os
import re
import subprocess
import sys

import pytest
import torch

from fake_cuda import CARDS as CARD_FACTS, NO_DRIVER, PRETEND_ENV, PretendGPUs
from helpers import ROOT
from layouts import write_cifar10, write_cifar100, write_tiny_folder

SCRIPTS = ["exp10_periodic_ses", "exp11_resnet50_tinyimagenet", "exp12_mixup_cutmix_cifar100", "exp13_perceiver"]
CARDS = ["l40s", "t4"]
CARDS_NAMES = {card: facts["name"] for card, facts in CARD_FACTS.items()}
NCCL_NEEDS_A_GPU = "ProcessGroupNCCL is only supported with GPUs"  # torch's own, at NCCL's first GPU work


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """CIFAR-10, CIFAR-100 and Tiny-ImageNet in their published layouts, a few images each."""
    root = tmp_path_factory.mktemp("data")
    write_cifar100(root)
    write_cifar10(root)
    write_tiny_folder(root)
    return root


def first_error(text: str) -> str:
    """The first line that reports an error (what stopped the command first)."""
    return next((line for line in text.splitlines() if re.search(r"error", line, re.IGNORECASE)), "")


def run_in_process(script: str, argv: list, capsys) -> tuple[int, str]:
    code = importlib.import_module(script).main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out + err


@pytest.mark.parametrize("card", CARDS)
@pytest.mark.parametrize("script", SCRIPTS)
def test_the_plain_command_and_the_preflight_reach_the_gpu(script, card, data_dir, tmp_path, monkeypatch, capsys):
    gpus = PretendGPUs(card).install(monkeypatch.setattr)
    for extra in ([], ["--preflight"]):
        code, text = run_in_process(script, ["--data-dir", data_dir, "--out-dir", tmp_path, *extra], capsys)
        assert code == 1 and NO_DRIVER in first_error(text), text[-3000:]
        assert gpus.set_calls and set(gpus.set_calls) == {0}  # "cuda" became the current device, cuda:0
        said = text.split(NO_DRIVER)[0]
        assert f"on cuda:0 ({CARDS_NAMES[card]}, " in said or f"device cuda:0 ({CARDS_NAMES[card]}, " in said
        assert "SES solver route: float32 (" in said  # decided before any run, no record here
        if extra:  # nothing measured (every config stopped at the GPU): no memory verdict
            assert "DOES NOT FIT" not in text and "FITS in" not in text
            assert "no config measured" in text or "ModelNet40" in text.splitlines()[-1]  # exp13: no such data here
        fits = "does not fit" not in text
        assert fits == (script != "exp11_resnet50_tinyimagenet" or card == "l40s"), text[-2000:]
        if not fits:  # exp11 at batch 256 on a T4: said before anything is on the GPU, with what fits
            said = text.split(NO_DRIVER)[0]
            named = "baseline:" if extra else "baseline, ses_k1:"  # the preflight goes config by config
            assert said.count("does not fit") == 1 and f"warning: {named} needs about" in said  # one line
            assert "torchrun --standalone --nproc_per_node 2 exp11_resnet50_tinyimagenet.py" in said
            assert "--batch-size 128" in said
        gpus.set_calls.clear()
    assert not (tmp_path / "exp11_resnet50_tinyimagenet" / "baseline_seed0" / "config.json").exists()


def test_the_fit_check_names_only_the_runs_still_to_train(data_dir, tmp_path, monkeypatch, capsys):
    """exp11 on a T4 with its baseline finished: the warning names ses_k1 alone (a rerun that only
    skips finished runs says nothing)."""
    PretendGPUs("t4").install(monkeypatch.setattr)
    done = tmp_path / "exp11_resnet50_tinyimagenet" / "baseline_seed0"
    done.mkdir(parents=True)
    (done / "result.json").write_text("{}")  # finished (the sweep skips it), though its result is damaged
    code, text = run_in_process("exp11_resnet50_tinyimagenet", ["--data-dir", data_dir, "--out-dir", tmp_path], capsys)
    assert code == 1 and NO_DRIVER in first_error(text) and "Traceback" not in text, text[-3000:]
    assert "baseline_seed0/result.json cannot be read; baseline_seed0 is listed as unfinished" in text
    assert "warning: ses_k1: needs about" in text and text.count("does not fit") == 1
    assert "baseline_seed0: finished earlier, skipped" in text


@pytest.mark.parametrize("card", CARDS)
def test_device_flags_and_synthetic_data_reach_the_gpu_they_name(card, data_dir, tmp_path, monkeypatch, capsys):
    gpus = PretendGPUs(card, count=2).install(monkeypatch.setattr)
    base = ["--data-dir", data_dir, "--out-dir", tmp_path, "--configs", "baseline"]
    for extra, index in ((["--device", "cuda"], 0), (["--device", "cuda:1"], 1), (["--synthetic"], 0),
                         (["--device", "cuda:1", "--synthetic", "--preflight"], 1)):
        gpus.set_calls.clear()
        gpus.current, gpus.initialized = 0, False  # a fresh process
        code, text = run_in_process("exp12_mixup_cutmix_cifar100", base + extra, capsys)
        assert code == 1 and NO_DRIVER in first_error(text), (extra, text[-2000:])
        assert set(gpus.set_calls) == {index}, extra
    with pytest.raises(SystemExit) as stop:  # a GPU this machine does not have: one line, exit 2
        run_in_process("exp12_mixup_cutmix_cifar100", base + ["--device", "cuda:2"], capsys)
    assert stop.value.code == 2 and "this machine has 2 GPU(s)" in capsys.readouterr().err


def child_env(card: str, count: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests" / "pretend_gpu"), str(ROOT)])
    env[PRETEND_ENV] = f"{card}:{count}"
    return env


@pytest.mark.parametrize("card", CARDS)
@pytest.mark.parametrize("script", SCRIPTS)
def test_devices_all_starts_one_worker_per_pretend_gpu_and_each_reaches_its_gpu(script, card, data_dir, tmp_path):
    """One SES config per script (the whole grid's plain command is the in-process test above)."""
    ses_config = {"exp12_mixup_cutmix_cifar100": "mixup_ses", "exp13_perceiver": "cifar10_fourier_ses"}.get(script, "ses_k1")
    p = subprocess.run([sys.executable, ROOT / f"{script}.py", "--devices", "all", "--configs", ses_config,
                        "--data-dir", data_dir, "--out-dir", tmp_path], cwd=tmp_path, env=child_env(card, 2),
                       capture_output=True, text=True, timeout=300)
    assert "2 workers on cuda:0, cuda:1" in p.stdout, p.stderr[-3000:]
    assert p.returncode == 1 and NO_DRIVER in first_error(p.stderr), p.stderr[-3000:]
    assert p.stderr.count(NO_DRIVER) >= 2  # each worker reached its own GPU
    assert "exited with code 1" in p.stderr and "Expected a torch.device" not in p.stderr
    for physical in (0, 1):  # each worker names its GPU, and which of the machine's it is
        assert f"device cuda:0 ({CARDS_NAMES[card]}, " in p.stdout and f"CUDA_VISIBLE_DEVICES={physical})" in p.stdout
    if script == "exp11_resnet50_tinyimagenet" and card == "t4":  # each worker trains a whole run on its T4
        assert p.stdout.count("it does not fit") == 2


def test_a_torchrun_rank_takes_its_local_gpu_and_stops_at_nccl(data_dir, tmp_path):
    """Two ranks as torchrun starts them: each sets cuda:LOCAL_RANK and the first real GPU work is
    the NCCL process group, which needs a GPU (one line each, no traceback)."""
    port = 29_400 + os.getpid() % 500
    procs = []
    for rank in (0, 1):
        env = dict(child_env("t4", 2), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), SES_DIST_TIMEOUT_S="60")
        procs.append(subprocess.Popen([sys.executable, ROOT / "exp11_resnet50_tinyimagenet.py", "--data-dir", data_dir,
                                       "--out-dir", tmp_path], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for rank, p in enumerate(procs):
        out, err = p.communicate(timeout=120)
        assert p.returncode == 1 and NCCL_NEEDS_A_GPU in first_error(err), err[-3000:]
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert f"cannot join torchrun's process group on cuda:{rank}:" in err  # each rank on its own GPU


@pytest.mark.parametrize("card", CARDS)
def test_precision_follows_the_compute_capability_not_is_bf16_supported(card, monkeypatch):
    from harness.training import amp_policy
    PretendGPUs(card).install(monkeypatch.setattr)
    assert torch.cuda.is_bf16_supported()  # a T4 says so too (it counts emulation)
    amp = amp_policy(torch.device("cuda:0"))
    assert (amp.name, amp.use_scaler) == (("bf16", False) if card == "l40s" else ("fp16", True))
    assert amp_policy(torch.device("cuda:0"), "fp16").use_scaler  # --amp fp16: the T4's path on any card


@pytest.mark.parametrize("card", CARDS)
def test_the_batched_solver_routes_are_checked_on_the_device_itself(card, monkeypatch):
    """On a pretend card the batched cuSOLVER routes cannot be used: the availability check tries the
    real library on the device (and meets the missing driver) instead of trusting the bookkeeping;
    torch's own routes need no check."""
    from ses_solvers import cusolver_batched, routes
    PretendGPUs(card).install(monkeypatch.setattr)
    monkeypatch.setattr(cusolver_batched, "_probed", {})
    monkeypatch.setattr(cusolver_batched, "_lib", None)
    monkeypatch.setattr(cusolver_batched, "_mapped", lambda: None)
    assert NO_DRIVER in routes.unavailable("batched32", torch.device("cuda:0"), (9, 256))
    assert routes.unavailable("float32", torch.device("cuda:0")) == ""


def test_every_cuda_device_a_process_uses_has_an_index(monkeypatch):
    from plumbing import gpu
    if not torch.cuda.is_available():  # this machine: no CUDA
        assert gpu.pick(None) == torch.device("cpu")
        with pytest.raises(gpu.DeviceError, match="CUDA is not available"):
            gpu.pick("cuda")
    gpus = PretendGPUs("l40s", count=2).install(monkeypatch.setattr)
    assert [gpu.pick(s) for s in (None, "cuda", "cuda:1", "cpu")] == \
        [torch.device("cuda", 0), torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cpu")]
    assert gpu.pick(None, default_cpu=True) == torch.device("cpu")  # --smoke
    for bad, why in (("cuda:2", "has 2 GPU"), ("gpu", "is not a device"), ("meta", "only cuda and cpu")):
        with pytest.raises(gpu.DeviceError, match=why):
            gpu.pick(bad)
    gpu.use(torch.device("cuda", 1))
    assert gpus.set_calls == [1] and gpu.pick("cuda") == torch.device("cuda", 1)  # "cuda" = the current one
