"""Results folder -> the paper's tables (Markdown + LaTeX booktabs) and plots.

    python report.py results                 # results/report.md, tables.tex, macros.tex, plots/
    python report.py results --reference results/paper_reference.json

Reads every <experiment>/<config>_seed<N>/result.json (and metrics.jsonl) under RESULTS_DIR.
Per experiment, one row per config: acc, rob, gap as mean +- std over seeds (std with n - 1,
omitted for a single seed), n, delta acc / delta rob against the config's twin, paired by seed, in
percentage points with a 95 % t-interval, overhead where measured, and the paper's figure beside ours where one exists. Final-epoch
numbers only: nothing is selected on the test set. Unfinished runs are listed, never averaged in.
The text outputs are made in reporting/tables.py (tables.tex fits one column; macros.tex holds one
\newcommand per headline number), the figures in reporting/plots.py (PDF and PNG; matplotlib optional).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from plumbing.files import write_text_atomic as write_text
from reporting.plots import plot_experiment
from reporting.tables import KIND_NOTE, latex, macros, markdown

METRICS = ("acc", "rob", "gap")


# ----------------------------------------------------------------------------- reading
def read_runs(root: Path) -> dict[str, dict]:
    """experiment -> {"runs": {config: [result, ...]}, "unfinished": [run names], "curves": {config: [metrics]}}."""
    out: dict[str, dict] = {}
    for exp_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in ("plots", "smoke", "synthetic")):
        exp = {"runs": {}, "unfinished": [], "failed": [], "curves": {}, "attention": {}}
        for run_dir in sorted(p for p in exp_dir.iterdir() if p.is_dir() and "_seed" in p.name):
            result = run_dir / "result.json"
            if not result.is_file():
                if (run_dir / "failure.json").is_file():
                    f = json.loads((run_dir / "failure.json").read_text())
                    exp["failed"].append(f"{run_dir.name} ({f.get('stage')}: {f.get('message')})")
                elif (run_dir / "config.json").is_file():
                    exp["unfinished"].append(run_dir.name)
                continue
            r = json.loads(result.read_text())
            r.setdefault("variant", r["config"])
            exp["runs"].setdefault(r["variant"], []).append(r)
            maps = sorted((run_dir / "attention").glob("epoch_*.pt"))
            if maps:
                exp["attention"][run_dir.name] = maps[-1]  # the latest saved epoch
            metrics = run_dir / "metrics.jsonl"
            if metrics.is_file():
                rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
                exp["curves"].setdefault(r["variant"], []).append(rows)
        order = config_order(exp_dir, list(exp["runs"]))
        exp["runs"] = {c: exp["runs"][c] for c in order}
        exp["curves"] = {c: exp["curves"][c] for c in order if c in exp["curves"]}
        if exp["runs"] or exp["unfinished"] or exp["failed"]:
            out[exp_dir.name] = exp
    return out


def read_runs_safe(root: Path) -> dict:
    return read_runs(root) if root.is_dir() else {}


def config_order(exp_dir: Path, configs: list[str]) -> list[str]:
    """The grid order recorded in summary.json, else baseline first and the rest alphabetical."""
    summary = exp_dir / "summary.json"
    listed = [r["config"] for r in json.loads(summary.read_text()).get("runs", [])] if summary.is_file() else []
    ranked = list(dict.fromkeys([c for c in listed if c in configs] + (["baseline"] if "baseline" in configs else [])))
    return ranked + sorted(c for c in configs if c not in ranked)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std (n - 1); std is None for a single value."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


# two-sided 95 % Student t quantiles t(0.975, df), df = n - 1
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t975(df: int) -> float:
    return T975.get(df) or T975[max(k for k in T975 if k <= df)] if df < 30 else 1.96 + 2.4 / df


def paired_delta(results: list[dict], twin: list[dict], metric: str):
    """(mean, (lo, hi) or None, n) of the per-seed differences in percentage points, seeds paired:
    n counts the pairs (seeds both have), which can be fewer than either side's runs."""
    by_seed = {r["seed"]: r[metric] for r in twin}
    deltas = [100 * (r[metric] - by_seed[r["seed"]]) for r in results if r["seed"] in by_seed]
    if not deltas:
        return None
    mu = statistics.fmean(deltas)
    if len(deltas) < 2:
        return mu, None, 1
    half = t975(len(deltas) - 1) * statistics.stdev(deltas) / len(deltas) ** 0.5
    return mu, (mu - half, mu + half), len(deltas)


