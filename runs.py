"""One run's life: build it (every check before anything is written), train it epoch by epoch with
a checkpoint after each, resume it, and compute its final metrics.

<run-dir> = <out-dir>/<experiment>/<variant>_seed<N>/ holds
    config.json     resolved settings, library versions, GPU, git commit (written once checks pass)
    checkpoint.pt   every epoch, atomically: model, optimizer, scheduler, scaler, SES counters, the
                    RNG states of this process's device, epoch, metric history
    metrics.jsonl   one line per finished epoch (rewritten atomically from the checkpoint): losses,
                    accuracies, lr, time, `entropy` (eval-mode H on the probe batch) and, for SES
                    runs, `ses_entropy` (the train-mode H SES penalised, mean over the epoch's SES steps)
    tensorboard/    with --tensorboard: the same per epoch, for TensorBoard
    result.json     written last, atomically (by the sweep): its presence means the run is finished
On the CPU a resumed run reproduces an uninterrupted one exactly (data order and augmentation depend
only on (seed, epoch), and the RNG states are checkpointed). A checkpoint resumes across precision
modes (a GradScaler state is used only where both sides have one) and across GPU counts (only the
RNG state of the device in use is saved and restored).
"""
from __future__ import annotations

import gc
import os
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

import multigpu
from data_utils import Data, GpuLoader, device_name, make_mixer, random_crop_flip
from evaluation import evaluate, final_metrics, final_stage_check, measure_entropy
from files import atomic_torch_save, write_jsonl
from models import compile_model, resolve_layers
from registry import Registry
from ses_core import SES, entropy_ceiling, entropy_target
from tensorboard_log import TensorBoard
from training import AmpPolicy, amp_policy, build_optimizer, build_scheduler, train_epoch


class RunError(RuntimeError):
    """A run cannot go on as asked; the message says why and what to do."""


# ----------------------------------------------------------------------------- RNG, environment
def rng_state(device: torch.device) -> dict:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(), cuda=cuda)


def set_rng_state(s: dict, device: torch.device) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    cuda = s.get("cuda")
    if isinstance(cuda, list):  # older checkpoints held every GPU's state: take the first
        cuda = cuda[0] if cuda else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


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
                cuda=torch.version.cuda, numpy=np.__version__, device=device_name(device), git_commit=commit,
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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

    def paused(self):
        """Context in which the SES hooks store nothing (evaluation must never collect)."""
        return self.ses.collector.paused() if self.ses is not None else nullcontext()

    def close(self) -> None:
        if self.ses is not None:
            self.ses.remove()
        self.model = self.train_model = self.opt = self.sched = self.scaler = self.ses = self.loader = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def build_run(cfg: dict, data: Data, device: torch.device, reg: Registry, compile_backend: str | None = None) -> Run:
    """Model, hooks, optimizer, loader, probe batch; raises RunError/ValueError on bad settings.
    compile_backend (--compile): torch.compile the training forward (hooks included, no graph
    break); evaluation, the probe and checkpoints use the plain model."""
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
    layers = resolve_layers(cfg, model, reg.presets)
    opt = build_optimizer(cfg, model, reg.optimizers)
    sched = build_scheduler(cfg, opt)
    ses = SES(model, layers, cfg["lam"], cfg["beta"], cfg["every"], target=cfg["ses_target"]) if cfg["ses"] else None
    mixer = make_mixer(cfg["mix"], data.info["num_classes"], cfg["mix_alpha"])
    augment = data.info.get("augment") or partial(random_crop_flip, pad=data.info["pad"])
    loader = GpuLoader(data.train_x, data.train_y, cfg["batch_size"], device, train=True,
                       augment=augment, seed=cfg["seed"])
    probe_idx = data.fixed_subset(cfg["batch_size"], seed=1)
    probe_x = next(GpuLoader(data.train_x[probe_idx], data.train_y[probe_idx], len(probe_idx), device,
                             train=False).epoch())[0]  # fixed batch for the per-epoch entropy
    if ses is not None and world.size > 1:
        ses.gather = multigpu.gather_rows  # SES on the global batch
        ses.agree = multigpu.gather_objects  # and one solver route on every rank
    train_model = multigpu.wrap(model, device)
    if compile_backend:
        train_model = compile_model(train_model, compile_backend)
    return Run(cfg, data, device, amp, model, layers, opt, sched, amp.scaler(), ses, mixer, loader, probe_x,
               "val" if data.val_x is not None else "test", train_model,
               multigpu.shard(world, cfg["batch_size"]) if world.size > 1 else None)


def check_final_stage(run: Run) -> int | None:
    """One chunk of each end-of-run stage now, so an OOM there surfaces in the first minute.
    Returns the peak memory of that check (CUDA) and leaves the model's state untouched."""
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    final_stage_check(run.model, run.data, run.cfg, run.amp, run.layers, run.probe_x, run.paused)
    return torch.cuda.max_memory_allocated(run.device) if run.device.type == "cuda" else None


# ----------------------------------------------------------------------------- train, resume
def resume(run: Run, run_dir: Path) -> tuple[list, int]:
    ckpt_path = run_dir / "checkpoint.pt"
    ckpt = load_checkpoint(ckpt_path) if ckpt_path.is_file() else None
    if ckpt is None:
        return [], 0
    run.model.load_state_dict(ckpt["model"])
    run.opt.load_state_dict(ckpt["optimizer"])
    run.sched.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler") and run.scaler.is_enabled():
        run.scaler.load_state_dict(ckpt["scaler"])
    elif run.scaler.is_enabled():
        print(f"note: {run_dir.name} resumes under fp16 from a checkpoint without a GradScaler state; "
              f"the loss scale starts afresh")
    if run.ses is not None:
        run.ses.load_state_dict(ckpt["ses"])
    set_rng_state(ckpt["rng"], run.device)
    write_jsonl(run_dir / "metrics.jsonl", ckpt["history"])
    print(f"resuming {run_dir.name} after epoch {ckpt['epoch']}/{run.cfg['epochs']}")
    return ckpt["history"], ckpt["epoch"]


