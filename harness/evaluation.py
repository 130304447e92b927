"""Evaluation and the end-of-run numbers: accuracy, robustness suite, entropy probe, final metrics.

Everything here runs the model in eval mode with the SES collector disabled (the caller pauses it).
- evaluate: top-1 and mean CE over device tensors, in chunks of `batch_size` (no grad).
- gaussian_noise(sigma): x + N(0, sigma^2) on [0, 1] pixels, clamped; each sample's noise fixed by its
  index (fixed_noise), the same for every model and every chunk size.
- fgsm(eps): x + eps * sign(grad_x CE), run in chunks of `attack_batch_size` (its backward graph is
  what costs memory: ~50 MiB per 64x64 image for the CIFAR-stem ResNet-50 in bf16, twice that in
  float32). The attack always runs in IEEE float32 with autocast and TF32 off, whatever the
  training precision: under fp16 the logit gradients of confident samples underflow to 0 and
  sign(0) = 0 would leave them unattacked, and TF32 (the default of cuDNN's convolutions on Ampere
  and newer, not on a T4) would make the L40S compute another attack than the T4.
- measure_entropy: per-layer H on one fixed batch with a temporary collector (no grad).
- final_stage_check: one chunk of every end-of-run stage, so an out-of-memory error in the final
  metrics surfaces at the start of a run (and in --preflight), not after the last epoch.
"""
from __future__ import annotations

import statistics
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from batches import GpuLoader
from plumbing import gpu
from ses_core import ActivationCollector, entropy_ceiling, entropy_target, spectral_entropies
from harness.training import AmpPolicy

NOISE_SEED = 20_240_601
NOISE_BLOCK = 256  # samples per noise block (fixed_noise)


class NonFiniteActivations(RuntimeError):
    """A hooked layer produced NaN/inf: the message names the layers."""


def evaluate(model, x: torch.Tensor, y: torch.Tensor, amp: AmpPolicy, batch_size: int,
             perturb=None, max_batches: int | None = None) -> tuple[float, float]:
    """(top-1 accuracy, mean CE) of `model` in eval mode on device tensors x, y.

    perturb(model, xb, yb, start) -> xb' is applied per batch (noise or FGSM); start is the index in
    x of the batch's first sample, so a perturbation can depend on the sample and not on the batching.
    """
    model.eval()
    loader = GpuLoader(x, y, batch_size, x.device, train=False)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    loss_sum = torch.zeros((), device=x.device)
    seen = 0
    for i, (xb, yb) in enumerate(loader.epoch()):
        if max_batches is not None and i == max_batches:
            break
        if perturb is not None:
            xb = perturb(model, xb, yb, i * batch_size)
        with torch.no_grad(), amp.autocast():
            logits = model(xb)
        loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
        seen += len(yb)
    return correct.item() / seen, loss_sum.item() / seen


def fixed_noise(start: int, n: int, shape: tuple, device) -> torch.Tensor:
    """N(0, 1) noise (n, *shape) of samples start .. start + n - 1 of an evaluated set: drawn in blocks of
    NOISE_BLOCK samples, block b from its own generator seeded NOISE_SEED + b, so a sample's noise is
    the same whatever the evaluation chunk size (--eval-batch-size), for every model on this device."""
    first, last = start // NOISE_BLOCK, (start + n - 1) // NOISE_BLOCK
    blocks = [torch.randn((NOISE_BLOCK, *shape), device=device,
                          generator=torch.Generator(device=device).manual_seed(NOISE_SEED + b))
              for b in range(first, last + 1)]
    offset = start - first * NOISE_BLOCK
    return torch.cat(blocks)[offset:offset + n]


def gaussian_noise(sigma: float, clamp: bool = True):
    """x + N(0, sigma^2) on [0, 1] pixels, clamped (CIFAR-C-style additive noise; sigma 0.1 ~ severity 5);
    the same noise for a sample whatever the chunk it is evaluated in (fixed_noise)."""
    def perturb(model, x, y, start):
        noisy = x + sigma * fixed_noise(start, len(x), tuple(x.shape[1:]), x.device)
        return noisy.clamp(0, 1) if clamp else noisy
    return perturb



