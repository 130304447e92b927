"""One run's life: build it (every check before anything is written), train it epoch by epoch with
a checkpoint after each, resume it, and compute its final metrics.

<run-dir> = <out-dir>/<experiment>/<variant>_seed<N>/ holds
    config.json     resolved settings, library versions, GPU, git commit (written once checks pass)
    checkpoint.pt   every epoch, atomically (checkpoints.py: what it holds, how a run resumes)
    metrics.jsonl   one line per finished epoch (rewritten atomically from the checkpoint): losses,
                    accuracies, lr, time, `entropy` (eval-mode H on the probe batch) and, for SES
                    runs, `ses_entropy` (the train-mode H SES penalised, mean over the epoch's SES steps)
    tensorboard/    with --tensorboard: the same per epoch, for TensorBoard
    result.json     written last, atomically (by the sweep): its presence means the run is finished
On the CPU a resumed run reproduces an uninterrupted one exactly (data order and augmentation depend
only on (seed, epoch), and the RNG states are checkpointed). Under torchrun rank 0 alone writes; see
multigpu for what the ranks agree on.
"""
from __future__ import annotations

import gc
import importlib.metadata
import platform
import random
import shutil
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from harness import multigpu
from batches import GpuLoader, make_mixer, random_crop_flip
from data_utils import Data
from harness.evaluation import evaluate, final_metrics, final_stage_check, measure_entropy, ses_targets
from harness.checkpoints import checkpoint_state, resume
from plumbing import gpu
from plumbing.files import atomic_torch_save, write_jsonl
from harness.models import compile_model, resolve_layers
from harness.registry import Registry
from ses_core import SES, entropy_ceiling
from ses_solvers.decision import Route, decide
from harness.tensorboard_log import TensorBoard
from harness.training import AmpPolicy, amp_policy, build_optimizer, build_scheduler, train_epoch


class RunError(RuntimeError):
    """A run cannot go on as asked; the message says why and what to do."""


