"""The report's tables, each once as content and rendered twice: report.md and tables.tex.

Per experiment (rows from reporting.rows):
- brief: the paper's own form, `Config | Acc (%) | Rob (%) | Overhead`, display names, and the
  paper's figures beside ours (marked: a "Paper" column group) for a real run of the config's
  own settings, and a row of the paper's figures alone (n=0) for a config it reports and no run
  here has. Overhead: the median over seeds of each seed's epoch time ÷ its twin's − 1, with
  [min, max] over seeds and the device and precision it was measured on.
- full: n, mean ± std, Δ against the named twin with its paired 95 % interval, and the seeds at
  which that interval would exclude 0 at the observed paired spread.
- robustness: accuracy under each perturbation of result.json's robustness suite.
- interaction (exp12): SES's gain with each augmentation and, paired by seed, its difference from
  SES's gain without one.
The cells and their marks are reporting/cells.py's: "(n=2)" after a name (brief and robustness
tables, which have no n column) says a row averages fewer seeds than the table's n. An experiment of
generated data (reporting.read's `kind`: smoke, synthetic) is marked in its heading and every
caption, and its brief table has no paper columns.
"""
from __future__ import annotations

from typing import NamedTuple

from reporting.labels import KIND_NOTE, METRICS, display, display_tex, experiment_caption, experiment_name
from reporting.labels import robustness_label
from reporting.latex import TEXTWIDTH_PT, render, tex_escape, tex_width_pt, to_tex  # noqa: F401  (tests measure with these)
from reporting.cells import DASH, delta, name_cell, notes_of, overhead, paper_cell, seeds, spread
from reporting.rows import interactions

class Table(NamedTuple):
    key: str                       # "" for the brief table (label tab:<exp>), else tab:<exp>-<key>
    title: str
    caption: str                   # LaTeX
    caption_md: str
    header: list[tuple[str, str]]
    rows: list[list[tuple[str, str]]]
    notes: list[tuple[str, str]]
    groups: list[tuple[int, str]] | None = None   # LaTeX column groups after the first column
    md: tuple[list[str], list[list[str]]] | None = None  # Markdown's own header and rows, where they differ


# ----------------------------------------------------------------------------- tables
def seeds_phrase(rows: list[dict], named: bool = False) -> str:
    """How many seeds each mean holds; `named`: a row with fewer says so after its name (n=2)."""
    ns = sorted({r["n"] for r in rows if r["n"]})  # a row of the paper's figures alone (n = 0) holds no seeds
    if ns == [1]:
        return "one seed (no spread)"
    if len(ns) == 1:
        return f"mean ± std over n = {ns[0]} seeds"
    return (f"mean ± std over n = {ns[-1]} seeds, fewer where a row's name says (n=…)" if named
            else "mean ± std over the n seeds of each row")


def most_seeds(rows: list[dict]) -> int:
    return max(r["n"] for r in rows)


def twins_phrase(rows: list[dict]) -> str:
    """'Baseline' or 'Baseline for SES, Mixup; Mixup for Mixup + SES': each overhead's reference."""
    by_twin: dict[str, list[str]] = {}
    for r in rows:
        if r["twin"] and r["overhead"]:
            by_twin.setdefault(display(r["twin"]), []).append(display(r["variant"]))
    if len(by_twin) == 1:
        return next(iter(by_twin))
    return "; ".join(f"{t} for {', '.join(vs)}" for t, vs in by_twin.items()) or "the config without SES"


def with_paper_rows(rows: list[dict], reference: dict) -> list[dict]:
    """rows, plus a row of the paper's figures alone (n = 0) for each config the paper reports and no run
    here has, where the paper's order puts it: the brief table keeps the paper's rows."""
    order = [c for c, v in reference.items() if isinstance(v, dict)]
    out, have = list(rows), {r["variant"] for r in rows}
    for i, config in enumerate(order):
        if config not in have:
            before = set(order[:i])
            at = max((j + 1 for j, r in enumerate(out) if r["variant"] in before), default=0)
            out.insert(at, dict(variant=config, config=config, twin=None, n=0, acc=None, rob=None, overhead=None,
                                setting="", paper=reference[config]))
    return out


