r"""Results folder -> the paper's tables (Markdown + LaTeX booktabs), macros, a tidy CSV and figures.

    python report.py results                    # results/report.md, tables.tex, macros.tex, runs.csv, plots/
    python report.py results/smoke              # the smoke runs (marked SMOKE everywhere)
    python report.py results --venue icml2024   # figures in a venue's style (needs tueplots)

Reads every <experiment>/<config>_seed<N>/ under RESULTS_DIR. Per experiment: the paper's own
table (Config | Acc (%) | Rob (%) | Overhead, display names, the paper's figures beside ours for
real runs), the full table (n, mean ± std over seeds with n − 1, Δ against the named twin paired
by seed with its 95 % t-interval, the seeds that interval needs to exclude 0), the robustness
suite, and Exp 12's interaction. Overhead is the median over seeds of each seed's epoch time ÷
its twin's − 1, with its range and the device and precision it was measured on. Final-epoch
numbers only: nothing is selected on the test set. macros.tex holds one \newcommand per headline
number; runs.csv one row per run; plots/ the figures (PDF + PNG, text width and one column).

Each run says what it trained on (result.json's `data`; for older runs config.json's smoke sizes or
command line, else the smoke/ or synthetic/ folder the scripts write it under): an experiment of
smoke or synthetic runs is marked so in every table, caption, macro comment and figure, and never
shows the paper's figures; one of real runs leaves its generated runs out, one line each.

Whatever the folder holds (any seeds, files cut short, NaN or null values, failed or unfinished
runs), the report makes every table and figure it can and prints one line per thing it left out;
exit 0. Exit 1: nothing to report under RESULTS_DIR; exit 2: a bad argument (one line).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_utils import DATASETS
from harness.settings import SETTINGS
from perceiver.modelnet40 import MODELNET40
from plumbing.files import write_text_atomic as write_text
from reporting.csvout import runs_csv
from reporting.figures import figures_md, make_figures
from reporting.labels import KIND_NOTE, use_input_kinds, use_setting_labels
from reporting.macros import macros
from reporting.read import load_json, read_results
from reporting.rows import summarize
from reporting.style import WIDTHS_IN, Look
from reporting.tables import latex, markdown, tables_of

POINT_CLOUDS = {"modelnet40": MODELNET40}  # the name exp13_perceiver.py registers its dataset under

DEFAULT_REFERENCE = Path(__file__).resolve().parent / "results" / "paper_reference.json"


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results_dir", type=Path, help="the --out-dir of the experiment scripts (e.g. results)")
    p.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE,
                   help="the paper's reference numbers (default %(default)s)")
    p.add_argument("--venue", default="plain",
                   help="figure style: plain (default) or a tueplots bundle, e.g. icml2024, neurips2024, aaai2024")
    p.add_argument("--widths", nargs="+", choices=list(WIDTHS_IN), default=list(WIDTHS_IN),
                   help="figure widths: text (6.75 in) and/or column (3.25 in) (default both)")
    p.add_argument("--formats", nargs="+", choices=["pdf", "png", "svg"], default=["pdf", "png"],
                   help="figure formats (default pdf png)")
    p.add_argument("--dpi", type=int, default=300, help="PNG resolution (default %(default)s)")
    p.add_argument("--no-figures", action="store_true", help="tables, macros and CSV only")
    return p, p.parse_args(argv)


def reference_numbers(path: Path) -> tuple[dict, str]:
    ref, why = load_json(path)
    if not isinstance(ref, dict):
        if path != DEFAULT_REFERENCE or why != f"{path.name} is missing":
            print(f"note: {why or f'{path} is not a JSON object'}; no paper figures shown")
        return {}, ""
    source = str(ref.get("_source", ""))  # '... Exp 10: Periodic SES, CIFAR-100, ResNet-18, Kaggle T4. ...'
    return ref, source.split(":", 1)[1].split(".")[0].strip() if ":" in source else path.name


def figures(args, look: Look, experiments, rows_of) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib, or -r requirements-dev.txt)")
        return ""
    plots = args.results_dir / "plots"
    plots.mkdir(exist_ok=True)
    written, captions, problems = make_figures(plt, experiments, rows_of, plots, look, args.widths, args.formats,
                                               args.dpi)
    if look.note:
        print(look.note)
    for line in problems:
        print(f"left out: {line}")
    print(f"wrote {len(written)} figure files to {plots} ({', '.join(args.formats)}; {' and '.join(args.widths)} width)")
    return figures_md(captions, args.widths, args.formats, look)


def main(argv=None) -> int:
    p, args = parse(argv)
    if not args.results_dir.is_dir():
        p.exit(2, f"report.py: error: {args.results_dir} is not a folder; pass the --out-dir of a sweep\n")
    if args.dpi < 10:
        p.exit(2, "report.py: error: --dpi must be at least 10\n")
    try:
        look = Look(args.venue)
    except ValueError as e:
        p.exit(2, f"report.py: error: {e}\n")
    experiments, skipped = read_results(args.results_dir)
    use_setting_labels({name: SETTINGS.label(name) for name in SETTINGS},
                       {v: labels for e in experiments.values() for v, labels in e["setting_labels"].items()})
    use_input_kinds({name: info.get("kind", "image") for name, info in {**DATASETS, **POINT_CLOUDS}.items()})
    if not experiments:
        elsewhere = [str(args.results_dir / k) for k in KIND_NOTE
                     if (args.results_dir / k).is_dir() and read_results(args.results_dir / k)[0]]
        hint = f"; only smoke/synthetic results here: run python report.py {elsewhere[0]}" if elsewhere else ""
        p.exit(1, f"report.py: error: no <experiment>/<config>_seed<N>/ run folder under {args.results_dir}{hint}\n")
    for line in skipped:
        print(f"left out: {line}")
    reference, source = reference_numbers(args.reference)
    paper = {exp: reference[exp] for exp in experiments if isinstance(reference.get(exp), dict)}
    rows_of = {exp: summarize(d, paper.get(exp, {})) for exp, d in experiments.items()}
    tables = {exp: tables_of(exp, rows, experiments[exp], source, exp in paper, paper.get(exp))
              for exp, rows in rows_of.items()}
    write_text(args.results_dir / "tables.tex", latex(experiments, tables))
    write_text(args.results_dir / "macros.tex", macros(experiments, rows_of))
    write_text(args.results_dir / "runs.csv", runs_csv(experiments))
    figures_text = "" if args.no_figures else figures(args, look, experiments, rows_of)
    write_text(args.results_dir / "report.md", markdown(experiments, tables, skipped, figures_text))
    print(f"wrote {args.results_dir / 'report.md'}, tables.tex, macros.tex and runs.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