def setting(r: dict) -> str:
    """How a run ran: precision, device, process count (runs of several machines can meet in one folder)."""
    procs = r.get("processes") or 1
    return f"{r.get('amp', '?')} on {r.get('device', '?')}" + (f" x{procs} processes" if procs > 1 else "")


def mix_of(results: list[dict]) -> str | None:
    """'bf16 on NVIDIA L40S (2), fp16 on Tesla T4 (1)' when the runs ran differently, else None."""
    counts: dict[str, int] = {}
    for r in results:
        counts[setting(r)] = counts.get(setting(r), 0) + 1
    return ", ".join(f"{k} ({v})" for k, v in sorted(counts.items())) if len(counts) > 1 else None


def pair_mix(results: list[dict], twin: list[dict]) -> str | None:
    """Where a config's runs and its twin's, seed by seed, ran differently: 'seed 0: fp16 on T4 vs bf16 on L40S'."""
    by_seed = {r["seed"]: r for r in twin}
    diffs = [f"seed {r['seed']}: {setting(r)} vs {setting(by_seed[r['seed']])}" for r in results
             if r["seed"] in by_seed and setting(r) != setting(by_seed[r["seed"]])]
    return "; ".join(diffs) or None


def summarize(runs: dict[str, list[dict]], reference: dict, kind: str | None = None) -> list[dict]:
    """One row per variant: means/stds in percent, and the Δ against the config's twin (its
    `baseline_config`, with the same overrides) paired by seed, with a 95 % CI when n >= 2 and its
    own n (pairs). `mixed` / `pair_mixed` say where the row's runs, or its pairs, differ in
    precision, device or process count. A paper figure is shown only for a real run whose
    settings are the config's own."""
    rows = []
    for variant, results in runs.items():
        config = results[0]["config"]
        twin_name = results[0].get("baseline_config", "baseline")
        twin_variant = variant.replace(config, twin_name, 1)
        twin = runs.get(twin_variant) if twin_name != config else None
        row = {"config": variant, "n": len(results), "seeds": sorted(r["seed"] for r in results)}
        for m in METRICS:
            mu, sd = mean_std([r[m] for r in results])
            row[m] = (100 * mu, None if sd is None else 100 * sd)
        overheads = [r["overhead"] for r in results if r.get("overhead") is not None]
        row["overhead"] = statistics.fmean(overheads) if overheads else None
        row["vs"] = twin_variant if twin else None
        row["d_acc"] = paired_delta(results, twin, "acc") if twin else None
        row["d_rob"] = paired_delta(results, twin, "rob") if twin else None
        row["mixed"] = mix_of(results)
        row["pair_mixed"] = pair_mix(results, twin) if twin else None
        row["paper"] = reference.get(config) if (kind is None and variant == config) else None
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results_dir", type=Path, help="the --out-dir of the experiment scripts (e.g. results)")
    p.add_argument("--reference", type=Path, default=Path(__file__).resolve().parent / "results" / "paper_reference.json",
                   help="the paper's reference numbers (default %(default)s)")
    args = p.parse_args(argv)
    if not args.results_dir.is_dir():
        p.exit(2, f"report.py: error: {args.results_dir} is not a folder; pass the --out-dir of a sweep\n")
    experiments = read_runs(args.results_dir)
    kind = args.results_dir.resolve().name if args.results_dir.resolve().name in KIND_NOTE else None
    if not experiments:
        elsewhere = [str(args.results_dir / k) for k in KIND_NOTE if read_runs_safe(args.results_dir / k)]
        hint = f"; only smoke/synthetic results here: run python report.py {elsewhere[0]}" if elsewhere else ""
        p.exit(1, f"report.py: error: no <experiment>/<config>_seed<N>/result.json under {args.results_dir}{hint}\n")
    reference = json.loads(args.reference.read_text()) if args.reference.is_file() else {}
    tables = {exp: summarize(d["runs"], reference.get(exp, {}), kind) for exp, d in experiments.items()}
    write_text(args.results_dir / "report.md", markdown(experiments, tables, kind))
    write_text(args.results_dir / "tables.tex", latex(experiments, tables, kind))
    write_text(args.results_dir / "macros.tex", macros(tables, kind))
    print(f"wrote {args.results_dir / 'report.md'}, tables.tex and macros.tex")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib, or -r requirements-dev.txt)")
        return 0
    plots = args.results_dir / "plots"
    plots.mkdir(exist_ok=True)
    written = [f for exp, d in experiments.items() for f in plot_experiment(plt, exp, d, plots)]
    print(f"wrote {len(written) // 2} figures to {plots} (PDF and PNG)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