def input_gradient(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """grad_x of the summed CE, in float32 with autocast off (no fp16 underflow to 0)."""
    x = x.detach().float().clone().requires_grad_(True)
    # the backward too runs in this block: autocast off (on a CPU it follows the thread's state) and
    # TF32 off, so the attack is IEEE float32 on every card (Ampere and newer default to TF32)
    with torch.autocast(device_type=x.device.type, enabled=False), gpu.strict_float32():
        loss = F.cross_entropy(model(x).float(), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(eps: float, clamp: bool = True):
    """x + eps * sign(grad_x CE): one-step attack (Goodfellow et al.) on the model in eval mode."""
    def perturb(model, x, y, start):
        adv = x.detach() + eps * input_gradient(model, x, y).sign()
        return adv.clamp(0, 1) if clamp else adv
    return perturb


def robustness_suite(model, x, y, amp: AmpPolicy, cfg: dict, clamp: bool = True,
                     max_batches: int | None = None) -> dict:
    """Accuracy under Gaussian noise (each sigma) and FGSM (each eps): keys 'gauss_0.1', 'fgsm_2/255'.
    Noise runs in chunks of eval_batch_size, FGSM in chunks of attack_batch_size."""
    out = {}
    for s in cfg["noise_sigmas"]:
        out[f"gauss_{s:g}"] = evaluate(model, x, y, amp, cfg["eval_batch_size"], gaussian_noise(s, clamp),
                                       max_batches)[0]
    for e in cfg["fgsm_eps"]:
        out[f"fgsm_{round(e * 255):d}/255"] = evaluate(model, x, y, amp, cfg["attack_batch_size"],
                                                      fgsm(e, clamp), max_batches)[0]
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
    bad = [n for n, a in acts.items() if not torch.isfinite(a).all()]
    if bad:  # checked before the eigen-solver ever sees them (one host sync, once per epoch)
        raise NonFiniteActivations(f"non-finite activations (NaN/inf) in {', '.join(bad)} on the entropy probe "
                                   f"batch: the model diverged; lower --lr (or use --amp bf16/fp32 if fp16 overflows)")
    hs = spectral_entropies(list(acts.values()))
    return ({n: h.item() for n, h in zip(acts, hs)}, {n: a.shape[1] for n, a in acts.items()})


def ses_targets(cfg: dict, dims: dict, n: int) -> dict[str, float]:
    """{layer: t_l} for layers of widths `dims` ({layer: d_l}) at batch n under the run's SES settings: the
    one place the harness turns a config into targets (the probe's H is reported against them, the
    first-epoch warning and the memory advice compare them with the ceiling)."""
    return {layer: entropy_target(d, n, cfg["beta"], cfg["ses_target"]) for layer, d in dims.items()}


def final_stage_check(model, data, cfg: dict, amp: AmpPolicy, layers, probe_x, paused=nullcontext) -> None:
    """One chunk of every end-of-run stage at its real batch size (eval, noise, FGSM, train
    accuracy, entropy probe). Raises torch.OutOfMemoryError exactly where the full stage would."""
    with paused():
        robustness_suite(model, data.test_x, data.test_y, amp, cfg, data.is_image, max_batches=1)
        evaluate(model, data.train_x[:cfg["eval_batch_size"]], data.train_y[:cfg["eval_batch_size"]], amp,
                 cfg["eval_batch_size"], max_batches=1)
        measure_entropy(model, layers, probe_x, amp)


def final_metrics(cfg, model, data, amp, layers, probe_x, history, ses) -> dict:
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
        entropy=entropy, entropy_target=ses_targets(cfg, dims, len(probe_x)),
        entropy_max={n: entropy_ceiling(d, len(probe_x)) for n, d in dims.items()}, ses_target=cfg["ses_target"],
        ses_steps=ses.applied_steps if ses else 0, total_steps=sum(h["steps"] for h in history),
        ses_solver=ses.solver if ses else None, ses_solver_changes=ses.solver_changes if ses else None,
        epochs=len(history), epoch_time_s=statistics.median(h["epoch_time_s"] for h in history),
        images_per_s=statistics.median(h["images_per_s"] for h in history),
        amp=amp.name, device=gpu.name(data.train_x.device))
