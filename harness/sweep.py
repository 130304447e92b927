"""The sweep: every (config, seed) run in turn, each failure contained to its run.

For each run: resolve its settings, skip it if finished, build and check it (nothing is written
before the checks pass), claim it, write config.json and the code, check that the final stage
fits, train or resume, write result.json. Any error inside a run (non-finite loss or activations,
out of memory, an error in the final metrics, a solver failure) prints one line, leaves
failure.json in the run folder (what failed, where, when), and the sweep goes on; a rerun retries
failed runs, after the others, and a run that failed after its last epoch redoes only its final
metrics. Ctrl-C ends with one line and exit 130; the checkpoint of the last finished epoch stays
intact. --force deletes the selected runs once, first (never a run another live worker holds). A
--smoke run deletes its checkpoint once result.json is written, so smoke runs leave a few MB.
Under torchrun every decision about a run folder is rank 0's, broadcast (see multigpu).
"""
from __future__ import annotations

import json
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch

from data_utils import DataError
from harness import multigpu
from harness.claims import ClaimLost, acquire, describe
from harness.config import resolve_config, run_name, twin_variant
from harness.memory import fit_check
from harness.run_data import data_kind, dataset_for
from harness.registry import Registry
from harness.runs import RunError, build_run, check_final_stage, environment, save_code, train_run
from harness.settings import SETTINGS
from harness.solver_route import settle
from harness.summary import add_overhead, format_table, summarize
from harness.table import Table
from harness.training import NonFiniteLoss
from plumbing import gpu
from plumbing.files import read_json, write_json

# what to change after an out-of-memory error in a stage: the chunk sizes change no result; the batch does
# (torchrun over several GPUs keeps it, a smaller --batch-size is another setting in its own folder)
TRAINING_OOM = "split the batch over GPUs with torchrun (the same run) or lower --batch-size (another setting)"
OOM_HINT = {"build": "the run's model, optimizer and any validation split's copy do not fit beside what this GPU "
                     "already holds (the dataset; another process?): free it or use a larger GPU",
            "final-stage check": "lower --attack-batch-size (FGSM chunk) or --eval-batch-size (no result changes)",
            "final metrics": "lower --attack-batch-size (FGSM chunk) or --eval-batch-size (no result changes)"}


class Followed:
    """What a torchrun rank other than 0 holds instead of a claim (rank 0 claims for the job)."""
    def check(self) -> None:
        pass

    def release(self) -> None:
        pass


class Interrupted(Exception):
    """Ctrl-C: the CLI prints one line and exits 130."""


def rerun(args) -> str:
    """How to retry: the same command, or (when it carries --force, which would start over) without it."""
    return "rerun the command without --force" if getattr(args, "force", False) else "rerun the same command"


def check_same_settings(run_dir: Path, cfg: dict, table: Table = SETTINGS) -> None:
    """Refuse to resume or skip a run whose stored identity settings differ from the ones asked for now
    (with run names made from the settings, this happens only when the harness defaults changed),
    or whose config.json cannot be read (a copy cut short). Settings that are no part of a run's
    identity (chunk sizes: table.identity) may differ: the run resumes with the values asked for now.
    A setting the stored config lacks (added to the table since the run started) counts as its
    default, so adding a setting whose default keeps the old behaviour leaves every run resumable."""
    path = run_dir / "config.json"
    if not path.is_file():
        return
    stored = read_json(path)
    restart = f"restart just this run with --configs {cfg['config']} --seeds {cfg['seed']} --force"
    if not isinstance(stored, dict):
        raise RunError(f"{path} cannot be read; move that folder away, or {restart}")
    old = {**table.defaults(), **stored.get("config", {})}  # a setting added since the run started: its default
    diff = [k for k in sorted(set(old) | set(cfg))
            if table.identity(k) and json.dumps(old.get(k)) != json.dumps(cfg.get(k))]
    if diff:
        k = diff[0]
        raise RunError(f"{run_dir} holds a run with other settings ({k}: {old.get(k)!r} there, {cfg.get(k)!r} "
                       f"now); move that folder away, or {restart}")


def one_line(err: BaseException, stage: str) -> str:
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, torch.OutOfMemoryError):
        msg = f"out of GPU memory during {stage}; {OOM_HINT.get(stage, TRAINING_OOM)}, and rerun"
    return msg


def record_failure(run_dir: Path, stage: str, err: BaseException) -> str:
    msg = one_line(err, stage)
    if run_dir.is_dir():
        write_json(run_dir / "failure.json", dict(stage=stage, error=type(err).__name__, message=msg,
                                                   time=time.strftime("%Y-%m-%d %H:%M:%S"),
                                                   traceback=traceback.format_exc(limit=-6)))
    return msg


def folder_verdict(run_dir: Path, cfg: dict, table: Table = SETTINGS) -> tuple[str, str]:
    """What the run folder says before anything is built: ("skip", line) finished, ("bad", why)
    settings that differ from the stored ones or cannot be read, ("go", "") otherwise. Read by
    rank 0 alone."""
    try:
        check_same_settings(run_dir, cfg, table)
    except RunError as e:
        return "bad", str(e)
    except OSError as e:
        return "bad", f"{run_dir} cannot be read ({e})"
    if (run_dir / "result.json").is_file():
        return "skip", f"{run_dir.name}: finished earlier, skipped"
    return "go", ""


