"""The shared harness: models, AMP policy, train/eval, robustness, crash-safe resumable sweeps, CLI.

An experiment script is a grid plus `main()`:  run_experiment(__file__, SETUP, GRID, DOC).
Each (config, seed) run lives in <out-dir>/<experiment>/<config>_seed<N>/:
    config.json     resolved settings, library versions, GPU, git commit (written at start)
    checkpoint.pt   every epoch, atomically: model, optimizer, scheduler, scaler, SES counters,
                    all RNG states, epoch, metric history
    metrics.jsonl   one line per finished epoch (rewritten atomically from the checkpoint)
    result.json     written last, atomically: its presence means the run is finished
A rerun skips finished runs and resumes the others from their checkpoint; on the CPU a resumed
run reproduces an uninterrupted one exactly (data order and augmentation depend only on
(seed, epoch), and every RNG state is checkpointed).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from data_utils import (DATASETS, DataError, GpuLoader, atomic_torch_save, load_dataset, make_mixer,
                        random_crop_flip, synthetic_dataset)
from ses_core import SES, ActivationCollector, named_modules_checked, spectral_entropies


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN/inf; the message names the step and the SES term."""


class RunError(RuntimeError):
    """A run cannot go on as asked (e.g. its folder holds a run with other settings)."""


# ----------------------------------------------------------------------------- settings
# Harness defaults = the paper's CIFAR-100 setup (SPEC section 3). Scripts override per setup/config.
DEFAULTS = dict(
    dataset="cifar100", model="resnet18", layers="all", spectral_norm=False,
    epochs=60, batch_size=256, eval_batch_size=1024,
    optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=False,
    scheduler="multistep", milestones=[25, 40, 52], schedule_epochs=60, gamma=0.1,
    ses=False, lam=0.01, beta=0.7, every=1, mix="none", mix_alpha=1.0,
    noise_sigmas=[0.05, 0.1], fgsm_eps=[1 / 255, 2 / 255], rob_sigma=0.1,
    train_eval_size=10_000, val_size=0, attention_every=0, baseline_config="baseline",
)
SMOKE = dict(epochs=2, batch_size=32, eval_batch_size=64, n_train=96, n_test=64)

# Hook presets (SPEC section 2). ResNet-18 `all` hooks the 8 BasicBlocks + avgpool; layer4.1's pooled
# output equals avgpool's, so that spectrum is counted twice: this is the paper's preset, kept as is.
HOOK_PRESETS: dict[str, dict] = {
    "resnet18": {"all": [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)] + ["avgpool"],
                 "last3": ["layer4.0", "layer4.1", "avgpool"]},
    "resnet50": {"layer4+avgpool": ["layer4.0", "layer4.1", "layer4.2", "avgpool"]},
}


