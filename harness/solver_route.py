"""The SES solver route of a command: decided once per process before any run starts (run_sweep) and
before any config is measured (--preflight), the same for every run; and --preflight's measurement of
the routes on the first SES config's real Gram matrices, recorded for this GPU in
<out-dir>/<experiment>/ses_solver_routes.json (ses_solvers.decision: what is decided from what, the record's format).

Under torchrun rank 0 decides and broadcasts; every other rank checks that it can run the route too
(for a batched route, its own cuSOLVER selftest, before any run); if one cannot, every rank takes
"float32" and the source names the rank and why (a route the user named: every rank stops, one line).
Nothing here runs inside a training run: no route is timed and no child process started there.
"""
from __future__ import annotations

from pathlib import Path

import torch

from harness import multigpu
from harness.runs import build_run
from plumbing import gpu
from ses_core import ActivationCollector, centred_grams, entropy_of_spectrum
from ses_solvers.decision import RECORDS, Route, RouteError, decide, measure as measure_grams
from ses_solvers.routes import unavailable


def records(args, experiment: str) -> Path:
    """<out-dir>/<experiment>/ses_solver_routes.json: one record per experiment (its Gram matrices' sizes
    are its own), per GPU and versions inside."""
    return Path(args.out_dir) / experiment / RECORDS


def _agreed(error: RouteError) -> RouteError:
    error.agreed = True  # raised alike on every rank: rank 0 tells it once
    return error


def settle(args, device: torch.device, experiment: str) -> Route:
    """The route every run of this command solves by (args.ses_solver: auto or a route), printed in one
    line. Raises RouteError (one line, on every rank) when a route the user named cannot run here."""
    requested = getattr(args, "ses_solver", None) or "auto"
    world = multigpu.current()
    mine = None
    if world.main:
        try:
            mine = decide(device, requested, records(args, experiment))
        except RouteError as e:
            mine = str(e)
    decided = multigpu.broadcast(mine)
    if isinstance(decided, str):
        raise _agreed(RouteError(decided))
    decided = Route(*decided)
    if world.size > 1:  # rank 0 has checked it already
        whys = multigpu.gather_objects("" if world.main else unavailable(decided.name, device, decided.shape))
        bad = "; ".join(f"rank {rank}: {why}" for rank, why in enumerate(whys) if why)
        if bad and requested != "auto":
            raise _agreed(RouteError(f"SES solver {requested} cannot run on every rank ({bad}); leave --ses-solver "
                                     f"out (auto) or name another route"))
        if bad:
            decided = Route("float32", f"torch.linalg.eigvalsh: {decided.name} ({decided.source}) cannot run on {bad}")
    print(f"SES solver route: {decided.name} ({decided.source})")
    return decided


def measured_on(device: torch.device) -> bool:
    """Whether --preflight measures the routes on `device` (CUDA only: on a CPU float32 is the route)."""
    return gpu.is_cuda(device)


def real_grams(run) -> list[torch.Tensor]:
    """The Grams one SES step of `run` solves: one forward of its probe batch (the real global batch) in
    train mode, no grad, under the run's precision, through a collector on its hooked layers."""
    collector = ActivationCollector(run.model, run.layers)
    try:
        run.model.train()
        with torch.no_grad(), run.amp.autocast():
            run.model(run.probe_x)
        return centred_grams(list(collector.activations.values()))
    finally:
        collector.remove()


def _record(grams: list[torch.Tensor], path: Path, cfg: dict) -> None:
    if multigpu.current().main:
        line = measure_grams(grams, path, entropy_of_spectrum, experiment=cfg["experiment"], config=cfg["config"],
                             batch=cfg["batch_size"])
        print(f"  {cfg['config']}: SES solver routes on its real Gram matrices: {line}; recorded in {path}")


def measure(cfg: dict, data, device: torch.device, reg, args) -> Route:
    """--preflight: the routes compared on cfg's real Gram matrices (rank 0), recorded for this GPU, one
    line printed; then the route settle() gives from that record."""
    run = build_run(cfg, data, device, reg)
    try:
        grams = real_grams(run)  # every rank: SyncBatchNorm's forward is a collective
        multigpu.agree(_record, grams, records(args, cfg["experiment"]), cfg)
    finally:
        run.close()
    return settle(args, device, cfg["experiment"])
