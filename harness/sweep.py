"""The sweep: every (config, seed) run in turn, each failure contained to its run, and the summary.

For each run: resolve its settings, skip it if finished, build and check it (nothing is written
before the checks pass), write config.json and the code, check that the final stage fits, train or
resume, write result.json. Any error inside a run (non-finite loss or activations, out of memory,
an error in the final metrics, a solver failure) prints one line, leaves failure.json in the run
folder (what failed, where, when), and the sweep goes on; a rerun retries failed runs, and a run
that failed after its last epoch redoes only its final metrics. Ctrl-C ends with one line and
exit 130; the checkpoint of the last finished epoch stays intact. A --smoke run deletes its
checkpoint once result.json is written (real runs keep theirs), so smoke runs leave a few MB.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch

from harness import multigpu
from harness.claims import ClaimLost, acquire, describe
from harness.config import resolve_config, run_name
from data_utils import Data, device_name, load_data
from plumbing.files import write_json
from harness.registry import Registry
from harness.runs import RunError, build_run, check_final_stage, environment, save_code, train_run
from harness.training import NonFiniteLoss

OOM_HINT = {"build": "--batch-size", "final-stage check": "--attack-batch-size (FGSM chunk) or --eval-batch-size",
            "final metrics": "--attack-batch-size (FGSM chunk) or --eval-batch-size"}


class Followed:
    """What a torchrun rank other than 0 holds instead of a claim (rank 0 claims for the job)."""
    def check(self) -> None:
        pass

    def release(self) -> None:
        pass


class Interrupted(Exception):
    """Ctrl-C: the CLI prints one line and exits 130."""


def check_same_settings(run_dir: Path, cfg: dict) -> None:
    """Refuse to resume or skip a run whose stored settings differ from the ones asked for now
    (with run names made from the settings, this happens only when the harness defaults changed)."""
    path = run_dir / "config.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text()).get("config", {})
    diff = [k for k in sorted(set(old) | set(cfg)) if json.dumps(old.get(k)) != json.dumps(cfg.get(k))]
    if diff:
        k = diff[0]
        raise RunError(f"{run_dir} holds a run with other settings ({k}: {old.get(k)!r} there, {cfg.get(k)!r} "
                       f"now); move that folder away, or restart just this run with --configs {cfg['config']} "
                       f"--seeds {cfg['seed']} --force")


def add_overhead(result: dict, exp_dir: Path) -> None:
    """overhead = median epoch time / the same-seed twin's - 1 (same device, same overrides).
    The twin is the config's `baseline_config` ("baseline", or e.g. `mixup` for `mixup_ses`)."""
    twin = result["variant"].replace(result["config"], result["baseline_config"], 1)
    base = exp_dir / f"{twin}_seed{result['seed']}" / "result.json"
    if result["config"] == result["baseline_config"] or not base.is_file():
        return
    b = json.loads(base.read_text())
    if b.get("device") == result["device"] and b["epoch_time_s"] > 0:
        result["overhead"] = result["epoch_time_s"] / b["epoch_time_s"] - 1


def record_failure(run_dir: Path, stage: str, err: BaseException) -> str:
    kind = type(err).__name__
    msg = str(err).strip().splitlines()[0] if str(err).strip() else kind
    if isinstance(err, torch.OutOfMemoryError):
        msg = f"out of GPU memory during {stage}; lower {OOM_HINT.get(stage, '--batch-size')} and rerun"
    if run_dir.is_dir():
        write_json(run_dir / "failure.json", dict(stage=stage, error=kind, message=msg,
                                                   time=time.strftime("%Y-%m-%d %H:%M:%S"),
                                                   traceback=traceback.format_exc(limit=-6)))
    return msg


def decide(run_dir: Path, cfg: dict) -> tuple[str, str]:
    """What the run folder says before anything is built: ("skip", line) finished, ("bad", why)
    settings that differ from the stored ones, ("go", "") otherwise. Read by rank 0 alone."""
    try:
        check_same_settings(run_dir, cfg)
    except RunError as e:
        return "bad", str(e)
    if (run_dir / "result.json").is_file():
        return "skip", f"{run_dir.name}: finished earlier, skipped"
    return "go", ""