# ----------------------------------------------------------------------------- models
class PixelNormalize(nn.Module):
    """(x - mean) / std per channel: models take [0, 1] pixels, so noise and FGSM act on pixels."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def build_resnet(cfg: dict, info: dict) -> nn.Module:
    """torchvision ResNet-18/50 with the CIFAR stem: conv1 3x3 stride 1 pad 1, maxpool -> Identity.

    Input (B, 3, H, W) pixels in [0, 1]; conv1 is Sequential(PixelNormalize, Conv2d), so the hook
    names (layer1.0 ... avgpool) stay torchvision's. spectral_norm=True wraps every Conv2d and
    Linear with nn.utils.spectral_norm(module, name='weight') (the paper's Exp 3 baseline).
    """
    import torchvision
    net = getattr(torchvision.models, cfg["model"])(weights=None, num_classes=info["num_classes"])
    net.conv1 = nn.Sequential(PixelNormalize(info["mean"], info["std"]),
                              nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False))
    net.maxpool = nn.Identity()
    if cfg.get("spectral_norm"):
        for m in list(net.modules()):
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.utils.spectral_norm(m, name="weight")
    return net


MODEL_BUILDERS = {"resnet18": build_resnet, "resnet50": build_resnet}


def resolve_layers(cfg: dict, model: nn.Module) -> list[str]:
    """A preset name of cfg['model'] (list, or callable(model) -> list), or comma-separated names."""
    spec = cfg["layers"]
    presets = HOOK_PRESETS.get(cfg["model"], {})
    if isinstance(spec, str) and spec in presets:
        found = presets[spec]
        return list(found(model) if callable(found) else found)
    names = [n for n in spec.split(",") if n] if isinstance(spec, str) else list(spec)
    if not names:
        raise ValueError(f"no layers in {spec!r}; presets for {cfg['model']}: {', '.join(presets)}")
    named_modules_checked(model, names)
    return names


# ----------------------------------------------------------------------------- AMP policy
@dataclass
class AmpPolicy:
    """bf16 autocast on CUDA capability >= 8.0; fp16 + GradScaler below (T4 = 7.5: its
    is_bf16_supported() counts emulation, so capability decides); fp32 on the CPU."""
    device_type: str
    dtype: torch.dtype | None

    @property
    def use_scaler(self) -> bool:
        return self.dtype == torch.float16

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def scaler(self):
        return torch.amp.GradScaler(self.device_type if self.device_type == "cuda" else "cpu",
                                    enabled=self.use_scaler)


def amp_policy(device: torch.device | str) -> AmpPolicy:
    device = torch.device(device)
    if device.type != "cuda":
        return AmpPolicy(device.type, None)
    major, minor = torch.cuda.get_device_capability(device)
    return AmpPolicy("cuda", torch.bfloat16 if (major, minor) >= (8, 0) else torch.float16)


# ----------------------------------------------------------------------------- train / eval
def build_optimizer(cfg: dict, model: nn.Module):
    params = [p for p in model.parameters() if p.requires_grad]
    name = cfg["optimizer"]
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"],
                               weight_decay=cfg["weight_decay"], nesterov=cfg["nesterov"])
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    if name == "lamb":
        from lamb import Lamb
        return Lamb(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    raise ValueError(f"unknown optimizer {name!r}; use sgd, adamw or lamb")


def scaled_milestones(cfg: dict) -> list[int]:
    """The milestones keep their fractions of the schedule when --epochs changes (60 -> E)."""
    return sorted({max(1, round(m * cfg["epochs"] / cfg["schedule_epochs"])) for m in cfg["milestones"]})


def build_scheduler(cfg: dict, opt):
    name = cfg["scheduler"]
    if name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, scaled_milestones(cfg), gamma=cfg["gamma"])
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg["epochs"])
    if name == "step":
        step = max(1, round(cfg.get("step_size", 30) * cfg["epochs"] / cfg["schedule_epochs"]))
        return torch.optim.lr_scheduler.StepLR(opt, step_size=step, gamma=cfg["gamma"])
    raise ValueError(f"unknown scheduler {name!r}; use multistep, cosine or step")


def train_epoch(model, loader: GpuLoader, epoch: int, opt, scaler, amp: AmpPolicy,
                ses: SES | None, mixer, check_every: int = 50) -> dict:
    """One epoch; returns mean loss/accuracy, images, steps. Host syncs only every `check_every` steps
    (the finite-loss check and the progress bar), never inside the step itself."""
    model.train()
    dev = loader.device
    loss_sum = torch.zeros((), device=dev)
    correct = torch.zeros((), device=dev, dtype=torch.long)
    bad_step = torch.full((), -1, device=dev, dtype=torch.long)
    bad_ce = torch.zeros((), device=dev)
    bad_ses = torch.zeros((), device=dev)
    zero = torch.zeros((), device=dev)
    seen = 0
    bar = tqdm(loader.epoch(epoch), total=len(loader), desc=f"epoch {epoch + 1}", leave=False)
    for i, (x, y) in enumerate(bar):
        target = y
        if mixer is not None:
            x, target = mixer(x, y)
        if ses is not None:
            ses.begin_step()
        with amp.autocast():
            logits = model(x)
            ce = F.cross_entropy(logits, target)
        reg = ses.penalty() if ses is not None else 0.0
        loss = ce + reg
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        # bookkeeping stays on the device: no host sync inside the step
        first_bad = (~torch.isfinite(loss.detach())) & (bad_step < 0)
        bad_step = torch.where(first_bad, i, bad_step)
        bad_ce = torch.where(first_bad, ce.detach().float(), bad_ce)
        bad_ses = torch.where(first_bad, (reg if torch.is_tensor(reg) else zero).detach().float(), bad_ses)
        loss_sum += loss.detach().float() * len(y)
        hard = target.argmax(1) if target.dim() == 2 else target  # mixed batches: dominant label
        correct += (logits.detach().argmax(1) == hard).sum()
        seen += len(y)
        if (i + 1) % check_every == 0 or i + 1 == len(loader):
            if bad_step.item() >= 0:
                raise NonFiniteLoss(f"non-finite loss at epoch {epoch + 1}, step {bad_step.item() + 1}: "
                                    f"CE = {bad_ce.item():.4g}, SES term = {bad_ses.item():.4g}")
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}")
    return dict(train_loss=loss_sum.item() / max(seen, 1), train_acc_running=correct.item() / max(seen, 1),
                images=seen, steps=len(loader))


def evaluate(model, x: torch.Tensor, y: torch.Tensor, amp: AmpPolicy, batch_size: int,
             perturb=None) -> tuple[float, float]:
    """(top-1 accuracy, mean CE) of `model` in eval mode on device tensors x, y.

    perturb(model, xb, yb, gen) -> xb' is applied per batch (noise or FGSM); gen is one
    generator seeded identically for every call, so all models see the same noise.
    """
    model.eval()
    loader = GpuLoader(x, y, batch_size, x.device, train=False)
    gen = torch.Generator(device=x.device).manual_seed(20_240_601)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    loss_sum = torch.zeros((), device=x.device)
    for xb, yb in loader.epoch():
        if perturb is not None:
            xb = perturb(model, xb, yb, gen)
        with torch.no_grad(), amp.autocast():
            logits = model(xb)
        loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    return correct.item() / len(y), loss_sum.item() / len(y)


def gaussian_noise(sigma: float, clamp: bool = True):
    """x + N(0, sigma^2) on [0, 1] pixels, clamped (CIFAR-C-style additive noise; sigma 0.1 ~ severity 5)."""
    def perturb(model, x, y, gen):
        noisy = x + sigma * torch.randn(x.shape, device=x.device, generator=gen)
        return noisy.clamp(0, 1) if clamp else noisy
    return perturb


def fgsm(eps: float, amp: AmpPolicy, clamp: bool = True):
    """x + eps * sign(grad_x CE): one-step attack (Goodfellow et al.) on the model in eval mode."""
    def perturb(model, x, y, gen):
        x = x.detach().clone().requires_grad_(True)
        with amp.autocast():
            loss = F.cross_entropy(model(x).float(), y, reduction="sum")  # sum: no fp16 underflow
        (grad,) = torch.autograd.grad(loss, x)
        adv = x.detach() + eps * grad.sign()
        return adv.clamp(0, 1) if clamp else adv
    return perturb


def robustness_suite(model, x, y, amp: AmpPolicy, cfg: dict, clamp: bool = True) -> dict:
    """Accuracy under Gaussian noise (each sigma) and FGSM (each eps): keys 'gauss_0.1', 'fgsm_2/255'."""
    out = {}
    for s in cfg["noise_sigmas"]:
        out[f"gauss_{s:g}"] = evaluate(model, x, y, amp, cfg["eval_batch_size"], gaussian_noise(s, clamp))[0]
    for e in cfg["fgsm_eps"]:
        out[f"fgsm_{round(e * 255):d}/255"] = evaluate(model, x, y, amp, cfg["eval_batch_size"],
                                                      fgsm(e, amp, clamp))[0]
    return out


@torch.no_grad()
def measure_entropy(model, layers: list[str], x: torch.Tensor, amp: AmpPolicy) -> tuple[dict, dict]:
    """Per-layer H on one fixed batch (eval mode, no grad) with a temporary collector.

    Returns ({layer: H}, {layer: d}). Runs for every run, baseline included, once per epoch.
    """
    model.eval()
    collector = ActivationCollector(model, layers)
    try:
        with amp.autocast():
            model(x)
        acts = dict(collector.activations)
    finally:
        collector.remove()
    hs = spectral_entropies(list(acts.values()))
    return ({n: h.item() for n, h in zip(acts, hs)}, {n: a.shape[1] for n, a in acts.items()})


# ----------------------------------------------------------------------------- run lifecycle
def write_text_atomic(path: Path, text: str) -> None:
    """Text via a temp file + os.replace: readers see the old file or the new one, never half."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def rng_state() -> dict:
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def environment(device: torch.device) -> dict:
    import torchvision
    commit = None
    main_file = Path(getattr(sys.modules.get("__main__"), "__file__", "") or ".").resolve()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=main_file.parent, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    commit = commit or getattr(sys.modules.get("__main__"), "BUNDLE_GIT_COMMIT", None)
    return dict(python=platform.python_version(), torch=torch.__version__, torchvision=torchvision.__version__,
                numpy=np.__version__, device=device_name(device), git_commit=commit,
                argv=sys.argv, host=platform.node())


def save_code(dest: Path) -> None:
    """Copy the code that produces a run next to it: the script and the local modules it loaded
    (a bundle is one file holding all of them)."""
    here = Path(__file__).resolve().parent
    files = {Path(m.__file__) for m in list(sys.modules.values())
             if str(getattr(m, "__file__", None) or "").endswith(".py") and Path(m.__file__).is_absolute()
             and Path(m.__file__).parent.resolve() == here and Path(m.__file__).is_file()}
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file:
        files.add(Path(main_file).resolve())
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(files):
        shutil.copy2(f, dest / f.name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()})"


