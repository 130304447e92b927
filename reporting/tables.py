"""The report's text outputs: report.md, tables.tex (booktabs, one column wide) and macros.tex.

Rows come from report.summarize(): acc/rob/gap as (mean, std) in percent, `d_acc`/`d_rob` as
(mean, (lo, hi) or None, n) paired-by-seed differences in percentage points, overhead as a fraction.

LaTeX layout, made to fit one column of a 10 pt article (\\textwidth = 345 pt): \\footnotesize,
\\tabcolsep 2.5 pt, a wrapping config column of CONFIG_COL_PT, spreads as subscripts with one
decimal ($77.00_{\\pm 2.6}$), Δ as mean ± the half-width of its 95 % t-interval, and the paper's
figure on its own row under ours.
`tex_width_pt` estimates a table's natural width from Computer Modern metrics; the tests hold
every table to 345 pt with it, and compile it with pdflatex where that is installed.
"""
from __future__ import annotations

import re

CAPTIONS = {
    "exp10_periodic_ses": "Periodic SES on CIFAR-100 (ResNet-18): SES applied every $k$-th step.",
    "exp11_resnet50_tinyimagenet": "ResNet-50 on Tiny-ImageNet: baseline vs SES on layer4 + avgpool.",
    "exp12_mixup_cutmix_cifar100": "SES combined with Mixup and CutMix on CIFAR-100 (ResNet-18).",
    "exp13_perceiver": "Perceiver on CIFAR-10 and ModelNet40, with and without SES on the latents.",
}
KIND_NOTE = {"smoke": "SMOKE RESULTS: tiny generated data, 2 epochs; they test the pipeline and say nothing about SES.",
             "synthetic": "SYNTHETIC RESULTS: generated data of the real shapes; for timing and memory only."}
TEXTWIDTH_PT = 345.0   # \textwidth of a single-column 10 pt article (letter or A4)
CONFIG_COL_PT = 66.0   # the config column wraps at '_' and '+' beyond this
TABCOLSEP_PT = 2.5
FONT_PT = 8.0 * 1.06   # \footnotesize: cmr8, about 6 % wider per em than cmr10 scaled down


# ----------------------------------------------------------------------------- Markdown
def fmt_ms(ms, tex=False) -> str:
    mu, sd = ms
    if sd is None:
        return f"${mu:.2f}$" if tex else f"{mu:.2f}"
    return f"${mu:.2f}_{{\\pm {sd:.1f}}}$" if tex else f"{mu:.2f} ± {sd:.2f}"


def fmt_delta(v, tex=False) -> str:
    """Markdown: +5.00 [+2.52, +7.48], '~0' when the interval contains 0 (within seed noise).
    LaTeX: $+5.00_{\\pm 2.5}$ (the interval's half-width), a circle when it contains 0."""
    if v is None:
        return "--" if tex else "—"
    mu, ci, _ = v
    if ci is None:
        return f"${mu:+.2f}$" if tex else f"{mu:+.2f}"
    noise = ci[0] <= 0 <= ci[1]
    if tex:
        return f"${mu:+.2f}_{{\\pm {(ci[1] - ci[0]) / 2:.1f}}}" + ("^\\circ$" if noise else "$")
    return f"{mu:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]" + (" ~0" if noise else "")


def fmt_overhead(v, tex=False) -> str:
    if v is None:
        return "--" if tex else "—"
    return f"${100 * v:+.0f}\\,\\%$" if tex else f"{100 * v:+.0f} %"


def fmt_paper(p) -> str:
    if not p:
        return "—"
    text = f"{p['acc']:.2f} / {p['rob']:.2f}"
    return text + (f" ({fmt_overhead(p['overhead'])})" if p.get("overhead") is not None else "")


def delta_n(r: dict) -> int | None:
    """The number of seed pairs behind the row's Δ, where it is fewer than the row's runs."""
    d = r.get("d_acc")
    return d[2] if d is not None and d[2] != r["n"] else None


def marks(r: dict, tex: bool = False) -> str:
    """† the row's runs ran differently (precision, device, processes); ‡ its pairs with the twin did."""
    dagger, ddagger = ("$^\\dagger$", "$^\\ddagger$") if tex else (" †", " ‡")
    return (dagger if r.get("mixed") else "") + (ddagger if r.get("pair_mixed") else "")


