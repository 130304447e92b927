"""The training step: AMP policy, optimizer and LR schedule, one training epoch.

Per step (train_epoch): optional Mixup/CutMix of the device batch, SES begin_step, forward under
autocast, CE (+ lam * R on SES steps, computed in float32 outside autocast), backward through the
GradScaler (a no-op unless fp16), optimizer step. Loss/accuracy bookkeeping stays on the device;
the host reads it every `check_every` steps (finite-loss check, progress bar).
Host synchronisations per step, honestly: none of our own; on a SES step `torch.linalg.eigvalsh`
synchronises inside PyTorch (it reads its convergence flag on the host), and on fp16 steps
GradScaler.step reads the inf/NaN flag on the host (`found_inf.item()`). bf16/fp32 steps without
SES run ahead of the host freely.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from plumbing.progress import tqdm

from harness import multigpu
from plumbing import gpu
from batches import GpuLoader
from ses_core import SES

AMP_MODES = gpu.AMP_MODES  # the precision modes plumbing.gpu.amp_dtype knows


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN/inf; the message names the step and the SES term."""


# ----------------------------------------------------------------------------- AMP policy
@dataclass
class AmpPolicy:
    """Autocast dtype (None = fp32) and whether a GradScaler is needed (fp16 only)."""
    device_type: str
    dtype: torch.dtype | None

    @property
    def use_scaler(self) -> bool:
        return self.dtype == torch.float16

    @property
    def name(self) -> str:
        return next(mode for mode, dtype in gpu.FORCED_PRECISION.items() if dtype == self.dtype)

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def scaler(self):
        return torch.amp.GradScaler(self.device_type if self.device_type == "cuda" else "cpu",
                                    enabled=self.use_scaler)


def amp_policy(device: torch.device | str, mode: str = "auto") -> AmpPolicy:
    """The precision of `mode` on `device` (plumbing.gpu.amp_dtype decides: 'auto' = bf16 on compute
    capability >= 8.0, fp16 + GradScaler below, fp32 on a CPU; fp16 on a CPU exercises the T4 path)."""
    device = torch.device(device)
    return AmpPolicy(device.type, gpu.amp_dtype(device, mode))


# ----------------------------------------------------------------------------- optimizer, schedule
OPTIMIZERS = {
    "sgd": lambda params, cfg: torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"],
                                               weight_decay=cfg["weight_decay"], nesterov=cfg["nesterov"]),
    "adamw": lambda params, cfg: torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"]),
}


def build_optimizer(cfg: dict, model: nn.Module, optimizers: dict | None = None):
    """cfg['optimizer'] from `optimizers` (name -> factory(params, cfg); default OPTIMIZERS)."""
    optimizers = OPTIMIZERS if optimizers is None else optimizers
    name = cfg["optimizer"]
    if name not in optimizers:
        raise ValueError(f"unknown optimizer {name!r}; use {', '.join(optimizers)}")
    return optimizers[name]([p for p in model.parameters() if p.requires_grad], cfg)


def scaled_milestones(cfg: dict) -> list[int]:
    """The milestones keep their fractions of the schedule when --epochs changes (60 -> E)."""
    return sorted({max(1, round(m * cfg["epochs"] / cfg["schedule_epochs"])) for m in cfg["milestones"]})


SCHEDULERS = ("multistep", "cosine", "step")


def build_scheduler(cfg: dict, opt):
    """cfg['scheduler'], one of SCHEDULERS: multistep (x gamma at the scaled milestones), cosine (to 0 over
    the epochs), step (x gamma every step_size epochs, scaled like the milestones)."""
    name = cfg["scheduler"]
    if name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, scaled_milestones(cfg), gamma=cfg["gamma"])
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg["epochs"])
    if name == "step":
        step = max(1, round(cfg["step_size"] * cfg["epochs"] / cfg["schedule_epochs"]))
        return torch.optim.lr_scheduler.StepLR(opt, step_size=step, gamma=cfg["gamma"])
    raise ValueError(f"unknown scheduler {name!r}; use {', '.join(SCHEDULERS)}")