def brief_table(exp: str, rows: list[dict], reference_source: str, in_paper: bool = False) -> Table:
    """in_paper: the paper has figures for this experiment (its title then names it the paper's table)."""
    paper = any(r["paper"] for r in rows)
    header = [("Config", "Config"), ("Acc (%)", "Acc (\\%)"), ("Rob (%)", "Rob (\\%)"), ("Overhead", "Overhead")]
    body = [[name_cell(r, of=most_seeds(rows)), spread(r["acc"], n=r["n"]), spread(r["rob"], n=r["n"]),
             overhead(r["overhead"])] for r in rows]
    if paper:
        header += [("Paper acc (%)", "Acc (\\%)"), ("Paper rob (%)", "Rob (\\%)"), ("Paper overhead", "Overhead")]
        for cells, r in zip(body, rows):
            cells += [paper_cell(r["paper"], k) for k in ("acc", "rob", "overhead")]
    settings = sorted({r["setting"] for r in rows if r["overhead"]})
    where = f", measured in {settings[0]}" if len(settings) == 1 else " (where each was measured: below the table)"
    text = (f"Final-epoch test accuracy (Acc) and accuracy under Gaussian noise σ = 0.1 (Rob), "
            f"{seeds_phrase(rows, named=True)}. "
            f"Overhead: the median over seeds of each seed's training time per epoch ÷ that of the same seed's twin "
            f"({twins_phrase(rows)}) − 1, [min, max] over seeds{where}; ° marks a range that contains 0 (a cost "
            f"within timing noise).")
    if paper:
        text += f" Paper: the paper's own figures ({reference_source}), not measured here."
    if any(r["n"] == 0 for r in rows):
        text += " (n=0): no run of that config in this results folder; the paper's figures only."
    title = "the paper's table" if in_paper else "accuracy, robustness and overhead"
    return Table("", f"{experiment_name(exp)}: {title}", to_tex(experiment_caption(exp) + " " + text), text,
                 header, body, notes_of(rows, settings=True), [(3, "This report"), (3, "Paper")] if paper else None)


def full_table(exp: str, rows: list[dict]) -> Table:
    header = [("Config", "Config"), ("n", "$n$"), ("Acc (%)", "Acc (\\%)"), ("Rob (%)", "Rob (\\%)"),
              ("Gap (pp)", "Gap (pp)"), ("Δ acc (pp)", "$\\Delta$Acc"), ("Δ rob (pp)", "$\\Delta$Rob"),
              ("Seeds Δ acc / Δ rob", "Seeds")]
    body = []
    for r in rows:
        pairs = r["d_acc"].n if r["d_acc"] and r["d_acc"].n != r["n"] else None
        n = (f"{r['n']} (Δ: {pairs})", f"{r['n']}/{pairs}") if pairs else (str(r["n"]), str(r["n"]))
        need = (f"{seeds(r['d_acc'])[0]} / {seeds(r['d_rob'])[0]}",
                f"{seeds(r['d_acc'])[1]}\\newline{seeds(r['d_rob'])[1]}") if r["d_acc"] or r["d_rob"] else DASH
        body.append([name_cell(r, True), n] + [spread(r[m], n=r["n"]) for m, _ in METRICS]
                    + [delta(r["d_acc"]), delta(r["d_rob"]), need])
    def text(md: bool) -> str:  # the caption, in the words of each format's cells
        return (f"{seeds_phrase(rows)}; gap = train − test accuracy. Δ: the per-seed difference against the "
                f"config's twin (named after vs.), in percentage points: mean, and "
                + ("the 95 % Student-t interval (n − 1) of the paired differences" if md else
                   "± the half-width of the 95 % Student-t interval (n − 1) of the paired differences")
                + "; ° marks an interval that contains 0, a difference not distinguishable from seed noise. n: runs, "
                + ("and in brackets (Δ: …) the seed pairs behind Δ where fewer" if md else
                   "and after a slash the seed pairs behind Δ where fewer")
                + ". Seeds: the number of seeds at which the interval of "
                + ("Δ acc / Δ rob" if md else "Δ acc (upper line) and of Δ rob (lower line)")
                + " would exclude 0 if its mean and paired spread stayed as observed.")
    md_header = ["config", "name", "vs"] + [c[0] for c in header[1:]]
    md_rows = [[r["variant"], cells[0][0], display(r["twin"]) if r["twin"] else "—"] + [c[0] for c in cells[1:]]
               for r, cells in zip(rows, body)]
    tex = text(md=False)
    return Table("full", f"{experiment_name(exp)}: every config against its twin",
                 to_tex(experiment_caption(exp) + " " + tex[0].upper() + tex[1:]), text(md=True), header, body,
                 notes_of(rows), md=(md_header, md_rows))