# ----------------------------------------------------------------------------- seeds, environment
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _version(package: str) -> str | None:
    """An installed package's version without importing it (torchvision's import alone takes seconds)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    commit = None
    main_file = Path(getattr(sys.modules.get("__main__"), "__file__", "") or ".").resolve()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=main_file.parent, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    commit = commit or getattr(sys.modules.get("__main__"), "BUNDLE_GIT_COMMIT", None)
    return dict(python=platform.python_version(), torch=torch.__version__, torchvision=_version("torchvision"),
                cuda=torch.version.cuda, numpy=np.__version__, device=gpu.name(device), git_commit=commit,
                argv=sys.argv, host=platform.node())


def save_code(dest: Path) -> None:
    """Copy the code that produces a run next to it: the script and the project's modules it loaded
    (the root's modules and those of its packages, at their paths: code/harness/runs.py); a bundle
    is one file holding all of them."""
    root = Path(__file__).resolve().parents[1]
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    files = {Path(main_file).name: Path(main_file).resolve()} if main_file else {}
    for m in list(sys.modules.values()):
        f = Path(str(getattr(m, "__file__", None) or ""))
        if f.suffix != ".py" or not f.is_absolute() or not f.is_file():
            continue
        f = f.resolve()
        if f.parent == root or (f.parent.parent == root and (f.parent / "__init__.py").is_file()):
            files.setdefault(str(f.relative_to(root)), f)
    for rel, f in sorted(files.items()):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest / rel)


# ----------------------------------------------------------------------------- build, check
@dataclass
class Run:
    """Everything one run trains with, built and checked before its folder is touched."""
    cfg: dict
    data: Data
    device: torch.device
    amp: AmpPolicy
    model: torch.nn.Module
    layers: list
    opt: torch.optim.Optimizer
    sched: object
    scaler: object
    ses: SES | None
    mixer: object
    loader: GpuLoader
    probe_x: torch.Tensor
    eval_split: str
    train_model: torch.nn.Module  # the model, or its DistributedDataParallel wrapper under torchrun
    shard: slice | None           # this process's rows of each global batch (torchrun), else None
    route: Route                  # the SES solver route (decided before the sweep) and where it comes from

    def paused(self):
        """Context in which the SES hooks store nothing (evaluation must never collect)."""
        return self.ses.collector.paused() if self.ses is not None else nullcontext()

    def close(self) -> None:
        if self.ses is not None:
            self.ses.remove()
        self.model = self.train_model = self.opt = self.sched = self.scaler = self.ses = self.loader = None
        gc.collect()
        gpu.free_cached(self.device)


def build_run(cfg: dict, data: Data, device: torch.device, reg: Registry, compile_backend: str | None = None,
              route: Route | None = None) -> Run:
    """Model, hooks, optimizer, loader, probe batch; raises RunError/ValueError on bad settings.
    route: the SES solver route the sweep decided (default: decide(device), float32 without a record).
    Under torchrun every rank builds and checks its run before the first collective (agreed: a
    failure on one rank fails the run on all), then DistributedDataParallel wraps the model.
    compile_backend (--compile): torch.compile the training forward, hooks included (no graph
    break in one process; under torchrun on GPUs SyncBatchNorm breaks the graph at every BN layer);
    evaluation, the probe and checkpoints use the plain model."""
    run = multigpu.agree(_build, cfg, data, device, reg, route or decide(device))
    run.train_model = multigpu.wrap(run.model, device)
    if compile_backend:
        if multigpu.uses_sync_batchnorm(device):
            print("note: --compile under torchrun: torch.compile breaks its graph at every SyncBatchNorm layer")
        run.train_model = compile_model(run.train_model, compile_backend)
    return run


def _build(cfg: dict, data: Data, device: torch.device, reg: Registry, route: Route) -> Run:
    amp = amp_policy(device, cfg["amp"])
    data = data.with_validation(cfg["val_size"])
    if cfg["batch_size"] > len(data.train_y):
        raise RunError(f"--batch-size {cfg['batch_size']} exceeds the {len(data.train_y)} training samples")
    world = multigpu.current()
    if cfg["batch_size"] % world.size:
        raise RunError(f"--batch-size {cfg['batch_size']} must divide by the {world.size} processes of this torchrun")
    if cfg["model"] not in reg.models:
        raise RunError(f"unknown model {cfg['model']!r}; known: {', '.join(reg.models)}")
    seed_everything(cfg["seed"])
    model = reg.models[cfg["model"]](cfg, data.info).to(device, memory_format=torch.channels_last)
    model = multigpu.sync_batchnorm(model, device)  # before the hooks: it replaces the BatchNorm modules
    layers = resolve_layers(cfg, model, reg.presets)
    opt = build_optimizer(cfg, model, reg.optimizers)
    sched = build_scheduler(cfg, opt)
    ses = SES(model, layers, solver=route.name, **reg.settings.arguments("SES", cfg)) if cfg["ses"] else None
    mixer = make_mixer(cfg["mix"], data.info["num_classes"], cfg["mix_alpha"], seed=cfg["seed"])
    augment = data.info.get("augment") or partial(random_crop_flip, pad=data.info["pad"])
    loader = GpuLoader(data.train_x, data.train_y, cfg["batch_size"], device, train=True,
                       augment=augment, seed=cfg["seed"])
    probe_idx = data.fixed_subset(cfg["batch_size"], seed=1)
    probe_x = next(GpuLoader(data.train_x[probe_idx], data.train_y[probe_idx], len(probe_idx), device,
                             train=False).epoch())[0]  # fixed batch for the per-epoch entropy
    if ses is not None and world.size > 1:
        ses.gather = multigpu.gather_rows  # SES on the global batch
    multigpu.seed_rank(cfg["seed"])  # dropout: one stream per rank
    return Run(cfg, data, device, amp, model, layers, opt, sched, amp.scaler(), ses, mixer, loader, probe_x,
               "val" if data.val_x is not None else "test", model,
               multigpu.shard(world, cfg["batch_size"]) if world.size > 1 else None, route)


def check_final_stage(run: Run) -> int | None:
    """One chunk of each end-of-run stage now, so an OOM there surfaces in the first minute.
    Returns the peak memory of that check (CUDA) and leaves the model's state untouched."""
    gpu.reset_peak(run.device)
    final_stage_check(run.model, run.data, run.cfg, run.amp, run.layers, run.probe_x, run.paused)
    return gpu.peak(run.device)


# ----------------------------------------------------------------------------- train, resume
def layer_targets(run: Run, warn: bool) -> dict[str, float]:
    """Each hooked layer's SES target; with warn, one line per layer whose target is at or above
    the entropy a batch can reach."""
    _, dims = measure_entropy(run.model, run.layers, run.probe_x, run.amp)
    n = run.cfg["batch_size"]
    targets = ses_targets(run.cfg, dims, n)
    for layer, d in dims.items():
        target = targets[layer]
        if warn and target >= entropy_ceiling(d, n) - 1e-9:
            print(f"warning: {layer}: SES target {target:.2f} >= the ceiling log(min(n-1, d)) = "
                  f"{entropy_ceiling(d, n):.2f} at batch {n}, d = {d}: SES can only push towards a flat spectrum "
                  f"there (ses_target=rank targets beta * log min(d, n-1) instead)")
    return targets


def train_run(run: Run, run_dir: Path, reg: Registry, stage: list, tensorboard: bool = False, claim=None) -> dict:
    """Train to the end from run_dir's checkpoint; return the result. `stage[0]` names where the
    run is (for failure records): 'epoch N' or 'final metrics'. tensorboard: also log each epoch
    to <run-dir>/tensorboard/. claim: checked before every write (ClaimLost if taken over)."""
    cfg, device = run.cfg, run.device
    history, start_epoch = resume(run, run_dir)
    warn = run.ses is not None and start_epoch == 0
    targets = multigpu.agree(layer_targets, run, warn) if warn or tensorboard else {}
    board = TensorBoard(run_dir, targets) if tensorboard and multigpu.current().main else None
    gpu.reset_peak(device)
    try:
        train_epochs(run, run_dir, reg, stage, history, start_epoch, board, claim)
    finally:
        if board is not None:
            board.close()
    stage[0] = "final metrics"
    peak_train = gpu.peak(device)
    gpu.reset_peak(device)
    with run.paused():
        result = multigpu.agree(final_metrics, cfg, run.model, run.data, run.amp, run.layers, run.probe_x, history,
                                run.ses)
    result["ses_solver_source"] = run.route.source if run.ses is not None else None
    result["peak_mem_bytes"] = peak_train if start_epoch < cfg["epochs"] else None
    result["peak_mem_final_bytes"] = gpu.peak(device)
    result["device_mem_bytes"] = gpu.total_memory(device)
    return result


def train_epochs(run: Run, run_dir: Path, reg: Registry, stage: list, history: list, start_epoch: int,
                 board: TensorBoard | None, claim=None) -> None:
    """Epochs start_epoch.. : each ends with evaluation, the probe, the epoch callbacks, a
    checkpoint, metrics.jsonl and (with --tensorboard) the TensorBoard row. Under torchrun the
    training epoch is the collective part; what follows it runs under multigpu.agree."""
    cfg, device = run.cfg, run.device
    for epoch in range(start_epoch, cfg["epochs"]):
        stage[0] = f"epoch {epoch + 1}"
        lr = run.opt.param_groups[0]["lr"]
        gpu.synchronize(device)
        t0 = time.perf_counter()
        stats = train_epoch(run.train_model, run.loader, epoch, run.opt, run.scaler, run.amp, run.ses, run.mixer,
                            clip_grad=cfg["clip_grad"], shard=run.shard)
        gpu.synchronize(device)
        seconds = time.perf_counter() - t0
        run.sched.step()
        penalised = run.ses.epoch_entropy() if run.ses else {}  # {} in an epoch without SES steps (k > steps)
        evaluated = multigpu.agree(evaluate_epoch, run, run_dir, reg, epoch + 1)
        history.append(dict(epoch=epoch + 1, lr=lr, **stats, **evaluated,
                            **({"ses_entropy": penalised} if penalised else {}),
                            ses_steps=run.ses.applied_steps if run.ses else 0,
                            epoch_time_s=seconds, images_per_s=stats["images"] / seconds))
        state = checkpoint_state(run, epoch + 1, history)
        multigpu.agree(write_epoch, run_dir, state, history, board, claim)
        print(f"  {run_dir.name} epoch {epoch + 1}/{cfg['epochs']}: loss {stats['train_loss']:.3f} "
              f"{run.eval_split} acc {100 * evaluated[f'{run.eval_split}_acc']:.2f}% "
              f"({seconds:.1f}s, {stats['images'] / seconds:.0f} img/s)")


def evaluate_epoch(run: Run, run_dir: Path, reg: Registry, epoch: int) -> dict:
    """The end-of-epoch numbers (eval split accuracy and loss, probe H) and the epoch callbacks
    (rank 0), in eval mode with the collector paused."""
    eval_x, eval_y = ((run.data.val_x, run.data.val_y) if run.eval_split == "val"
                      else (run.data.test_x, run.data.test_y))
    with run.paused():  # eval: never collect
        acc, loss = evaluate(run.model, eval_x, eval_y, run.amp, run.cfg["eval_batch_size"])
        entropy, _ = measure_entropy(run.model, run.layers, run.probe_x, run.amp)
        for callback in reg.epoch_callbacks if multigpu.current().main else ():
            callback(run.model, run.data, run_dir, epoch, run.cfg)
    return {f"{run.eval_split}_acc": acc, f"{run.eval_split}_loss": loss, "entropy": entropy}


def write_epoch(run_dir: Path, state: dict, history: list, board: TensorBoard | None, claim) -> None:
    """Rank 0: the checkpoint, metrics.jsonl and the TensorBoard row, if the run is still ours."""
    if not multigpu.current().main:
        return
    if claim is not None:
        claim.check()
    atomic_torch_save(state, run_dir / "checkpoint.pt")
    write_jsonl(run_dir / "metrics.jsonl", history)
    if board is not None:
        board.epoch(history[-1])
