"""The command line every experiment script shares: flags, one-line errors, and run_experiment.

An experiment script is a docstring, a grid and main():
    run_experiment(__file__, SETUP, GRID, __doc__, argv)   (+ a script's own settings and registry entries)
The setting flags (--lam, --every, ...) come from the table of run settings (harness/settings.py and a
script's own entries); the flags written here are the command's options, which are no run settings.
Bad flags, and a bad value or unknown key in a config's resolved settings, end with one line and exit
code 2; missing data with one line and exit 1; failed runs with exit 1 after the sweep; Ctrl-C with one
line and exit 130.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from harness import multigpu
from plumbing import gpu
from harness.config import RUN_FACTS, applies, resolve_config, run_name
from data_utils import DataError
from harness.models import LayerError, resolve_layers
from harness.registry import Registry, make_registry
from harness.table import flag_type, integer
from harness.preflight import preflight
from plumbing.files import write_json
from harness.runs import RunError
from harness.summary import format_table, summarize
from harness.sweep import Interrupted, experiment_dir, force_restart, rerun, run_sweep, selected_runs
from ses_solvers.routes import SOLVERS


class OneLineParser(argparse.ArgumentParser):
    """Bad flags end with one line naming the flag and exit code 2 (no usage dump, no traceback)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def default_out_dir() -> str:
    return "/kaggle/working/results" if os.environ.get("KAGGLE_KERNEL_RUN_TYPE") else "results"


def default_data_dir() -> str:
    return "/kaggle/working/data" if os.environ.get("KAGGLE_KERNEL_RUN_TYPE") else "data"


def per_config(experiment: str, key: str, setup: dict, grid: dict, table):
    """The default of a setting as --help should show it: one value, or 'a (x) / b (y)' per config."""
    own = {name: resolve_config(experiment, setup, grid, name, 0, False, {}, table)[0][key] for name in grid}
    values = list(dict.fromkeys(json.dumps(v) for v in own.values()))
    shown = {v: "none" if json.loads(v) is None else json.loads(v) for v in values}
    if len(values) == 1:
        return shown[values[0]]
    return " / ".join(f"{shown[v]} ({', '.join(n for n in own if json.dumps(own[n]) == v)})" for v in values)


def override_notes(experiment: str, grid: dict, setup: dict, args, overrides: dict, table) -> list[str]:
    """One line per command-line setting that replaces different per-config values, or that leaves the
    configs without SES alone (an SES setting)."""
    own = {c: resolve_config(experiment, setup, grid, c, 0, args.smoke, {}, table)[0] for c in args.configs}
    notes = []
    for key, value in overrides.items():
        kept = [c for c in own if not applies(table, key, own[c])]
        values = {c: cfg[key] for c, cfg in own.items() if c not in kept}
        if len({json.dumps(v) for v in values.values()}) > 1:
            notes.append(f"note: {table[key].option} {value} replaces the per-config values "
                         + ", ".join(f"{c}: {v}" for c, v in values.items())
                         + (" (runs named accordingly)" if table.identity(key) else ""))
        if kept:
            notes.append(f"note: {table[key].option} {value} applies to the SES configs only; "
                         f"{', '.join(kept)} {'keeps its' if len(kept) == 1 else 'keep their'} own")
    return notes


