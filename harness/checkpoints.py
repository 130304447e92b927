"""A run's checkpoint: what it holds, how it is written, and how a run resumes from it.

checkpoint.pt (<run-dir>/, written after every epoch, atomically: temp file + os.replace) holds
model, optimizer, scheduler, GradScaler, SES counters and solver route, the Mixup/CutMix generator,
the RNG states (torch CPU, numpy, python, this rank's GPU) of every rank (`rng` = rank 0's,
`rng_ranks` = all of them under torchrun), epoch, the metric history, the settings and the precision
mode. A resumed run solves by the route of the sweep resuming it; where the checkpoint's differs,
ses_solver_changes says so ("epoch N: <old> -> <new> (<why>)"). A checkpoint resumes across precision modes (a GradScaler state is used only where both sides
have one) and process counts (each rank restores its own RNG state when the count is the same;
otherwise rank 0 goes on with the first and the other ranks start new streams). Under torchrun
rank 0 reads the file first, so an unreadable one is moved aside once, and tells the others.
"""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

from harness import multigpu
from plumbing import gpu
from plumbing.files import atomic_torch_save, write_jsonl


def rng_state(device: torch.device) -> dict:
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                cuda=gpu.rng_state(device))


def set_rng_state(s: dict, device: torch.device) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    cuda = s.get("cuda")
    if isinstance(cuda, list):  # older checkpoints held every GPU's state: take the first
        cuda = cuda[0] if cuda else None
    gpu.set_rng_state(cuda, device)


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


def resume(run, run_dir: Path) -> tuple[list, int]:
    """(history, epochs done) from run_dir's checkpoint, its states loaded; ([], 0) if there is none.
    Rank 0 reads it first (an unreadable one is moved aside, once) and tells the others."""
    main = multigpu.current().main
    ckpt_path = run_dir / "checkpoint.pt"
    ckpt = load_checkpoint(ckpt_path) if main and ckpt_path.is_file() else None
    if not multigpu.broadcast(ckpt is not None):
        return [], 0
    return multigpu.agree(apply_checkpoint, run, run_dir, ckpt)


def apply_checkpoint(run, run_dir: Path, ckpt: dict | None) -> tuple[list, int]:
    world = multigpu.current()
    if ckpt is None:  # a rank other than 0: the file rank 0 has just read
        ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    run.model.load_state_dict(ckpt["model"])
    run.opt.load_state_dict(ckpt["optimizer"])
    run.sched.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler") and run.scaler.is_enabled():
        run.scaler.load_state_dict(ckpt["scaler"])
    elif run.scaler.is_enabled():
        print(f"note: {run_dir.name} resumes under fp16 from a checkpoint without a GradScaler state; "
              f"the loss scale starts afresh")
    if run.ses is not None:
        saved = run.ses.load_state_dict(ckpt["ses"])
        if saved is not None and saved != run.ses.solver:  # the run goes on by the sweep's route
            run.ses.solver_changes.append(f"epoch {ckpt['epoch']}: {saved} -> {run.ses.solver} (this sweep's route: "
                                          f"{run.route.source})")
    if run.mixer is not None and ckpt.get("mixer"):
        run.mixer.load_state_dict(ckpt["mixer"])
    per_rank = ckpt.get("rng_ranks") or [ckpt["rng"]]
    if len(per_rank) == world.size:
        set_rng_state(per_rank[world.rank], run.device)
    else:  # another process count: rank 0 goes on with the first stream, the others start new ones
        set_rng_state(per_rank[0], run.device)
        multigpu.seed_rank(run.cfg["seed"] * 1_000 + ckpt["epoch"])
    if world.main:
        write_jsonl(run_dir / "metrics.jsonl", ckpt["history"])
    print(f"resuming {run_dir.name} after epoch {ckpt['epoch']}/{run.cfg['epochs']}")
    return ckpt["history"], ckpt["epoch"]


def checkpoint_state(run, epoch: int, history: list) -> dict:
    """Everything a resume needs. Under torchrun a collective (every rank's RNG state is gathered):
    call it on every rank."""
    rngs = multigpu.gather_objects(rng_state(run.device))
    return dict(model=run.model.state_dict(), optimizer=run.opt.state_dict(), scheduler=run.sched.state_dict(),
                scaler=run.scaler.state_dict(), ses=run.ses.state_dict() if run.ses else None, rng=rngs[0],
                rng_ranks=rngs if len(rngs) > 1 else None, mixer=run.mixer.state_dict() if run.mixer else None,
                epoch=epoch, history=history, config=run.cfg, amp=run.amp.name)


def save_checkpoint(run, path: Path, epoch: int, history: list) -> None:
    """checkpoint_state written atomically to path by this process (collective: call it on every rank)."""
    atomic_torch_save(checkpoint_state(run, epoch, history), path)