def claim_run(run_dir: Path, since: float) -> tuple[object | None, str, str]:
    """Rank 0: (claim, verdict, line) with verdict 'go', 'skip' (line says why) or 'failed' (the
    folder cannot be made or claimed: a full or read-only disk). A failure.json newer than `since`
    (when this command's sweep began) was left by another worker during this command: not retried."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        claim = acquire(run_dir)
    except OSError as e:
        return None, "failed", f"error: {run_dir.name}: cannot create or claim {run_dir} ({e}); check the out-dir's space and permissions"
    if claim is None:
        return None, "skip", f"{run_dir.name}: being trained by {describe(run_dir)}, skipped"
    if (run_dir / "result.json").is_file():
        claim.release()
        return None, "skip", f"{run_dir.name}: finished by another worker, skipped"
    failure = run_dir / "failure.json"
    if failure.is_file() and failure.stat().st_mtime > since:
        claim.release()
        return None, "skip", f"{run_dir.name}: failed on another worker during this command, skipped (rerun to retry it)"
    return claim, "go", ""


def contained(err: BaseException) -> bool:
    """Whether a failure can end its run alone: always in one process; under torchrun only when
    every rank knows of it (agreed, or a non-finite loss, which the training loop all-reduces)."""
    return multigpu.current().size == 1 or getattr(err, "agreed", False) or isinstance(err, NonFiniteLoss)


def end_job(world, what: str, args) -> None:
    """This rank alone failed inside a collective: the others cannot go on in lockstep."""
    print(f"error: rank {world.rank} failed during {what} and cannot leave the other processes in step; the job "
          f"ends (torchrun stops them); {rerun(args)} to resume", file=sys.stderr)
    raise SystemExit(1)


def run_one(cfg: dict, exp_dir: Path, args, reg: Registry, datasets: dict, device, since: float = 0.0,
            route=None, twin: str | None = None) -> str:
    """Train one run to its result; returns 'done', 'skipped' or 'failed'. Under torchrun every
    decision about the run folder is rank 0's, broadcast, so all ranks take the same path.
    route: the SES solver route of the sweep (solver_route.settle)."""
    run_dir = exp_dir / run_name(cfg)
    world = multigpu.current()
    verdict, line = multigpu.broadcast(folder_verdict(run_dir, cfg, reg.settings) if world.main else None)
    if verdict == "skip":
        print(line)
        return "skipped"
    if verdict == "bad":
        if world.main:  # decided by rank 0, told once
            print(f"error: {run_dir.name}: {line}", file=sys.stderr)
        return "failed"
    stage = ["build"]
    try:
        run = build_run(cfg, dataset_for(cfg, args, reg, datasets, device), device, reg,
                        getattr(args, "compile", None), route)
    except DataError:
        raise  # no run of this dataset can start: the sweep ends with the data's one line
    except Exception as e:  # noqa: BLE001 - bad settings, or out of memory while building: nothing was written
        if not contained(e):
            end_job(world, f"the build of {run_dir.name}", args)
        if world.main:
            print(f"error: {run_dir.name}: {one_line(e, 'build')}", file=sys.stderr)
        return "failed"
    claim, verdict, line = claim_run(run_dir, since) if world.main else (Followed(), None, "")
    verdict, line = multigpu.broadcast((verdict, line) if world.main else None)
    if verdict != "go":
        if world.main:
            print(line, file=sys.stderr if verdict == "failed" else sys.stdout)
        run.close()
        return verdict
    try:
        if world.main:
            (run_dir / "failure.json").unlink(missing_ok=True)
        if world.main and not (run_dir / "config.json").is_file():
            save_code(run_dir / "code")
            write_json(run_dir / "config.json", dict(config=cfg, environment=environment(device), amp=run.amp.name))
        print(f"== {exp_dir.name} / {run_dir.name} on {gpu.name(device)} ({run.amp.name})")
        stage[0] = "final-stage check"
        multigpu.agree(check_final_stage, run)
        result = train_run(run, run_dir, reg, stage, tensorboard=getattr(args, "tensorboard", False), claim=claim)
        result.update(variant=cfg["variant"], overrides=cfg["overrides"], processes=world.size,
                      compiled=getattr(args, "compile", None), data=data_kind(args),
                      setting_labels={k: reg.settings.label(k) for k in cfg["overrides"]}, twin=twin)
        add_overhead(result, exp_dir)
        multigpu.agree(finish_run, run_dir, result, args.smoke, claim)
        return "done"
    except KeyboardInterrupt:
        raise Interrupted() from None
    except ClaimLost as e:  # another worker owns the run now: its folder is not ours to write
        if world.main:
            print(f"{run_dir.name}: {e}", file=sys.stderr)
        return "skipped"
    except Exception as e:  # noqa: BLE001 - any failure ends this run only
        alone = not contained(e)  # then this rank writes failure.json: rank 0 may be waiting in a collective
        msg = record_failure(run_dir, stage[0], e) if world.main or alone else one_line(e, stage[0])
        if world.main or alone:  # an agreed failure is told once, by rank 0
            print(f"error: {run_dir.name} failed during {stage[0]}: {msg} (details in {run_dir / 'failure.json'}; "
                  f"{rerun(args)} to retry it)", file=sys.stderr)
        if alone:
            end_job(world, stage[0], args)
        return "failed"
    finally:
        claim.release()
        run.close()


def finish_run(run_dir: Path, result: dict, smoke: bool, claim) -> None:
    """Write result.json (rank 0), the run's last act; a --smoke run then drops its checkpoint
    (written and resumable every epoch like a real run's, worthless once the result is in)."""
    if not multigpu.current().main:
        return
    claim.check()  # never write into a run another worker has taken over
    write_json(run_dir / "result.json", result)
    if smoke:
        (run_dir / "checkpoint.pt").unlink(missing_ok=True)


def force_restart(exp_dir: Path, names: list[str]) -> None:
    """--force: delete the selected runs' folders once, before any run starts (the process that
    was given --force does this, rank 0 under torchrun, never its --devices workers). A run
    another live worker holds is left alone, with one line; each deletion happens while holding
    the run's claim."""
    if not multigpu.current().main:
        return
    for name in names:
        run_dir = exp_dir / name
        if not run_dir.is_dir():
            continue
        try:
            claim = acquire(run_dir)
        except OSError as e:
            raise RunError(f"--force cannot claim {run_dir} ({e}); delete it by hand and rerun") from None
        if claim is None:
            print(f"{name}: being trained by {describe(run_dir)}; not restarted")
            continue
        try:
            shutil.rmtree(run_dir)
        except OSError as e:
            raise RunError(f"--force cannot delete {run_dir} ({e}); delete it by hand and rerun") from None
        finally:
            claim.release()
        print(f"{name}: deleted as asked; it runs again from epoch 1")


def run_sweep(experiment: str, grid: dict, setup: dict, args, overrides: dict, reg: Registry) -> int:
    """Every (config, seed) of the selection; returns the exit code (1 if any run failed)."""
    started = time.time()
    device = torch.device(args.device)
    gpu.use(device)  # every CUDA call of this process (cuSOLVER's too) on this GPU
    print(f"device {gpu.describe(device)}", flush=True)
    route = settle(args, device, experiment)  # one SES solver route for every run, decided before any is built
    exp_dir = experiment_dir(args, experiment)
    exp_dir.mkdir(parents=True, exist_ok=True)
    cfgs = selected_runs(experiment, grid, setup, args, overrides, reg.settings)
    if args.force:
        multigpu.agree(force_restart, exp_dir, [run_name(cfg) for cfg in cfgs])
    cfgs = retried_last(exp_dir, cfgs)
    fit_check([c for c in cfgs if not (exp_dir / run_name(c) / "result.json").is_file()], experiment, args, reg,
              device)  # the runs still to train
    datasets: dict = {}
    failed = []
    try:
        for cfg in cfgs:
            twin = twin_variant(experiment, setup, grid, cfg, args.smoke, overrides, reg.settings)
            if run_one(cfg, exp_dir, args, reg, datasets, device, started, route, twin) == "failed":
                failed.append(run_name(cfg))
    finally:
        summary = summarize(exp_dir, list(grid))
        if multigpu.current().main:
            write_json(exp_dir / "summary.json", summary)
    print(format_table(summary["runs"]))
    if failed and multigpu.current().main:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)}; {rerun(args)} to retry them",
              file=sys.stderr)
    return 1 if failed else 0