def dataset_for(cfg: dict, args, reg: Registry, datasets: dict, device) -> Data:
    """The run's dataset on the device, loaded once per sweep (one dataset on the device at a time).
    Every process loads it itself; the first to need a download or a decode does it under the data
    folder's lock while the others wait for it outside any collective, then read its cache."""
    if cfg["dataset"] not in datasets:
        datasets.clear()
        info = dict(reg.datasets[cfg["dataset"]])
        smoke = cfg.get("smoke_sizes", {})
        if args.smoke and "image_size" in info:  # the smoke's images: smaller, the code path the same
            info["image_size"] = smoke["image_size"]
        generated = ((smoke["n_train"], smoke["n_test"]) if args.smoke
                     else info.get("sizes") if args.synthetic else None)
        datasets[cfg["dataset"]] = multigpu.agree(load_data, cfg["dataset"], info, device, args.data_dir,
                                                  not args.no_download, generated, reg.datasets)
    return datasets[cfg["dataset"]]


def contained(err: BaseException) -> bool:
    """Whether a failure can end its run alone: always in one process; under torchrun only when
    every rank knows of it (agreed, or a non-finite loss, which the training loop all-reduces)."""
    return multigpu.current().size == 1 or getattr(err, "agreed", False) or isinstance(err, NonFiniteLoss)


def run_one(cfg: dict, exp_dir: Path, args, reg: Registry, datasets: dict, device) -> str:
    """Train one run to its result; returns 'done', 'skipped' or 'failed'. Under torchrun every
    decision about the run folder is rank 0's, broadcast, so all ranks take the same path."""
    run_dir = exp_dir / run_name(cfg)
    world = multigpu.current()
    verdict, line = multigpu.broadcast(decide(run_dir, cfg) if world.main else None)
    if verdict == "skip":
        print(line)
        return "skipped"
    if verdict == "bad":
        print(f"error: {run_dir.name}: {line}", file=sys.stderr)
        return "failed"
    stage = ["build"]
    try:
        run = build_run(cfg, dataset_for(cfg, args, reg, datasets, device), device, reg,
                        getattr(args, "compile", None))
    except (RunError, ValueError) as e:  # bad settings: nothing was written for this run
        print(f"error: {run_dir.name}: {e}", file=sys.stderr)
        return "failed"
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    claim = acquire(run_dir) if world.main else Followed()
    if not multigpu.broadcast(claim is not None and not (run_dir / "result.json").is_file()):
        print(f"{run_dir.name}: " + ("finished by another worker, skipped" if claim is not None else
                                     f"being trained by {describe(run_dir)}, skipped"))
        if claim is not None:
            claim.release()
        run.close()
        return "skipped"
    try:
        if world.main:
            (run_dir / "failure.json").unlink(missing_ok=True)
        if world.main and not (run_dir / "config.json").is_file():
            save_code(run_dir / "code")
            write_json(run_dir / "config.json", dict(config=cfg, environment=environment(device), amp=run.amp.name))
        print(f"== {exp_dir.name} / {run_dir.name} on {device_name(device)} ({run.amp.name})")
        stage[0] = "final-stage check"
        multigpu.agree(check_final_stage, run)
        result = train_run(run, run_dir, reg, stage, tensorboard=getattr(args, "tensorboard", False), claim=claim)
        result.update(variant=cfg["variant"], overrides=cfg["overrides"], processes=world.size,
                      compiled=getattr(args, "compile", None))
        add_overhead(result, exp_dir)
        multigpu.agree(finish_run, run_dir, result, args.smoke, claim)
        return "done"
    except KeyboardInterrupt:
        raise Interrupted() from None
    except ClaimLost as e:  # another worker owns the run now: its folder is not ours to write
        print(f"{run_dir.name}: {e}", file=sys.stderr)
        return "skipped"
    except Exception as e:  # noqa: BLE001 - any failure ends this run only
        msg = record_failure(run_dir, stage[0], e) if world.main else str(e)
        if world.main or not contained(e):  # an agreed failure is told once, by rank 0
            print(f"error: {run_dir.name} failed during {stage[0]}: {msg} (details in {run_dir / 'failure.json'}; "
                  f"rerun the same command to retry it)", file=sys.stderr)
        if not contained(e):  # this rank alone failed inside a collective: the others cannot go on in lockstep
            print(f"error: rank {world.rank} cannot leave the other processes in step; the job ends (torchrun "
                  f"stops them); rerun the same command to resume", file=sys.stderr)
            raise SystemExit(1) from None
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
    was given --force does this, never its --devices workers). A run another live worker holds
    is left alone, with one line; each deletion happens while holding the run's claim."""
    for name in names:
        run_dir = exp_dir / name
        if not run_dir.is_dir():
            continue
        claim = acquire(run_dir)
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
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.set_device(device)  # every CUDA call of this process (cuSOLVER's too) on this GPU
    exp_dir = experiment_dir(args, experiment)
    exp_dir.mkdir(parents=True, exist_ok=True)
    cfgs = selected_runs(experiment, grid, setup, args, overrides)
    if args.force and multigpu.current().main:
        force_restart(exp_dir, [run_name(cfg) for cfg in cfgs])
    multigpu.barrier()
    datasets: dict = {}
    failed = []
    try:
        for cfg in cfgs:
            if run_one(cfg, exp_dir, args, reg, datasets, device) == "failed":
                failed.append(run_name(cfg))
    finally:
        summary = summarize(exp_dir, list(grid))
        if multigpu.current().main:
            write_json(exp_dir / "summary.json", summary)
    print(format_table(summary["runs"]))
    if failed and multigpu.current().main:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)}; rerun the same command to retry them",
              file=sys.stderr)
    return 1 if failed else 0


