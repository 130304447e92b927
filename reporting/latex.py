"""LaTeX for the report's tables: booktabs, \\footnotesize, sized by Computer Modern metrics.

A Table (reporting.tables) becomes one float. Its first column is a ragged-right paragraph column (p{})
as wide as its widest entry, at most CONFIG_COL_PT (longer names wrap); the other columns are
right-aligned at their natural width (a cell of two lines, like an overhead over its range, is a
top-aligned inner tabular). `tex_width_pt` estimates the tabular's natural width from
Computer Modern metrics: a table whose estimate fits COLUMN_PT (one column of a two-column 10 pt
article, A4: 221 pt; letter: 229.5 pt) is a `table`, a wider one a `table*`, which spans the text
width in a two-column article and is a plain float in a one-column one. Every table is built to
fit TEXTWIDTH_PT (345 pt: the text width of a one-column 10 pt article, the narrower of the two
layouts); the tests compile tables.tex in both layouts and fail on an overfull box.
"""
from __future__ import annotations

import re

TEXTWIDTH_PT = 345.0
COLUMN_PT = 221.0
CONFIG_COL_PT = 60.0
TABCOLSEP_PT = 2.5
FONT_PT = 8.0 * 1.06  # \footnotesize: cmr8, about 6 % wider per em than cmr10 scaled down
SCRIPT = 6.0 * 1.22 / (8.0 * 1.06)  # sub/superscripts in \footnotesize math: cmr6, ~22 % wider per em than cmr10
SMALL = 7.0 * 1.14 / (8.0 * 1.06)   # {\scriptsize ...}: cmr7, ~14 % wider per em than cmr10

# Computer Modern (cmr10/cmmi10/cmsy10) advance widths in em, for the characters our cells use.
_EM = {**dict.fromkeys("0123456789", 0.5), ".": 0.2778, ",": 0.2778, "+": 0.7778, "-": 0.7778, "±": 0.7778,
       "%": 0.8333, "_": 0.5, " ": 0.3333, "(": 0.3889, ")": 0.3889, "[": 0.2778, "]": 0.2778, "/": 0.5,
       "=": 0.7778, "→": 1.0, "Δ": 0.8333, "∘": 0.5, "†": 0.4444, "‡": 0.4444, "≥": 0.7778, "thin": 0.1667,
       "quad": 1.0,
       **dict(zip("abcdefghijklmnopqrstuvwxyz", (0.5, 0.5556, 0.4444, 0.5556, 0.4444, 0.3056, 0.5, 0.5556, 0.2778,
                                                0.3056, 0.5278, 0.2778, 0.8333, 0.5556, 0.5, 0.5556, 0.5278, 0.3917,
                                                0.3944, 0.3889, 0.5556, 0.5278, 0.7222, 0.5278, 0.5278, 0.4444)))}


def tex_escape(s: str) -> str:
    return (s.replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("%", "\\%").replace("&", "\\&")
            .replace("#", "\\#").replace("$", "\\$").replace("{", "\\{").replace("}", "\\}"))


UNICODE_TEX = {"σ": "$\\sigma$", "ε": "$\\epsilon$", "β": "$\\beta$", "λ": "$\\lambda$", "α": "$\\alpha$",
               "±": "$\\pm$", "÷": "$\\div$", "−": "$-$", "°": "$^\\circ$", "Δ": "$\\Delta$", "≥": "$\\geq$",
               "†": "$^\\dagger$", "‡": "$^\\ddagger$", "→": "$\\to$"}


def to_tex(text: str) -> str:
    """Plain text (the report's captions and notes) as LaTeX: escaped, its symbols in math mode."""
    s = tex_escape(text).replace("vs. ", "vs.\\ ")
    for ch, tex in UNICODE_TEX.items():
        s = s.replace(ch, tex)
    return s


def _em(s: str) -> float:
    return sum(_EM.get(ch, 0.75) for ch in s)  # capitals and anything unlisted: 0.75 em