PERTURBED = {"image": "[0, 1] pixels, clamped to [0, 1]",
             "points": "the xyz coordinates of the points (in the unit sphere), not clamped"}


def perturbations(rows: list[dict]) -> str:
    """What the suite perturbs, for each kind of input the rows have (images, point clouds)."""
    kinds = list(dict.fromkeys(r["input"] for r in rows))
    what = {k: f"additive Gaussian noise of std σ (the same for every model) and FGSM of step ε (one "
               f"signed-gradient step, float32), both on {PERTURBED[k]}" for k in kinds}
    if len(kinds) == 1:
        return what[kinds[0]]
    return "; ".join(f"{'images' if k == 'image' else 'point clouds'} "
                     f"({', '.join(display(r['variant']) for r in rows if r['input'] == k)}): {what[k]}" for k in kinds)


def robustness_table(exp: str, rows: list[dict]) -> Table | None:
    keys = list(dict.fromkeys(k for r in rows for k in r["robustness"]))
    if not keys:
        return None
    header = [("Config", "Config"), ("Clean", "Clean")] + [(robustness_label(k), to_tex(robustness_label(k)))
                                                            for k in keys]
    body = [[name_cell(r, of=most_seeds(rows)), spread(r["acc"], n=r["n"])]
            + [spread(r["robustness"].get(k), n=r["n"]) for k in keys] for r in rows]
    text = (f"Test accuracy (%) under the robustness suite, {seeds_phrase(rows, named=True)}: clean; "
            f"{perturbations(rows)}.")
    return Table("robustness", f"{experiment_name(exp)}: robustness suite",
                 to_tex(experiment_caption(exp) + " " + text), text, header, body, notes_of(rows))


def interaction_table(exp: str, items: list[dict]) -> Table | None:
    if not items:
        return None
    header = [("Pair", "Pair"), ("SES gain Δ acc", "$\\Delta$Acc"), ("SES gain Δ rob", "$\\Delta$Rob"),
              ("Interaction ΔΔ acc", "$\\Delta\\Delta$Acc"), ("Interaction ΔΔ rob", "$\\Delta\\Delta$Rob")]
    body = [[(f"{display(it['row']['variant'])} vs. {display(it['twin'])}",
              f"{display_tex(it['row']['variant'])}\\newline{{\\scriptsize vs.\\ {display_tex(it['twin'])}}}"),
             delta(it["row"]["d_acc"]), delta(it["row"]["d_rob"]), delta(it["interaction_acc"]),
             delta(it["interaction_rob"])] for it in items]
    ref = items[0]
    text = (f"SES's gain with each augmentation: the per-seed difference between the SES config and its twin, in "
            f"percentage points (mean and 95 % interval, n − 1). Interaction ΔΔ: per seed, that gain minus the "
            f"gain of {display(ref['row']['variant'])} over {display(ref['twin'])} (no augmentation), paired over the "
            f"seeds all four runs have; above 0, SES adds more on top of the augmentation than without it. ° marks "
            f"an interval that contains 0.")
    return Table("interaction", f"{experiment_name(exp)}: does SES add to the augmentation?",
                 to_tex(experiment_caption(exp) + " " + text), text, header, body, [])


