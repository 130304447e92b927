"""Will a run fit its GPU? An estimate of the training peak, made on the CPU before anything is on
the GPU, and one line saying how to fit when it does not.

    peak ~ data + state + fixed + batch * per_sample                                  (bytes)

- data: the training and test sets on the device, as the loader holds them (uint8 images: 3*H*W
  bytes a sample; Tiny-ImageNet 110k x 12,288 = 1.35 GB), on every process of a torchrun; with a
  validation split (val_size > 0) the training set is held twice (the split copies it).
- state: float32 parameters and buffers, their gradients, and the optimizer's state, measured by
  building the run's optimizer on the CPU and taking one step (SGD with momentum: one tensor per
  parameter; AdamW and LAMB: two); under torchrun one more copy of the gradients (DDP's buckets).
- per_sample, fixed: the bytes autograd saves for the backward pass in one training forward and
  loss, each storage counted once (torch.autograd.graph.saved_tensors_hooks), measured on the CPU
  at batch 1 and 2: per_sample = b2 - b1, fixed = b1 - per_sample (the autocast copies of the
  weights). Under bf16/fp16 the CPU forward runs under bfloat16 autocast, which saves 2-byte
  tensors where CUDA's fp16 and bf16 autocast do; fp32 runs without autocast.
Left out: the CUDA context (a few hundred MiB, outside torch's allocator), cuDNN workspaces, the
transient gradients of the backward pass, SES's pooled activations and Gram matrices (a few MB).
So a run is said to fit when the estimate stays under FIT (90 %) of the card's memory, the margin
--preflight applies to what it measures. Checked against an H100 (docs/memory.md): exp11 at batch
256 in bf16 is estimated at 13.7 GiB where --preflight measured a training peak of 13.9 GiB.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from batches import to_input
from data_utils import synthetic_dataset
from plumbing import gpu
from harness import multigpu
from harness.models import resolve_layers
from harness.evaluation import ses_targets
from harness.run_data import dataset_info, generated_sizes
from harness.training import amp_policy, build_optimizer
from ses_core import ActivationCollector, entropy_ceiling

GiB = 2 ** 30
FIT = 0.9  # a run fits when its estimate (or --preflight's measured peak) stays under this share
MIN_OFFERED = 32  # the smallest batch the fit line offers (SES's entropy of a batch of n has rank <= n - 1)


@dataclass(frozen=True)
class Estimate:
    data: int         # bytes of the dataset on the device
    state: int        # parameters, buffers, gradients, optimizer state
    fixed: int        # saved bytes of a training step that do not grow with the batch
    per_sample: int   # saved bytes per training sample
    batch: int        # samples per process per step
    dims: tuple = ()  # width d of each hooked layer's pooled output (for the SES target at another batch)

    def peak(self, batch: int | None = None) -> int:
        return self.data + self.state + self.fixed + (self.batch if batch is None else batch) * self.per_sample

    def largest_batch(self, total: int) -> int:
        """The largest power-of-two batch whose estimate fits FIT of `total` bytes (0 if none)."""
        room = FIT * total - self.data - self.state - self.fixed
        if room < self.per_sample:
            return 0
        return 2 ** int(math.log2(room // self.per_sample))


def _samples(info: dict, n: int) -> torch.Tensor:
    """n generated samples as the dataset stores them (uint8 images, float32 points)."""
    make = info.get("synthetic") or partial(synthetic_dataset, info["num_classes"], info["image_size"])
    return make(n, 1)[0]


def _saved_bytes(model, layers, x: torch.Tensor, num_classes: int, half: bool) -> tuple[int, dict]:
    """(bytes autograd saves for one training forward + CE at input x, each storage once; {layer: d})."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            saved[ptr] = t.untyped_storage().nbytes()
        return t
    collector = ActivationCollector(model, layers) if layers else None
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
            logits = model(x)
            F.cross_entropy(logits.float(), torch.zeros(len(x), dtype=torch.long).clamp(max=num_classes - 1))
        dims = {n: a.shape[1] for n, a in collector.activations.items()} if collector else {}
    finally:
        if collector:
            collector.remove()
    return sum(saved.values()), dims


def estimate(cfg: dict, info: dict, reg, half: bool, sizes: tuple[int, int], processes: int = 1) -> Estimate:
    """The estimate for run settings `cfg` on a dataset of `sizes` = (n_train, n_test) samples, at
    cfg's batch split over `processes` (torchrun), under 16-bit autocast when `half`. CPU only; the
    global random streams are left as they were (the CPU's forked, the GPUs' untouched)."""
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.random.default_generator.manual_seed(0)  # torch.manual_seed would reseed every GPU's stream too
        return _estimate(cfg, info, reg, half, sizes, processes)