def build_parser(experiment: str, doc: str, grid: dict, setup: dict,
                 reg: Registry | None = None) -> argparse.ArgumentParser:
    """The command's options and the setting flags of reg.settings (default: the harness's table)."""
    reg = reg or make_registry()
    width = max(len(n) for n in grid) + 2
    grid_text = "\n".join(f"  {name:<{width}}{json.dumps(v)}" for name, v in grid.items())
    base = {k: v for k, v in setup.items() if k != "smoke"}
    same = [s.option for s in reg.settings.flags() if not s.identity]
    same_run = (f", except {', '.join(same)}, which change how a result is computed, not the result (the same "
                f"run resumes with them)") if same else ""
    p = OneLineParser(prog=f"{experiment}.py", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                      allow_abbrev=False,  # --forc is an error, never a --force the --devices workers miss
                      epilog=f"configs (settings over the script's setup {json.dumps(base)} and the harness "
                             f"defaults; each setting flag's help gives its default per config):\n{grid_text}\n\n"
                             f"outputs: <out-dir>/{experiment}/<config>_seed<N>/ config.json metrics.jsonl "
                             f"checkpoint.pt result.json; <out-dir>/{experiment}/summary.json. A setting given "
                             f"on the command line that changes a config is part of the run's folder name "
                             f"(<config>+<key>=<value>_seed<N>){same_run}. Rerunning the same command "
                             f"resumes unfinished runs, retries failed ones and skips finished ones.")
    p.add_argument("--smoke", action="store_true",
                   help="run the whole grid on tiny generated data (CPU unless --device) in seconds; "
                        "results go to <out-dir>/smoke/")
    p.add_argument("--preflight", action="store_true",
                   help="first thing to run on a new GPU: a few real-size steps and one chunk of every end-of-run "
                        "stage per config; prints step time, images/s, SES overhead, peak memory of training and "
                        "of the final stage against the card, projected hours; writes no run folder")
    p.add_argument("--synthetic", action="store_true",
                   help="generated data of the real dataset's shapes and sizes (no download); runs go to "
                        "<out-dir>/synthetic/ and are never mistaken for real results")
    p.add_argument("--configs", nargs="+", metavar="NAME", default=list(grid),
                   help=f"configs to run (default: all: {' '.join(grid)})")
    p.add_argument("--seeds", nargs="+", type=flag_type(integer(0), "a seed"),
                   default=[0], metavar="N", help="seeds (default: 0)")
    reg.settings.add_flags(p, reg, lambda key: per_config(experiment, key, setup, grid, reg.settings))
    p.add_argument("--data-dir", default=default_data_dir(), help="datasets and caches (default %(default)s)")
    p.add_argument("--out-dir", default=default_out_dir(), help="results root (default %(default)s)")
    p.add_argument("--device", help="cuda (the current GPU, cuda:0), cuda:1, cpu (default: the current GPU if there is "
                                    "one, else cpu; cpu for --smoke)")
    p.add_argument("--devices", metavar="LIST",
                   help="one worker per device sharing the out-dir (each run claimed once): cuda:0,cuda:1 or all")
    p.add_argument("--no-download", action="store_true", help="never download; fail with instructions instead")
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="torch.compile the training forward, SES hooks included (backend default inductor); off by "
                        "default: the first steps compile for minutes, and no GPU measurement has shown a win yet "
                        "(bench/bench_ses.py --compile measures it); not part of the run's name, so a run resumes "
                        "with or without it")
    p.add_argument("--ses-solver", choices=SOLVERS, default="auto",
                   help="SES eigen-solver route of every run of this command (docs/solver.md); auto = the route "
                        "--preflight measured fastest on this GPU (<out-dir>/<experiment>/ses_solver_routes.json), else float32 "
                        "(torch.linalg.eigvalsh); not part of the run's name")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log every epoch to <run-dir>/tensorboard/ (tensorboard --logdir <out-dir>)")
    p.add_argument("--force", action="store_true",
                   help="delete and rerun the selected runs (only those named by --configs/--seeds), even finished ones")
    return p