def save_checkpoint(run: Run, path: Path, epoch: int, history: list) -> None:
    atomic_torch_save(dict(model=run.model.state_dict(), optimizer=run.opt.state_dict(),
                           scheduler=run.sched.state_dict(), scaler=run.scaler.state_dict(),
                           ses=run.ses.state_dict() if run.ses else None, rng=rng_state(run.device),
                           epoch=epoch, history=history, config=run.cfg, amp=run.amp.name), path)


def layer_targets(run: Run, warn: bool) -> dict[str, float]:
    """Each hooked layer's SES target; with warn, one line per layer whose target is at or above
    the entropy a batch can reach."""
    _, dims = measure_entropy(run.model, run.layers, run.probe_x, run.amp)
    n, targets = run.cfg["batch_size"], {}
    for layer, d in dims.items():
        targets[layer] = target = entropy_target(d, n, run.cfg["beta"], run.cfg["ses_target"])
        if warn and target >= entropy_ceiling(d, n) - 1e-9:
            print(f"warning: {layer}: SES target {target:.2f} >= the ceiling log(min(n-1, d)) = "
                  f"{entropy_ceiling(d, n):.2f} at batch {n}, d = {d}: SES can only push towards a flat spectrum "
                  f"there (ses_target=rank targets beta * log min(d, n-1) instead)")
    return targets


def train_run(run: Run, run_dir: Path, reg: Registry, stage: list, tensorboard: bool = False) -> dict:
    """Train to the end from run_dir's checkpoint; return the result. `stage[0]` names where the
    run is (for failure records): 'epoch N' or 'final metrics'. tensorboard: also log each epoch
    to <run-dir>/tensorboard/."""
    cfg, device = run.cfg, run.device
    history, start_epoch = resume(run, run_dir)
    warn = run.ses is not None and start_epoch == 0
    targets = layer_targets(run, warn) if warn or tensorboard else {}
    board = TensorBoard(run_dir, targets) if tensorboard and multigpu.current().main else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        train_epochs(run, run_dir, reg, stage, history, start_epoch, board)
    finally:
        if board is not None:
            board.close()
    stage[0] = "final metrics"
    peak_train = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with run.paused():
        result = final_metrics(cfg, run.model, run.data, run.amp, run.layers, run.probe_x, history, run.ses)
    result["peak_mem_bytes"] = peak_train if start_epoch < cfg["epochs"] else None
    result["peak_mem_final_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    result["device_mem_bytes"] = (torch.cuda.get_device_properties(device).total_memory
                                  if device.type == "cuda" else None)
    return result


def train_epochs(run: Run, run_dir: Path, reg: Registry, stage: list, history: list, start_epoch: int,
                 board: TensorBoard | None) -> None:
    """Epochs start_epoch.. : each ends with evaluation, the probe, the epoch callbacks, a
    checkpoint, metrics.jsonl and (with --tensorboard) the TensorBoard row."""
    cfg, device, main = run.cfg, run.device, multigpu.current().main
    eval_x, eval_y = ((run.data.val_x, run.data.val_y) if run.eval_split == "val"
                      else (run.data.test_x, run.data.test_y))
    for epoch in range(start_epoch, cfg["epochs"]):
        stage[0] = f"epoch {epoch + 1}"
        lr = run.opt.param_groups[0]["lr"]
        sync(device)
        t0 = time.perf_counter()
        stats = train_epoch(run.train_model, run.loader, epoch, run.opt, run.scaler, run.amp, run.ses, run.mixer,
                            clip_grad=cfg["clip_grad"], shard=run.shard)
        sync(device)
        seconds = time.perf_counter() - t0
        run.sched.step()
        with run.paused():  # eval: never collect
            eval_acc, eval_loss = evaluate(run.model, eval_x, eval_y, run.amp, cfg["eval_batch_size"])
            entropy, _ = measure_entropy(run.model, run.layers, run.probe_x, run.amp)
            penalised = run.ses.epoch_entropy() if run.ses else {}  # {} in an epoch without SES steps (k > steps)
            for callback in reg.epoch_callbacks if main else ():
                callback(run.model, run.data, run_dir, epoch + 1, cfg)
        history.append(dict(epoch=epoch + 1, lr=lr, **stats, **{f"{run.eval_split}_acc": eval_acc,
                                                               f"{run.eval_split}_loss": eval_loss},
                            entropy=entropy, **({"ses_entropy": penalised} if penalised else {}),
                            ses_steps=run.ses.applied_steps if run.ses else 0,
                            epoch_time_s=seconds, images_per_s=stats["images"] / seconds))
        if main:  # under torchrun, rank 0 alone writes
            save_checkpoint(run, run_dir / "checkpoint.pt", epoch + 1, history)
            write_jsonl(run_dir / "metrics.jsonl", history)
            if board is not None:
                board.epoch(history[-1])
        print(f"  {run_dir.name} epoch {epoch + 1}/{cfg['epochs']}: loss {stats['train_loss']:.3f} "
              f"{run.eval_split} acc {100 * eval_acc:.2f}% ({seconds:.1f}s, {stats['images'] / seconds:.0f} img/s)")