def _estimate(cfg, info, reg, half, sizes, processes) -> Estimate:
    model = reg.models[cfg["model"]](cfg, dict(info)).train().to(memory_format=torch.channels_last)
    layers = resolve_layers(cfg, model, reg.presets) if cfg.get("layers") else []
    stored = _samples(info, 2)
    x2 = to_input(stored)  # as the loader gives them: pixels in [0, 1] channels_last, or the points
    b1, dims = _saved_bytes(model, layers, x2[:1], info["num_classes"], half)
    b2, _ = _saved_bytes(model, layers, x2, info["num_classes"], half)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(cfg, model, reg.optimizers)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    tensors = [*model.parameters(), *model.buffers(), *(p.grad for p in params),
               *(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))]
    per_sample = max(0, b2 - b1)
    n_train, n_test = sizes
    copies = n_train * (2 if cfg.get("val_size") else 1) + n_test  # a validation split copies the training set
    grads = sum(p.nelement() * p.element_size() for p in params)
    return Estimate(data=stored[0].nelement() * stored.element_size() * copies,
                    state=sum(t.nelement() * t.element_size() for t in tensors) + (grads if processes > 1 else 0),
                    fixed=max(0, b1 - per_sample), per_sample=per_sample,
                    batch=cfg["batch_size"] // processes, dims=tuple(dims.values()))


def gib(b: float) -> str:
    return f"{b / GiB:.1f} GiB"


def fit_line(est: Estimate, total: int, card: str, cfg: dict, precision: str, script: str,
             processes: int = 1) -> str:
    """'' when the estimate fits FIT of `total`, else one line: what it needs, and what does fit
    (torchrun over enough GPUs for the same run, or the largest power-of-two batch and what it changes)."""
    need = est.peak()
    if need <= FIT * total:
        return ""
    batch = cfg["batch_size"]
    split = f" ({est.batch} on each of {processes} processes)" if processes > 1 else ""
    line = (f"{cfg['config']}: needs about {gib(need)} per GPU at batch {batch}{split} in {precision} (an estimate: "
            f"data {gib(est.data)}, model and optimizer {gib(est.state + est.fixed)}, activations "
            f"{gib(est.batch * est.per_sample)}), over {100 * FIT:.0f} % of this {card}'s {gib(total)}: it does not fit.")
    fits = []
    for gpus in (2, 4, 8):
        if gpus > processes and batch % gpus == 0 and est.peak(batch // gpus) <= FIT * total:
            fits.append(f"torchrun --standalone --nproc_per_node {gpus} {script} <the same flags> on {gpus} such GPUs "
                        f"({batch // gpus} per GPU, {gib(est.peak(batch // gpus))} each in training; the same run: SES "
                        f"and BatchNorm see the whole batch of {batch}; each GPU still runs the whole final stage, "
                        f"checked in the run's first minute)")
            break
    smaller = est.largest_batch(total) * processes
    if MIN_OFFERED <= smaller < batch:
        targets = ses_targets(cfg, dict(enumerate(est.dims)), smaller)
        reach = [d for i, d in enumerate(est.dims) if targets[i] >= entropy_ceiling(d, smaller)]
        fits.append(f"--batch-size {smaller} ({gib(est.peak(smaller // processes))}; another setting, in its own "
                    f"folder: SES and BatchNorm see {smaller} samples, {batch // smaller}x the steps per epoch, lr "
                    f"unchanged" + (f"; the SES target of d = {max(reach)} is then above the entropy a batch of "
                                    f"{smaller} can reach, log {smaller - 1} = {math.log(smaller - 1):.2f}"
                                    if reach else "") + ")")
    return line + (" It fits as " + ", or with ".join(fits) if fits else
                   f" Nor does any batch of {MIN_OFFERED} or more on one such GPU") + "."


# the readers (harness.table.READERS) whose settings can change the training peak: the model, its input, the
# batch, the optimizer; an estimate is made once per distinct value of these (seeds and SES settings share one)
MEMORY_READERS = ("data", "model", "hooks", "training")


_ESTIMATES: dict[str, Estimate] = {}  # one per distinct model, batch and precision in a process


def fit_warnings(cfgs: list[dict], script: str, reg, device, sizes_of, processes: int = 1) -> tuple[dict, list]:
    """({variant: Estimate}, 'warning: ...' lines (fit_line) for the runs that do not fit `device`),
    made before any data is on it; ({}, []) on a CPU. One estimate per distinct model, batch and
    precision (seeds and SES settings share it), one line per distinct verdict naming its configs;
    sizes_of(cfg) = the (n_train, n_test) to be loaded."""
    total = gpu.total_memory(device)
    if total is None:
        return {}, []
    verdicts, estimates = {}, {}
    for cfg in cfgs:
        amp = amp_policy(device, cfg["amp"])
        key = repr((cfg["experiment"], sorted((k, repr(v)) for k, v in cfg.items()  # its registry's models
                                              if k in reg.settings and reg.settings[k].to in MEMORY_READERS),
                    amp.name, sizes_of(cfg), processes))
        if key not in _ESTIMATES:
            _ESTIMATES[key] = estimate(cfg, reg.datasets[cfg["dataset"]], reg, amp.dtype is not None, sizes_of(cfg),
                                       processes)
        estimates[cfg["variant"]] = _ESTIMATES[key]
        line = fit_line(_ESTIMATES[key], total, gpu.name(device), cfg, amp.name, script, processes)
        if line:
            verdicts.setdefault(line.split(": ", 1)[1], []).append(cfg["variant"])
    return estimates, [f"warning: {', '.join(dict.fromkeys(names))}: {verdict}" for verdict, names in verdicts.items()]


def fit_check(cfgs: list[dict], experiment: str, args, reg, device) -> dict:
    """Before any data is on the GPU: one line for each selected config that will not fit it, with
    what does; returns {variant: Estimate} ({} on a CPU, and on ranks other than 0
    under torchrun, where the estimate is for one process's share of the batch)."""
    if not multigpu.current().main or not gpu.is_cuda(device):
        return {}

    def sizes(cfg):
        info = dataset_info(cfg, args, reg)
        return generated_sizes(cfg, args, info) or info.get("sizes", (0, 0))
    estimates, lines = fit_warnings(cfgs, f"{experiment}.py", reg, device, sizes, multigpu.current().size)
    for line in lines:
        print(line)
    return estimates
