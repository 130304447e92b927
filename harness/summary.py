"""What a sweep leaves beside its runs: summary.json, the printed table, and each run's overhead
against its twin.

summary.json (<out-dir>/<experiment>/): every finished run's result (grid order, then seed), the
failed runs with their stage and message, and the unfinished ones by name. A result.json or
failure.json that cannot be read (a copy cut short, or one without the metrics the table prints) is
listed with one warning, never fatal.
"""
from __future__ import annotations

import sys
from pathlib import Path

from plumbing.files import read_json


def twin_result(result: dict, exp_dir: Path) -> dict | None:
    """The same-seed result of the run's twin (result["twin"], its folder name; in results written before
    that field, its `baseline_config` under the same overrides), if readable."""
    if result["config"] == result["baseline_config"]:
        return None
    twin = result.get("twin") or result["variant"].replace(result["config"], result["baseline_config"], 1)
    return read_json(exp_dir / f"{twin}_seed{result['seed']}" / "result.json")


def add_overhead(result: dict, exp_dir: Path) -> None:
    """overhead = median epoch time / the twin's - 1, when both ran alike: same device, precision
    and process count (the twin is the config's `baseline_config`: "baseline", or `mixup` for
    `mixup_ses`)."""
    b = twin_result(result, exp_dir)
    same = b is not None and all(b.get(k) == result.get(k) for k in ("device", "amp", "processes"))
    if same and (b.get("epoch_time_s") or 0) > 0:
        result["overhead"] = result["epoch_time_s"] / b["epoch_time_s"] - 1


def readable(result) -> bool:
    """Whether a result.json holds what the summary and its table read (a damaged copy may not)."""
    numbers = ("acc", "rob", "gap", "epoch_time_s", "images_per_s")
    return (isinstance(result, dict) and isinstance(result.get("config"), str) and isinstance(result.get("seed"), int)
            and all(isinstance(result.get(k), (int, float)) and not isinstance(result.get(k), bool) for k in numbers))


def summarize(exp_dir: Path, order: list[str]) -> dict:
    """Every finished run of the experiment folder (grid order, then seed), the failed and the unfinished."""
    def key(d: Path):
        variant, _, seed = d.name.rpartition("_seed")
        config = variant.split("+")[0]
        return (order.index(config) if config in order else len(order), variant, int(seed) if seed.isdigit() else 0)
    runs, failed, unfinished = [], [], []
    for d in sorted((p for p in exp_dir.iterdir() if p.is_dir() and "_seed" in p.name), key=key):
        if (d / "result.json").is_file():
            result = read_json(d / "result.json")
            if readable(result):
                runs.append(result)
                continue
            print(f"warning: {d / 'result.json'} cannot be read; {d.name} is listed as unfinished (--force with "
                  f"its --configs and --seeds trains it again)", file=sys.stderr)
            unfinished.append(d.name)
        elif (d / "failure.json").is_file():
            failure = read_json(d / "failure.json")
            failed.append(dict(run=d.name, **{k: v for k, v in (failure if isinstance(failure, dict) else
                                                                 {"message": "failure.json cannot be read"}).items()
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