def non_finite(epoch: int, bad_step, bad_ce, bad_ses) -> NonFiniteLoss:
    """The error for the first non-finite loss of any rank: its step and its CE and SES terms (every
    rank's are gathered, so rank 0's message names the step even when another rank's shard broke)."""
    world = multigpu.current()
    per_rank = multigpu.gather_objects((int(bad_step.item()), float(bad_ce.item()), float(bad_ses.item())))
    rank, (step, ce, ses) = min(((r, v) for r, v in enumerate(per_rank) if v[0] >= 0), key=lambda rv: rv[1][0])
    where = f" (on rank {rank})" if world.size > 1 else ""
    return NonFiniteLoss(f"non-finite loss at epoch {epoch + 1}, step {step + 1}{where}: CE = {ce:.4g}, "
                         f"SES term = {ses:.4g}")


# ----------------------------------------------------------------------------- one epoch
def train_epoch(model, loader: GpuLoader, epoch: int, opt, scaler, amp: AmpPolicy,
                ses: SES | None, mixer, check_every: int = 50, max_steps: int | None = None,
                clip_grad: float | None = None, shard: slice | None = None) -> dict:
    """One epoch (or its first max_steps steps); returns mean loss/accuracy, images, steps.
    clip_grad: clip the global gradient norm (after unscaling under fp16) to this value.
    shard (torchrun): train on these rows of each (mixed) global batch; the returned figures are
    summed over all processes, and a non-finite loss on any process stops every one of them."""
    model.train()
    dev = loader.device
    loss_sum = torch.zeros((), device=dev)
    correct = torch.zeros((), device=dev, dtype=torch.long)
    bad_step = torch.full((), -1, device=dev, dtype=torch.long)
    bad_ce = torch.zeros((), device=dev)
    bad_ses = torch.zeros((), device=dev)
    zero = torch.zeros((), device=dev)
    seen, steps = 0, len(loader) if max_steps is None else min(max_steps, len(loader))
    bar = tqdm(loader.epoch(epoch), total=steps, desc=f"epoch {epoch + 1}", leave=False,
               disable=not multigpu.current().main)
    for i, (x, y) in enumerate(bar):
        if i == steps:
            break
        target = y
        if mixer is not None:
            x, target = mixer(x, y)
        if shard is not None:
            x, y, target = x[shard], y[shard], target[shard]
        if ses is not None:
            ses.begin_step()
        with amp.autocast():
            logits = model(x)
            ce = F.cross_entropy(logits, target)
        reg = ses.penalty() if ses is not None else 0.0
        loss = ce + reg
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip_grad:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)  # no host sync (returns a tensor)
        scaler.step(opt)
        scaler.update()
        # bookkeeping stays on the device: no host sync of our own inside the step
        first_bad = (~torch.isfinite(loss.detach())) & (bad_step < 0)
        bad_step = torch.where(first_bad, i, bad_step)
        bad_ce = torch.where(first_bad, ce.detach().float(), bad_ce)
        bad_ses = torch.where(first_bad, (reg if torch.is_tensor(reg) else zero).detach().float(), bad_ses)
        loss_sum += loss.detach().float() * len(y)
        hard = target.argmax(1) if target.dim() == 2 else target  # mixed batches: dominant label
        correct += (logits.detach().argmax(1) == hard).sum()
        seen += len(y)
        if (i + 1) % check_every == 0 or i + 1 == steps:
            if multigpu.all_reduce_max(bad_step.clone()).item() >= 0:  # every rank is here, and raises
                raise non_finite(epoch, bad_step, bad_ce, bad_ses)
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}")
    loss_total, correct_total = multigpu.all_reduce_sum(torch.stack([loss_sum, correct.float()])).tolist()
    seen *= multigpu.current().size  # equal shards
    return dict(train_loss=loss_total / max(seen, 1), train_acc_running=correct_total / max(seen, 1),
                images=seen, steps=steps)