def experiment_dir(args, experiment: str) -> Path:
    return Path(args.out_dir) / ("smoke" if args.smoke else "synthetic" if args.synthetic else "") / experiment


def selected_runs(experiment: str, grid: dict, setup: dict, args, overrides: dict) -> list[dict]:
    """The resolved settings of every (config, seed) the command selects, in grid order."""
    return [resolve_config(experiment, setup, grid, config, seed, args.smoke, overrides)[0]
            for config in args.configs for seed in args.seeds]


def summarize(exp_dir: Path, order: list[str]) -> dict:
    """Every finished run of the experiment folder (grid order, then seed), the failed and the unfinished."""
    def key(d: Path):
        variant, _, seed = d.name.rpartition("_seed")
        config = variant.split("+")[0]
        return (order.index(config) if config in order else len(order), variant, int(seed) if seed.isdigit() else 0)
    runs, failed, unfinished = [], [], []
    for d in sorted((p for p in exp_dir.iterdir() if p.is_dir() and "_seed" in p.name), key=key):
        if (d / "result.json").is_file():
            runs.append(json.loads((d / "result.json").read_text()))
        elif (d / "failure.json").is_file():
            failed.append(dict(run=d.name, **{k: v for k, v in json.loads((d / "failure.json").read_text()).items()
                                              if k != "traceback"}))
        elif (d / "config.json").is_file():
            unfinished.append(d.name)
    return dict(experiment=exp_dir.name, runs=runs, failed=failed, unfinished=unfinished)


def format_table(runs: list[dict]) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:6.2f}"
    names = [f"{r.get('variant', r['config'])}_seed{r['seed']}" for r in runs]
    w = max([len(n) for n in names] + [20]) + 2
    head = f"{'run':<{w}}{'acc%':>8}{'rob%':>8}{'gap%':>8}{'overhead':>10}{'s/epoch':>9}{'img/s':>9}{'peak GB':>9}"
    lines = [head, "-" * len(head)]
    for name, r in zip(names, runs):
        mem = r.get("peak_mem_bytes")
        over = r.get("overhead")
        lines.append(f"{name:<{w}}{pct(r['acc']):>8}{pct(r['rob']):>8}"
                     f"{pct(r['gap']):>8}{'-' if over is None else f'{100 * over:+.0f}%':>10}"
                     f"{r['epoch_time_s']:9.1f}{r['images_per_s']:9.0f}"
                     f"{'-' if mem is None else f'{mem / 2**30:.2f}':>9}")
    return "\n".join(lines)