def tables_of(exp: str, rows: list[dict], experiment: dict, reference_source: str,
              in_paper: bool = False, reference: dict | None = None) -> list[Table]:
    """reference: the paper's figures of this experiment by config (a real run's brief table keeps each row)."""
    if not rows:
        return []
    brief_rows = with_paper_rows(rows, reference or {}) if experiment["kind"] is None else rows
    made = [brief_table(exp, brief_rows, reference_source, in_paper), full_table(exp, rows), robustness_table(exp, rows),
            interaction_table(exp, interactions(experiment, rows))]
    return [t for t in made if t is not None]


# ----------------------------------------------------------------------------- the two files
def md_table(t: Table) -> list[str]:
    header, rows = t.md or ([c[0] for c in t.header], [[c[0] for c in r] for r in t.rows])
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + ([""] + [n[0] for n in t.notes] if t.notes else [])


ROB = (f"acc = clean test top-1; rob = top-1 under additive Gaussian noise σ = 0.1, the same for every model: on "
       f"{PERTURBED['image']}, for images; on {PERTURBED['points']}, for point clouds (ModelNet40). The paper's notes "
       f"do not define their rob; this is the suite's definition.")


def kind_title(experiments: dict) -> tuple[str, str | None]:
    """The report's title mark, and the one kind of generated data every experiment has (else None)."""
    kinds = {e["kind"] for e in experiments.values()}
    if len(kinds) == 1 and None not in kinds:
        kind = next(iter(kinds))
        return f" ({kind.upper()}: not paper numbers)", kind
    generated = sorted(k.upper() for k in kinds if k)
    return (f" (some experiments {' and '.join(generated)}: marked)" if generated else ""), None


def markdown(experiments: dict, tables: dict, skipped: list[str], figures: str = "") -> str:
    mark, everywhere = kind_title(experiments)
    out = ["# SES results" + mark, ""]
    out += [f"**{KIND_NOTE[everywhere]}**", ""] if everywhere else []
    out += ["Final-epoch numbers only; nothing is selected on the test set. " + ROB, ""]
    for exp, ts in tables.items():
        kind = experiments[exp]["kind"]
        out += [f"## {experiment_name(exp)} (`{exp}`)" + (f": {kind.upper()}" if kind else ""), ""]
        out += [f"**{KIND_NOTE[kind]}**", ""] if kind and not everywhere else []
        out += [experiment_caption(exp), ""]
        for t in ts:
            out += [f"### {t.title}", "", t.caption_md, ""] + md_table(t) + [""]
        if experiments[exp]["unfinished"]:
            out += [f"Unfinished (not averaged in): {', '.join(experiments[exp]['unfinished'])}", ""]
        if experiments[exp]["failed"]:
            out += ["Failed (not averaged in; rerun the same command to retry):"]
            out += [f"- {f}" for f in experiments[exp]["failed"]] + [""]
    if skipped:
        out += ["## Left out", "", "What the results folder holds that the report could not use, one line per run:", ""]
        out += [f"- {line}" for line in skipped] + [""]
    return "\n".join(out + ([figures] if figures else []))


def latex(experiments: dict, tables: dict) -> str:
    out = ["% Generated by report.py; needs \\usepackage{booktabs}. \\input{tables.tex} in the paper.",
           "% A table* spans both columns of a two-column article; in a one-column article it is a plain table."]
    for exp, ts in tables.items():
        kind = experiments[exp]["kind"]
        for t in ts:
            label = f"tab:{exp}" + (f"-{t.key}" if t.key else "")
            caption = (f"{kind.upper()} RESULTS, NOT PAPER NUMBERS. " if kind else "") + t.caption
            out += ["", render(t._replace(caption=caption), label)]
        out += [f"% unfinished run, not averaged in: {u}" for u in experiments[exp]["unfinished"]]
        out += [f"% failed run, not averaged in: {tex_escape(f)}" for f in experiments[exp]["failed"]]
    return "\n".join(out) + "\n"