def strip_flags(argv: list[str], flags: dict[str, bool]) -> list[str]:
    """argv without the given flags (flag -> whether it takes a value), in both spellings
    (`--devices all` and `--devices=all`)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in flags:
            skip = flags[name] and "=" not in a
            continue
        out.append(a)
    return out


def worker_devices(spec: str) -> list[tuple[str, str, dict]]:
    """--devices LIST -> (name, the --device of each worker, its environment changes). Each CUDA worker
    sees only its own GPU (CUDA_VISIBLE_DEVICES), as cuda:0, so nothing it loads touches another card."""
    n = gpu.count()
    names = [f"cuda:{i}" for i in range(n)] if spec == "all" else [d.strip() for d in spec.split(",") if d.strip()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    physical = [v.strip() for v in visible.split(",")] if visible else [str(i) for i in range(n)]
    out = []
    for name in names:
        dev = torch.device(name)  # raises RuntimeError on a bad name
        if dev.type != "cuda":
            out.append((name, name, {}))
            continue
        index = dev.index or 0
        if index >= n:
            raise ValueError(f"{name}: this machine has {n} GPU(s)")
        out.append((name, "cuda:0", {"CUDA_VISIBLE_DEVICES": physical[index]}))
    return out


def run_workers(parser, experiment: str, grid: dict, args, argv, cfgs: list[dict]) -> int:
    """--devices: this command once per device, as child processes sharing the out-dir and its
    claims. --force is done here, once, before they start; a worker killed or failed is an error."""
    try:
        devices = worker_devices(args.devices)
    except (RuntimeError, ValueError) as e:
        parser.error(f"argument --devices: {args.devices!r}: {e}")
    if not devices:
        parser.error(f"argument --devices: {args.devices!r} names no device")
    exp_dir = experiment_dir(args, experiment)
    if args.force and not args.preflight:  # a preflight writes no run folder and deletes none
        exp_dir.mkdir(parents=True, exist_ok=True)
        try:
            force_restart(exp_dir, [run_name(cfg) for cfg in cfgs])
        except RunError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    base = strip_flags(list(sys.argv[1:] if argv is None else argv), {"--devices": True, "--device": True, "--force": False})
    unbuffered = {"PYTHONUNBUFFERED": "1"}  # the workers share one terminal: whole lines, as they are printed
    procs = [subprocess.Popen([sys.executable, sys.argv[0], *base, "--device", dev],
                              env={**os.environ, **env, **unbuffered}) for _, dev, env in devices]
    print(f"{len(procs)} workers on {', '.join(name for name, _, _ in devices)} share {args.out_dir}")
    interrupted = False
    while True:  # Ctrl-C reaches the workers too (one process group); wait until each has ended
        try:
            codes = [p.wait() for p in procs]
            break
        except KeyboardInterrupt:
            interrupted = True
    if interrupted:
        print(f"interrupted; {rerun(args)} to resume", file=sys.stderr)
        return 130
    if exp_dir.is_dir():
        summary = summarize(exp_dir, list(grid))
        write_json(exp_dir / "summary.json", summary)
        print(format_table(summary["runs"]))
    bad = [(i, c) for i, c in enumerate(codes) if c != 0]
    for i, code in bad:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        print(f"error: the worker on {devices[i][0]} {how}; {rerun(args)} to finish its runs", file=sys.stderr)
    return 0 if not bad else max(1, max(c for _, c in bad))


def check_configs(parser, experiment, grid, setup, args, overrides, reg) -> None:
    """Every selected config's resolved settings: each key a setting of the table, each value one its
    setting accepts, a baseline_config other than the default one of the grid's configs, rob_sigma one
    of noise_sigmas, and hooked layers that name modules of the config's model (a bad value in a grid
    is one line, like a bad flag, before any run)."""
    for config in args.configs:
        cfg, _ = resolve_config(experiment, setup, grid, config, 0, args.smoke, overrides, reg.settings)
        problems = reg.settings.problems(cfg, reg, RUN_FACTS)
        twin = cfg["baseline_config"]
        if twin not in grid and twin != reg.settings["baseline_config"].default:
            problems.append(f"baseline_config {twin!r} is no config of this script; use one of {', '.join(grid)}")
        if not problems and f"{cfg['rob_sigma']:g}" not in {f"{s:g}" for s in cfg["noise_sigmas"]}:  # read at the end
            problems.append(f"rob_sigma {cfg['rob_sigma']:g} (the headline rob) is none of noise_sigmas "
                            f"{cfg['noise_sigmas']}; add it there")
        if problems:
            parser.error(f"config {config!r}: {problems[0]}")
        why = layers_problem(cfg, reg)
        if why:
            parser.error(f"argument --layers: {why}" if "layers" in overrides else f"config {config!r}: {why}")


def layers_problem(cfg: dict, reg) -> str:
    """What is wrong with the config's hooked layers for its model ('' if nothing; built on the meta
    device: no memory)."""
    try:
        with torch.device("meta"):
            model = reg.models[cfg["model"]](cfg, dict(reg.datasets[cfg["dataset"]]))
    except Exception:  # noqa: BLE001 - a builder that cannot run on meta: checked when the run starts
        return ""
    try:
        resolve_layers(cfg, model, reg.presets)
    except LayerError as e:
        return str(e)
    return ""


def run_experiment(script: str, setup: dict, grid: dict, doc: str, argv=None, **registry) -> int:
    """Parse the shared flags and the setting flags for one experiment script and run its sweep;
    returns the exit code. `registry` keywords (models, presets, datasets, optimizers, epoch_callbacks,
    settings: harness.table.Setting entries of its own) add a script's own."""
    # a bundle (tools/bundle.py) records its experiment name, so a renamed upload keeps its folder
    experiment = getattr(sys.modules["__main__"], "BUNDLE_EXPERIMENT", None) or Path(script).stem
    reg = make_registry(**registry)
    parser = build_parser(experiment, doc, grid, setup, reg)
    args = parser.parse_args(argv)
    unknown = [c for c in args.configs if c not in grid]
    if unknown:
        parser.error(f"argument --configs: unknown config {unknown[0]!r}; choose from {', '.join(grid)}")
    explicit_device = args.device is not None
    try:  # one place turns the user's device into the one this process uses (cuda -> cuda:<current>)
        args.device = str(gpu.pick(args.device, default_cpu=args.smoke))
    except gpu.DeviceError as e:
        parser.error(f"argument --device: {e}")
    if multigpu.launched() and args.devices:
        parser.error("argument --devices: starts one worker per GPU by itself; under torchrun leave it out")
    if args.device == "cpu" and not explicit_device and not (args.smoke or args.preflight or args.devices):
        parser.exit(2, f"{experiment}.py: no GPU on this machine: a real run of the full grid on the CPU would take "
                       f"days{'' if args.synthetic else ' (after downloading the data)'}. Use --smoke for the "
                       f"end-to-end test on tiny data, --preflight to measure, or --device cpu to train here anyway\n")
    overrides = {s.name: getattr(args, s.name) for s in reg.settings.flags() if hasattr(args, s.name)}
    check_configs(parser, experiment, grid, setup, args, overrides, reg)
    if args.devices:
        for note in override_notes(experiment, grid, setup, args, overrides, reg.settings):
            print(note)
        cfgs = selected_runs(experiment, grid, setup, args, overrides, reg.settings)
        return run_workers(parser, experiment, grid, args, argv, cfgs)
    try:
        multigpu.timeout()
    except ValueError as e:
        parser.error(str(e))
    args.device = multigpu.rank_device(args.device)  # under torchrun: cuda:LOCAL_RANK
    try:
        world, args.device = multigpu.init(args.device)
    except (RuntimeError, ValueError) as e:  # e.g. NCCL without a usable GPU: one line, no traceback
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: cannot join torchrun's process group on {args.device}: {why}", file=sys.stderr)
        return 1
    if not world.main:  # under torchrun, rank 0 alone prints (errors still reach stderr)
        sys.stdout = open(os.devnull, "w")
    for note in override_notes(experiment, grid, setup, args, overrides, reg.settings):
        print(note)
    clean = False
    try:
        code = (preflight(experiment, grid, setup, args, overrides, reg) if args.preflight
                else run_sweep(experiment, grid, setup, args, overrides, reg))
        clean = True
        return code
    except (Interrupted, KeyboardInterrupt):
        print(f"interrupted; {rerun(args)} to resume", file=sys.stderr)
        return 130
    except (DataError, RunError, ValueError) as e:
        clean = world.size == 1 or getattr(e, "agreed", False)  # raised alike on every rank, or only here
        if world.main or not clean:
            print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        multigpu.finish(clean)