def experiment_dir(args, experiment: str) -> Path:
    return Path(args.out_dir) / ("smoke" if args.smoke else "synthetic" if args.synthetic else "") / experiment


def selected_runs(experiment: str, grid: dict, setup: dict, args, overrides: dict,
                  table: Table = SETTINGS) -> list[dict]:
    """The resolved settings of every (config, seed) the command selects, in grid order."""
    return [resolve_config(experiment, setup, grid, config, seed, args.smoke, overrides, table)[0]
            for config in args.configs for seed in args.seeds]


def retried_last(exp_dir: Path, cfgs: list[dict]) -> list[dict]:
    """The selection with the runs that failed earlier (failure.json, no result.json) moved to the end,
    so that one run failing again (under torchrun some failures end the job) never keeps the rest of
    the grid from running. Rank 0 reads the folders; every rank gets its order."""
    def failed_before(cfg):
        d = exp_dir / run_name(cfg)
        return (d / "failure.json").is_file() and not (d / "result.json").is_file()
    flags = multigpu.broadcast([failed_before(c) for c in cfgs] if multigpu.current().main else None)
    again = [c for c, f in zip(cfgs, flags) if f]
    if again and len(again) < len(cfgs):
        print(f"note: {len(again)} run(s) that failed earlier are retried after the others: "
              + ", ".join(run_name(c) for c in again))
    return [c for c, f in zip(cfgs, flags) if not f] + again