def load_checkpoint(path: Path):
    """The checkpoint dict, or None (with one line saying so) if it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated / corrupt file: keep it for inspection, restart the run
        bad = path.with_name(path.name + ".corrupt")
        os.replace(path, bad)
        print(f"warning: checkpoint {path} cannot be read ({type(e).__name__}: {e}); "
              f"moved to {bad.name}, restarting this run from epoch 1", file=sys.stderr)
        return None


def check_same_settings(run_dir: Path, cfg: dict) -> None:
    """Refuse to resume or skip a run whose stored settings differ from the ones asked for now."""
    path = run_dir / "config.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text()).get("config", {})
    diff = [k for k in sorted(set(old) | set(cfg)) if json.dumps(old.get(k)) != json.dumps(cfg.get(k))]
    if diff:
        k = diff[0]
        raise RunError(f"{run_dir} holds a run with other settings ({k}: {old.get(k)!r} there, "
                       f"{cfg.get(k)!r} now); pass --force to restart it or use another --out-dir")


@dataclass
class Data:
    """One dataset on the device, shared by every run of a sweep."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    info: dict
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None

    @property
    def is_image(self) -> bool:
        return self.train_x.dtype == torch.uint8

    def with_validation(self, n: int) -> "Data":
        """A fixed hold-out of n training samples as the validation split (train shrinks by n)."""
        if n <= 0:
            return self
        if n >= len(self.train_y):
            raise RunError(f"val_size {n} leaves no training data ({len(self.train_y)} samples)")
        order = self.fixed_subset(len(self.train_y), seed=2)
        val, train = order[:n], order[n:]
        return Data(self.train_x[train], self.train_y[train], self.test_x, self.test_y, self.info,
                    self.train_x[val], self.train_y[val])

    def fixed_subset(self, n: int, seed: int = 0) -> torch.Tensor:
        """Indices of a fixed training subset (the same for every run and seed)."""
        g = torch.Generator().manual_seed(seed)
        return torch.randperm(len(self.train_y), generator=g)[:n].to(self.train_y.device)