def mix_notes(rows: list[dict], tex: bool = False) -> list[str]:
    """One line per † / ‡ mark: what the runs of that row, or of its pairs, ran on."""
    esc = tex_escape if tex else (lambda text: text)
    notes = []
    for r in rows:
        name = tex_escape(r["config"]) if tex else f"`{r['config']}`"
        if r.get("mixed"):
            notes.append(("$^\\dagger$" if tex else "†") + f" {name} averages runs that ran differently: {esc(r['mixed'])}.")
        if r.get("pair_mixed"):
            notes.append(("$^\\ddagger$" if tex else "‡") + f" {name} vs its twin: {esc(r['pair_mixed'])}.")
    return notes


def markdown(experiments: dict, tables: dict, kind: str | None = None) -> str:
    out = ["# SES results" + (f" ({kind.upper()}: not paper numbers)" if kind else ""), ""]
    out += [f"**{KIND_NOTE[kind]}**", ""] if kind else []
    out += ["Mean ± std over seeds (std with n − 1, omitted for one seed); final epoch; "
            "acc = clean test top-1; rob = our definition: top-1 under additive Gaussian noise σ = 0.1 on [0, 1] "
            "pixels (on point coordinates for ModelNet40), clamped, fixed noise seed; the paper's rob figures were "
            "measured under the paper's own definition. gap = train_acc − acc. Δ = per-seed difference against the "
            "config's twin (`mixup_ses` vs `mixup`, `ses` vs `baseline`), in percentage points: mean, and the 95 % "
            "Student-t interval (n − 1) when n ≥ 2; ~0 marks an interval containing 0 (within seed noise). "
            "overhead = median epoch time ÷ the twin's − 1. n = runs; where fewer seeds pair with the twin, "
            "n says `3 (Δ: 2)`: the Δ stands on 2 pairs. † a row averages runs of different precision, device "
            "or process count; ‡ a row's runs and its twin's differ so (listed under the table).", ""]
    for exp, rows in tables.items():
        out += [f"## {exp}", "", CAPTIONS.get(exp, ""), "",
                "| config | n | acc (%) | rob (%) | gap (pp) | Δ acc | Δ rob | overhead | paper acc / rob |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            n = f"{r['n']}" + (f" (Δ: {delta_n(r)})" if delta_n(r) else "")
            out.append(f"| {r['config']}{marks(r)} | {n} | {fmt_ms(r['acc'])} | {fmt_ms(r['rob'])} | {fmt_ms(r['gap'])} | "
                       f"{fmt_delta(r['d_acc'])} | {fmt_delta(r['d_rob'])} | {fmt_overhead(r['overhead'])} | "
                       f"{fmt_paper(r['paper'])} |")
        notes = mix_notes(rows)
        if notes:
            out += [""] + notes
        if experiments[exp]["unfinished"]:
            out += ["", f"Unfinished (not averaged in): {', '.join(experiments[exp]['unfinished'])}"]
        if experiments[exp]["failed"]:
            out += ["", "Failed (not averaged in; rerun the same command to retry):"]
            out += [f"- {f}" for f in experiments[exp]["failed"]]
        out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------- LaTeX
def tex_escape(s: str) -> str:
    return s.replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("%", "\\%").replace("&", "\\&")


def tex_config(name: str) -> str:
    """A config name that may wrap after '_' and '+' in the fixed-width first column."""
    return "\\raggedright " + tex_escape(name).replace("\\_", "\\_\\allowbreak{}").replace("+", "+\\allowbreak{}")


HEADER = ["Config", "$n$", "Acc (\\%)", "Rob (\\%)", "Gap (pp)", "$\\Delta$Acc", "$\\Delta$Rob", "Ovh."]


def table_cells(rows: list[dict]) -> list[list[str]]:
    """The body rows of one table (a paper row under each of our rows that has a paper figure)."""
    body = []
    for r in rows:
        n = f"{r['n']}/{delta_n(r)}" if delta_n(r) else str(r["n"])
        body.append([tex_config(r["config"]) + marks(r, True), n, fmt_ms(r["acc"], True), fmt_ms(r["rob"], True),
                     fmt_ms(r["gap"], True), fmt_delta(r["d_acc"], True), fmt_delta(r["d_rob"], True),
                     fmt_overhead(r["overhead"], True)])
        p = r.get("paper")
        if p:
            body.append(["\\quad\\textit{paper}", "", f"${p['acc']:.2f}$", f"${p['rob']:.2f}$", "", "", "",
                         fmt_overhead(p.get("overhead"), True)])
    return body


def caption(exp: str, rows: list[dict], kind: str | None) -> str:
    n_seeds = sorted({r["n"] for r in rows})
    if n_seeds == [1]:
        seeds = "one seed (no spread)"
    elif len(n_seeds) == 1:
        seeds = f"mean $\\pm$ std over $n = {n_seeds[0]}$ seeds"
    else:
        seeds = "mean $\\pm$ std over the $n$ seeds of each row"
    text = (f"{CAPTIONS.get(exp, tex_escape(exp))} Final-epoch test accuracy (Acc), accuracy under our Gaussian "
            f"noise $\\sigma = 0.1$ (Rob; the paper's figures use its own definition) and train--test gap, {seeds}. "
            f"$\\Delta$: paired per-seed difference vs.\\ the config's twin in percentage points"
            + ("" if n_seeds == [1] else ", $\\pm$ the half-width of its 95\\,\\% $t$-interval ($^\\circ$: the "
                                         "interval contains 0)")
            + (". $n$: runs, and after a slash the seed pairs behind $\\Delta$ where fewer" if any(delta_n(r) for r in rows)
               else "")
            + ". Ovh.: training time per epoch vs.\\ the twin; \\textit{paper}: the paper's figures.")
    return f"{kind.upper()} RESULTS, NOT PAPER NUMBERS. " + text if kind else text


def latex(experiments: dict, tables: dict, kind: str | None = None) -> str:
    out = ["% Generated by report.py; needs \\usepackage{booktabs}. \\input{tables.tex} in the paper."]
    for exp, rows in tables.items():
        out += ["", "\\begin{table}[t]", "\\centering", "\\footnotesize", f"\\setlength{{\\tabcolsep}}{{{TABCOLSEP_PT}pt}}",
                f"\\caption{{{caption(exp, rows, kind)}}}", f"\\label{{tab:{exp}}}",
                f"\\begin{{tabular}}{{@{{}}p{{{CONFIG_COL_PT:g}pt}}rrrrrrr@{{}}}}",
                "\\toprule", " & ".join(HEADER) + " \\\\", "\\midrule"]
        out += [" & ".join(cells) + " \\\\" for cells in table_cells(rows)]
        out += ["\\bottomrule", "\\end{tabular}"]
        notes = mix_notes(rows, tex=True)
        if notes:
            out += ["\\par\\smallskip\\raggedright"] + [n + " \\\\" for n in notes[:-1]] + notes[-1:]
        out += ["\\end{table}"]
        out += [f"% unfinished run, not averaged in: {u}" for u in experiments[exp]["unfinished"]]
        out += [f"% failed run, not averaged in: {f}" for f in experiments[exp]["failed"]]
    return "\n".join(out) + "\n"


# Computer Modern (cmr10/cmmi10/cmsy10) advance widths in em, for the characters our cells use.
_EM = {**dict.fromkeys("0123456789", 0.5), ".": 0.2778, ",": 0.2778, "+": 0.7778, "-": 0.7778, "±": 0.7778,
       "%": 0.8333, "_": 0.5, " ": 0.3333, "(": 0.3889, ")": 0.3889, "[": 0.2778, "]": 0.2778, "/": 0.5,
       "=": 0.7778, "Δ": 0.8333, "∘": 0.35, "thin": 0.1667, "quad": 1.0,
       **dict(zip("abcdefghijklmnopqrstuvwxyz", (0.5, 0.5556, 0.4444, 0.5556, 0.4444, 0.3056, 0.5, 0.5556, 0.2778,
                                                0.3056, 0.5278, 0.2778, 0.8333, 0.5556, 0.5, 0.5556, 0.5278, 0.3917,
                                                0.3944, 0.3889, 0.5556, 0.5278, 0.7222, 0.5278, 0.5278, 0.4444)))}


def text_width_pt(cell: str, font_pt: float = FONT_PT) -> float:
    """Natural width of one cell's LaTeX (the subset we write), from Computer Modern metrics."""
    s = cell.replace("\\allowbreak{}", "").replace("\\raggedright ", "").replace("\\_", "_").replace("\\%", "%")
    s = s.replace("\\pm ", "±").replace("\\Delta", "Δ").replace("\\textit", "")
    subs = re.findall(r"_\{([^}]*)\}", s)  # script size: 6 of 8 pt; a ^\circ stacks above it
    s = re.sub(r"_\{[^}]*\}", "", s).replace("^\\circ", "" if subs else "∘")
    script = sum(_EM.get(ch, 0.75) for sub in subs for ch in sub) * 0.75
    em = s.count("\\,") * _EM["thin"] + s.count("\\quad") * _EM["quad"]
    s = re.sub(r"\\,|\\quad|[{}$]", "", s)
    em += sum(_EM.get(ch, 0.75) for ch in s) + script  # capitals and anything unlisted: 0.75 em
    return em * font_pt


def tex_width_pt(body: list[list[str]]) -> float:
    """The tabular's natural width: the fixed config column, the widest cell of each other column
    (header included), and 2 * tabcolsep between columns (none outside: @{})."""
    cols = list(zip(HEADER, *body))
    widths = [CONFIG_COL_PT] + [max(text_width_pt(c) for c in col) for col in cols[1:]]
    return sum(widths) + 2 * TABCOLSEP_PT * (len(widths) - 1)


# ----------------------------------------------------------------------------- macros
_WORDS = ("Zero One Two Three Four Five Six Seven Eight Nine Ten Eleven Twelve Thirteen Fourteen Fifteen "
          "Sixteen Seventeen Eighteen Nineteen Twenty").split()


def macro_part(text: str) -> str:
    """'ses_k1+every=3' -> 'SesKOneEveryThree' (LaTeX command names take letters only)."""
    words = []
    for tok in re.findall(r"[A-Za-z]+|\d+", text):
        if tok.isdigit():
            words.append(_WORDS[int(tok)] if int(tok) < len(_WORDS) else "".join(_WORDS[int(d)] for d in tok))
        else:
            words.append(tok[0].upper() + tok[1:].lower())
    return "".join(words)


def macros(tables: dict, kind: str | None = None) -> str:
    """One \\newcommand per headline number: \\ses<Exp><Config><Metric>, e.g. \\sesExpTenSesKOneAcc.
    Metrics: N (runs), DeltaN (seed pairs behind the Δ), Acc, AccStd, Rob, RobStd, Gap, DeltaAcc,
    DeltaAccCI, DeltaRob, DeltaRobCI (the 95 % t half-width), Overhead (percent). Numbers only: the text adds its own units."""
    out = ["% Generated by report.py: \\input{macros.tex} in the preamble; the text then updates with the results."]
    if kind:
        out.append(f"% {KIND_NOTE[kind]}")
    seen = set()
    for exp, rows in tables.items():
        prefix = "ses" + macro_part(exp.split("_")[0])
        for r in rows:
            name = prefix + macro_part(r["config"])
            while name in seen:  # two configs that spell the same letters: keep both, distinctly
                name += "X"
            seen.add(name)
            values = {"N": str(r["n"])}
            if r["d_acc"] is not None:
                values["DeltaN"] = str(r["d_acc"][2])
            for m in ("acc", "rob", "gap"):
                values[m.capitalize()] = f"{r[m][0]:.2f}"
                if r[m][1] is not None:
                    values[m.capitalize() + "Std"] = f"{r[m][1]:.2f}"
            for key, d in (("DeltaAcc", r["d_acc"]), ("DeltaRob", r["d_rob"])):
                if d is not None:
                    values[key] = f"{d[0]:+.2f}"
                    if d[1] is not None:
                        values[key + "CI"] = f"{(d[1][1] - d[1][0]) / 2:.2f}"
            if r["overhead"] is not None:
                values["Overhead"] = f"{100 * r['overhead']:+.0f}"
            out.append(f"% {exp} / {r['config']}")
            out += [f"\\newcommand{{\\{name}{k}}}{{{v}}}" for k, v in values.items()]
    return "\n".join(out) + "\n"