def text_width_pt(cell: str, font_pt: float = FONT_PT) -> float:
    """Natural width of one cell's LaTeX (the subset the report writes), from Computer Modern
    metrics; a cell of several lines (\\newline) is as wide as its widest line."""
    inner = re.fullmatch(r"\\begin\{tabular\}\[t\]\{@\{\}r@\{\}\}(.*)\\end\{tabular\}", cell)
    if inner:  # a stacked cell (stacked() below): its lines
        cell = inner.group(1).replace(" \\\\ ", "\\newline")
    if "\\newline" in cell:
        return max(text_width_pt(part, font_pt) for part in cell.split("\\newline"))
    s = re.sub(r"\\(raggedright|allowbreak\{\}|textit|hfill|centering)\s?", "", cell)
    s = s.replace("\\_", "_").replace("\\%", "%").replace("\\pm ", "±").replace("\\Delta", "Δ").replace("\\ ", " ")
    s = s.replace("\\dagger", "†").replace("\\ddagger", "‡").replace("\\geq ", "≥").replace("\\circ", "∘")
    s = s.replace("\\to", "→")
    small = re.findall(r"\{\\scriptsize ([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}", s)
    s = re.sub(r"\{\\scriptsize [^{}]*(?:\{[^{}]*\}[^{}]*)*\}", "", s)
    subs = re.findall(r"_\{([^}]*)\}", s)
    s = re.sub(r"_\{[^}]*\}", "", s)
    sups = re.findall(r"\^\{?([^}$]*)\}?", s) if not subs else []  # a superscript stacks over a subscript
    s = re.sub(r"\^\{?[^}$]*\}?", "", s)
    em = s.count("\\,") * _EM["thin"] + s.count("\\quad") * _EM["quad"]
    s = re.sub(r"\\,|\\quad|[{}$]", "", s)
    em += _em(s) + SCRIPT * sum(_em(x) for x in subs + sups)
    em += SMALL * sum(_em(re.sub(r"\\,|[{}$]", "", x)) for x in small)
    return em * font_pt


def first_col_pt(cells: list[str]) -> float:
    return min(CONFIG_COL_PT, max(text_width_pt(c) for c in cells) + 1.0)


def tex_width_pt(body: list[list[str]], header: list[str] | None = None, first: float = CONFIG_COL_PT) -> float:
    """The tabular's natural width: the first column's fixed width, the widest cell of each other
    column (header included), and 2 * tabcolsep between columns (none outside: @{})."""
    rows = ([header] if header else []) + body
    widths = [first] + [max(text_width_pt(c) for c in col) for col in list(zip(*rows))[1:]]
    return sum(widths) + 2 * TABCOLSEP_PT * (len(widths) - 1)


def stacked(cell: str) -> str:
    """A cell of several lines (\\newline) outside the paragraph column: a top-aligned inner tabular."""
    if "\\newline" not in cell:
        return cell
    return "\\begin{tabular}[t]{@{}r@{}}" + " \\\\ ".join(cell.split("\\newline")) + "\\end{tabular}"


def render(table, label: str) -> str:
    """One table float: caption, label, booktabs rules, the notes under it."""
    head = [c[1] for c in table.header]
    body = [[c[1] for c in row] for row in table.rows]
    first = first_col_pt([head[0]] + [r[0] for r in body])
    width = tex_width_pt(body, head, first)
    env = "table" if width <= COLUMN_PT else "table*"
    out = [f"\\begin{{{env}}}[t]", "\\centering", "\\footnotesize", f"\\setlength{{\\tabcolsep}}{{{TABCOLSEP_PT}pt}}",
           f"\\caption{{{table.caption}}}", f"\\label{{{label}}}",
           f"\\begin{{tabular}}{{@{{}}p{{{first:.1f}pt}}{'r' * (len(head) - 1)}@{{}}}}",
           "\\toprule"]
    if table.groups:  # spanning headers over the columns after the first: [(span, text), ...]
        cells, rules, col = [""], [], 2
        for span, text in table.groups:
            cells.append(f"\\multicolumn{{{span}}}{{c}}{{{text}}}" if text else "")
            if text:
                rules.append(f"\\cmidrule(l){{{col}-{col + span - 1}}}")
            cells += [""] * (span - 1) if not text else []
            col += span
        out += [" & ".join(cells) + " \\\\", "".join(rules)]
    out += [" & ".join(["\\raggedright " + head[0]] + head[1:]) + " \\\\", "\\midrule"]
    out += [" & ".join(["\\raggedright " + r[0]] + [stacked(c) for c in r[1:]]) + " \\\\" for r in body]
    out += ["\\bottomrule", "\\end{tabular}"]
    if table.notes:
        out += ["\\par\\smallskip\\raggedright"] + [n[1] + " \\\\" for n in table.notes[:-1]] + [table.notes[-1][1]]
    return "\n".join(out + [f"\\end{{{env}}}"])