def load_data(cfg: dict, args, device) -> Data:
    info = dict(DATASETS[cfg["dataset"]])
    if args.smoke:
        n_train, n_test = cfg["smoke_sizes"]["n_train"], cfg["smoke_sizes"]["n_test"]
        make = info.get("synthetic") or partial(synthetic_dataset, info["num_classes"], info["image_size"])
        tensors = make(n_train, n_test)
    else:
        tensors = load_dataset(cfg["dataset"], args.data_dir, download=not args.no_download)
    train_x, train_y, test_x, test_y, _ = tensors
    return Data(train_x.to(device), train_y.to(device), test_x.to(device), test_y.to(device), info)


def train_run(cfg: dict, data: Data, run_dir: Path, device: torch.device) -> dict:
    """Train one (config, seed) to the end, resuming from run_dir/checkpoint.pt; return result."""
    amp = amp_policy(device)
    data = data.with_validation(cfg["val_size"])
    eval_split = "val" if data.val_x is not None else "test"  # per-epoch curves; test only at the end then
    eval_x, eval_y = (data.val_x, data.val_y) if data.val_x is not None else (data.test_x, data.test_y)
    seed = cfg["seed"]
    seed_everything(seed)
    model = MODEL_BUILDERS[cfg["model"]](cfg, data.info).to(device, memory_format=torch.channels_last)
    layers = resolve_layers(cfg, model)
    opt = build_optimizer(cfg, model)
    sched = build_scheduler(cfg, opt)
    scaler = amp.scaler()
    ses = SES(model, layers, cfg["lam"], cfg["beta"], cfg["every"]) if cfg["ses"] else None
    mixer = make_mixer(cfg["mix"], data.info["num_classes"], cfg["mix_alpha"])
    augment = data.info.get("augment") or partial(random_crop_flip, pad=data.info["pad"])
    loader = GpuLoader(data.train_x, data.train_y, cfg["batch_size"], device, train=True,
                       augment=augment, seed=seed)
    if len(loader) == 0:
        raise RunError(f"batch size {cfg['batch_size']} exceeds the {len(data.train_y)} training samples")
    probe_idx = data.fixed_subset(cfg["batch_size"], seed=1)
    probe_x = next(GpuLoader(data.train_x[probe_idx], data.train_y[probe_idx], len(probe_idx), device,
                             train=False).epoch())[0]  # fixed batch for the per-epoch entropy
    history, start_epoch = [], 0
    ckpt_path = run_dir / "checkpoint.pt"
    ckpt = load_checkpoint(ckpt_path) if ckpt_path.is_file() else None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        if ses is not None:
            ses.load_state_dict(ckpt["ses"])
        set_rng_state(ckpt["rng"])
        history, start_epoch = ckpt["history"], ckpt["epoch"]
        write_jsonl(run_dir / "metrics.jsonl", history)
        print(f"resuming {run_dir.name} after epoch {start_epoch}/{cfg['epochs']}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for epoch in range(start_epoch, cfg["epochs"]):
            lr = opt.param_groups[0]["lr"]
            sync(device)
            t0 = time.perf_counter()
            stats = train_epoch(model, loader, epoch, opt, scaler, amp, ses, mixer)
            sync(device)
            seconds = time.perf_counter() - t0
            sched.step()
            with ses.collector.paused() if ses is not None else nullcontext():  # eval: never collect
                eval_acc, eval_loss = evaluate(model, eval_x, eval_y, amp, cfg["eval_batch_size"])
                entropy, dims = measure_entropy(model, layers, probe_x, amp)
                every = cfg["attention_every"]
                if every and hasattr(model, "attention_maps") and ((epoch + 1) % every == 0 or epoch + 1 == cfg["epochs"]):
                    save_attention(model, data, run_dir, epoch + 1)
            history.append(dict(epoch=epoch + 1, lr=lr, **stats, **{f"{eval_split}_acc": eval_acc,
                                                                   f"{eval_split}_loss": eval_loss},
                                entropy=entropy, ses_steps=ses.applied_steps if ses else 0,
                                epoch_time_s=seconds, images_per_s=stats["images"] / seconds))
            atomic_torch_save(dict(model=model.state_dict(), optimizer=opt.state_dict(),
                                   scheduler=sched.state_dict(), scaler=scaler.state_dict(),
                                   ses=ses.state_dict() if ses else None, rng=rng_state(),
                                   epoch=epoch + 1, history=history, config=cfg), ckpt_path)
            write_jsonl(run_dir / "metrics.jsonl", history)
            print(f"  {run_dir.name} epoch {epoch + 1}/{cfg['epochs']}: loss {stats['train_loss']:.3f} "
                  f"{eval_split} acc {100 * eval_acc:.2f}% ({seconds:.1f}s, {stats['images'] / seconds:.0f} img/s)")
        with ses.collector.paused() if ses is not None else nullcontext():
            result = final_metrics(cfg, model, data, amp, layers, probe_x, history, ses)
        result["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        return result
    finally:
        if ses is not None:
            ses.remove()
        del model, opt, sched, scaler, ses, loader
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def save_attention(model, data: Data, run_dir: Path, epoch: int, n_samples: int = 4) -> None:
    """Cross-attention maps of the first n test samples -> run_dir/attention/epoch_XXX.pt."""
    x, y = data.test_x[:n_samples], data.test_y[:n_samples]
    xb = next(GpuLoader(x, y, n_samples, x.device, train=False).epoch())[0]
    maps = model.attention_maps(xb)
    atomic_torch_save(dict(epoch=epoch, inputs=x.cpu(), labels=y.cpu(), maps=maps.half().cpu(),
                           pixel_perm=getattr(model, "pixel_perm", None)),
                      run_dir / "attention" / f"epoch_{epoch:03d}.pt")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def final_metrics(cfg, model, data: Data, amp, layers, probe_x, history, ses) -> dict:
    """Final-epoch headline numbers: never picked over epochs on the test set."""
    clamp = data.is_image
    suite = robustness_suite(model, data.test_x, data.test_y, amp, cfg, clamp)
    idx = data.fixed_subset(min(cfg["train_eval_size"], len(data.train_y)))
    train_acc = evaluate(model, data.train_x[idx], data.train_y[idx], amp, cfg["eval_batch_size"])[0]
    entropy, dims = measure_entropy(model, layers, probe_x, amp)
    last = history[-1]
    acc = last["test_acc"] if "test_acc" in last else evaluate(model, data.test_x, data.test_y, amp,
                                                                 cfg["eval_batch_size"])[0]
    extra = {"val_acc": last["val_acc"]} if "val_acc" in last else {}
    return dict(
        experiment=cfg["experiment"], config=cfg["config"], seed=cfg["seed"], baseline_config=cfg["baseline_config"],
        acc=acc, rob=suite[f"gauss_{cfg['rob_sigma']:g}"], robustness=suite, **extra,
        train_acc=train_acc, gap=train_acc - acc,
        entropy=entropy, entropy_target={n: cfg["beta"] * math.log(d) for n, d in dims.items()},
        ses_steps=ses.applied_steps if ses else 0, total_steps=sum(h["steps"] for h in history),
        epochs=len(history), epoch_time_s=statistics.median(h["epoch_time_s"] for h in history),
        images_per_s=statistics.median(h["images_per_s"] for h in history),
        amp=amp.name, device=device_name(data.train_x.device))

# ----------------------------------------------------------------------------- sweep
def add_overhead(result: dict, exp_dir: Path) -> None:
    """overhead = median epoch time / the same-seed baseline's in this folder - 1 (same device only).
    The baseline is the config's `baseline_config` ("baseline", or e.g. a `_ses` config's plain twin)."""
    base = exp_dir / f"{result['baseline_config']}_seed{result['seed']}" / "result.json"
    if result["config"] == result["baseline_config"] or not base.is_file():
        return
    b = json.loads(base.read_text())
    if b.get("device") == result["device"] and b["epoch_time_s"] > 0:
        result["overhead"] = result["epoch_time_s"] / b["epoch_time_s"] - 1


def run_sweep(experiment: str, grid: dict, configs: list[str], seeds: list[int], args,
              setup: dict, overrides: dict) -> int:
    """Every (config, seed): skip finished, resume unfinished, train. Returns the exit code."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    exp_dir = Path(args.out_dir) / ("smoke" if args.smoke else "") / experiment
    exp_dir.mkdir(parents=True, exist_ok=True)
    datasets: dict[str, Data] = {}
    failures = []
    for config in configs:
        for seed in seeds:
            smoke = {}
            if args.smoke:  # same code path; only data size, image count and steps shrink
                sizes = {**SMOKE, **setup.get("smoke", {})}
                smoke = dict(epochs=sizes["epochs"], batch_size=sizes["batch_size"],
                             eval_batch_size=sizes["eval_batch_size"], smoke_sizes=sizes,
                             **({"val_size": sizes["val_size"]} if "val_size" in sizes else {}))
            cfg = {**DEFAULTS, **{k: v for k, v in setup.items() if k != "smoke"}, **grid[config], **smoke,
                   **overrides, "experiment": experiment, "config": config, "seed": seed}
            run_dir = exp_dir / f"{config}_seed{seed}"
            if args.force and run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            try:
                check_same_settings(run_dir, cfg)
                if (run_dir / "result.json").is_file():
                    print(f"{run_dir.name}: finished earlier, skipped (--force reruns it)")
                    continue
                if cfg["dataset"] not in datasets:
                    datasets.clear()  # one dataset on the device at a time
                    datasets[cfg["dataset"]] = load_data(cfg, args, device)
                if not (run_dir / "config.json").is_file():
                    save_code(run_dir / "code")
                    write_json(run_dir / "config.json", dict(config=cfg, environment=environment(device),
                                                             amp=amp_policy(device).name))
                print(f"== {experiment} / {run_dir.name} on {device_name(device)} ({amp_policy(device).name})")
                result = train_run(cfg, datasets[cfg["dataset"]], run_dir, device)
                add_overhead(result, exp_dir)
                write_json(run_dir / "result.json", result)
            except (NonFiniteLoss, RunError) as e:
                print(f"error: {run_dir.name}: {e}", file=sys.stderr)
                failures.append(run_dir.name)
    summary = summarize(exp_dir, list(grid))
    write_json(exp_dir / "summary.json", summary)
    print(format_table(summary["runs"]))
    if failures:
        print(f"error: {len(failures)} run(s) stopped: {', '.join(failures)}", file=sys.stderr)
    return 1 if failures else 0


def summarize(exp_dir: Path, order: list[str]) -> dict:
    """Every finished run of the experiment folder (grid order, then seed) and the unfinished ones."""
    def key(d: Path):
        config, _, seed = d.name.rpartition("_seed")
        return (order.index(config) if config in order else len(order), config, int(seed) if seed.isdigit() else 0)
    runs, unfinished = [], []
    for d in sorted((p for p in exp_dir.iterdir() if p.is_dir()), key=key):
        if (d / "result.json").is_file():
            runs.append(json.loads((d / "result.json").read_text()))
        elif (d / "config.json").is_file():
            unfinished.append(d.name)
    return dict(experiment=exp_dir.name, runs=runs, unfinished=unfinished)


def format_table(runs: list[dict]) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:6.2f}"
    w = max([len(f"{r['config']}_seed{r['seed']}") for r in runs] + [20]) + 2
    head = f"{'run':<{w}}{'acc%':>8}{'rob%':>8}{'gap%':>8}{'overhead':>10}{'s/epoch':>9}{'img/s':>9}{'peak GB':>9}"
    lines = [head, "-" * len(head)]
    for r in runs:
        mem = r.get("peak_mem_bytes")
        over = r.get("overhead")
        lines.append(f"{r['config'] + '_seed' + str(r['seed']):<{w}}{pct(r['acc']):>8}{pct(r['rob']):>8}"
                     f"{pct(r['gap']):>8}{'-' if over is None else f'{100 * over:+.0f}%':>10}"
                     f"{r['epoch_time_s']:9.1f}{r['images_per_s']:9.0f}"
                     f"{'-' if mem is None else f'{mem / 2**30:.2f}':>9}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
class OneLineParser(argparse.ArgumentParser):
    """Bad flags end with one line naming the flag and exit code 2 (no usage dump, no traceback)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _checked(kind, test, what):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if not test(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return v
    return parse


def default_out_dir() -> str:
    return "/kaggle/working/results" if os.environ.get("KAGGLE_KERNEL_RUN_TYPE") else "results"


def default_data_dir() -> str:
    return "/kaggle/working/data" if os.environ.get("KAGGLE_KERNEL_RUN_TYPE") else "data"


def build_parser(experiment: str, doc: str, grid: dict, setup: dict, extra_flags=None) -> argparse.ArgumentParser:
    grid_text = "\n".join(f"  {name:<28}{json.dumps(v)}" for name, v in grid.items())
    base = {k: setup.get(k, DEFAULTS[k]) for k in ("dataset", "model", "layers", "epochs", "batch_size",
                                                    "lr", "lam", "beta", "every")}
    p = OneLineParser(prog=f"{experiment}.py", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                      epilog=f"configs (settings over the defaults {json.dumps(base)}):\n{grid_text}\n\n"
                             f"outputs: <out-dir>/{experiment}/<config>_seed<N>/ config.json metrics.jsonl "
                             f"checkpoint.pt result.json; <out-dir>/{experiment}/summary.json. "
                             f"Rerunning the same command resumes unfinished runs and skips finished ones.")
    pos_int = _checked(int, lambda v: v >= 1, "an integer >= 1")
    p.add_argument("--smoke", action="store_true",
                   help="run the whole grid on tiny generated data (CPU unless --device) in seconds; "
                        "results go to <out-dir>/smoke/")
    p.add_argument("--configs", nargs="+", metavar="NAME", default=list(grid),
                   help=f"configs to run (default: all: {' '.join(grid)})")
    p.add_argument("--seeds", nargs="+", type=_checked(int, lambda v: v >= 0, "an integer >= 0"),
                   default=[0], metavar="N", help="seeds (default: 0)")
    p.add_argument("--epochs", type=pos_int, help=f"epochs (default {base['epochs']}; LR milestones scale with it)")
    p.add_argument("--batch-size", type=pos_int, help=f"training batch size (default {base['batch_size']})")
    p.add_argument("--lr", type=_checked(float, lambda v: v > 0 and math.isfinite(v), "a number > 0"),
                   help=f"peak learning rate (default {base['lr']})")
    p.add_argument("--lam", type=_checked(float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0"),
                   help=f"SES weight lambda (default {base['lam']})")
    p.add_argument("--beta", type=_checked(float, lambda v: 0 < v < 1, "in the open interval (0, 1)"),
                   help=f"SES target fraction beta of log d (default {base['beta']})")
    p.add_argument("--every", type=pos_int, help="SES period k: penalty on steps with step %% k == 0, "
                                                 "for every SES config (default: per config)")
    p.add_argument("--layers", help=f"hooked layers: a preset of the model or comma-separated module names "
                                    f"(default {base['layers']})")
    p.add_argument("--data-dir", default=default_data_dir(), help="datasets and caches (default %(default)s)")
    p.add_argument("--out-dir", default=default_out_dir(), help="results root (default %(default)s)")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available, else cpu; cpu for --smoke)")
    p.add_argument("--no-download", action="store_true", help="never download; fail with instructions instead")
    p.add_argument("--force", action="store_true", help="delete and rerun the selected runs, even finished ones")
    for flag, kwargs in (extra_flags or {}).items():  # a script's own settings; None = keep the config's
        p.add_argument(flag, default=None, **kwargs)
    return p


def run_experiment(script: str, setup: dict, grid: dict, doc: str, argv=None, extra_flags=None) -> int:
    """Parse the shared flags (plus a script's extra_flags: flag -> argparse kwargs with a `dest`
    naming the config key) for one experiment script and run its sweep; returns the exit code."""
    # a bundle (tools/bundle.py) records its experiment name, so a renamed upload keeps its folder
    experiment = getattr(sys.modules["__main__"], "BUNDLE_EXPERIMENT", None) or Path(script).stem
    parser = build_parser(experiment, doc, grid, setup, extra_flags)
    args = parser.parse_args(argv)
    unknown = [c for c in args.configs if c not in grid]
    if unknown:
        parser.error(f"argument --configs: unknown config {unknown[0]!r}; choose from {', '.join(grid)}")
    args.device = args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    try:
        torch.device(args.device)
    except RuntimeError:
        parser.error(f"argument --device: {args.device!r} is not a device (use cuda, cuda:0 or cpu)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("argument --device: CUDA is not available on this machine; use --device cpu")
    keys = ["epochs", "batch_size", "lr", "lam", "beta", "every", "layers"]
    keys += [kw["dest"] for kw in (extra_flags or {}).values()]
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    try:
        return run_sweep(experiment, grid, args.configs, args.seeds, args, setup, overrides)
    except (DataError, RunError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
