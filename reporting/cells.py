"""The report's table cells: each a (Markdown, LaTeX) pair, and the notes under a table.

Numbers: mean ± std ('72.00 ± 2.00', $72.00_{\\pm 2.0}$), a Δ with its 95 % interval ('+5.00 [+2.52,
+7.48]', $+5.00_{\\pm 2.5}$: the half-width), overheads in signed percent with [min, max], the seeds a
Δ needs, the paper's own figures. Marks: ° an interval or range contains 0; † a row averages runs of
different precision, device or process count; ‡ a row's runs and its twin's differ so; "(n=2)" where
fewer seeds stand behind a row or value than the table's n. DASH: no value.
"""
from __future__ import annotations

from reporting.labels import display, display_tex
from reporting.latex import to_tex
from reporting.stats import SEEDS_CAP

DASH = ("—", "--")


def signed(v: float, digits: int) -> str:
    """+1.25, -0.50; a value that rounds to zero is +0.00, never -0.00."""
    text = f"{v:+.{digits}f}"
    return "+" + text[1:] if float(text) == 0 else text


def few(n: int, of: int | None) -> tuple[str, str]:
    """' (n=2)' where n seeds stand behind something of `of`, else nothing."""
    if of is None or n >= of:
        return "", ""
    return f" (n={n})", f"{{\\scriptsize ($n{{=}}{n}$)}}"


def spread(s, digits: int = 2, n: int | None = None) -> tuple[str, str]:
    """mean ± std: '72.00 ± 2.00' and $72.00_{\\pm 2.0}$; '(n=2)' where fewer runs than the row's have it."""
    if s is None or s.mean is None:
        return DASH
    md, tex = f"{s.mean:.{digits}f}", f"${s.mean:.{digits}f}"
    if s.std is not None:
        md, tex = md + f" ± {s.std:.{digits}f}", tex + f"_{{\\pm {s.std:.1f}}}"
    mark = few(s.n, n)
    return md + mark[0], tex + "$" + mark[1]


def delta(d) -> tuple[str, str]:
    """+5.00 [+2.52, +7.48] and $+5.00_{\\pm 2.5}$ (the half-width); ° when the interval contains 0."""
    if d is None:
        return DASH
    if d.lo is None:
        return signed(d.mean, 2), f"${signed(d.mean, 2)}$"
    ring = d.contains_zero
    return (f"{signed(d.mean, 2)} [{signed(d.lo, 2)}, {signed(d.hi, 2)}]" + (" °" if ring else ""),
            f"${signed(d.mean, 2)}_{{\\pm {d.half:.1f}}}" + ("^\\circ$" if ring else "$"))


def seeds_math(d) -> str | None:
    """The seeds Δ's interval needs, as LaTeX math: '3', or '\\geq 100' at the cap (not within reach)."""
    if d is None or d.seeds_needed is None:
        return None
    return f"\\geq {SEEDS_CAP}" if d.seeds_needed >= SEEDS_CAP else str(d.seeds_needed)


def seeds(d) -> tuple[str, str]:
    math = seeds_math(d)
    if math is None:
        return DASH
    return (f"≥{SEEDS_CAP}", f"${math}$") if math.startswith("\\geq") else (math, math)


def overhead(o) -> tuple[str, str]:
    """Median with [min, max] over seeds, in percent (LaTeX: the range on a second line); ° when the
    range contains 0."""
    if o is None:
        return DASH
    med, lo, hi = (percent(v) for v in o[:3])
    if o[3] < 2:
        return f"{med} %", f"${med}\\,\\%$"
    ring = o[1] <= 0 <= o[2]
    return (f"{med} % [{lo}, {hi}]" + (" °" if ring else ""),
            f"${med}\\,\\%$" + ("$^\\circ$" if ring else "") + f"\\newline{{\\scriptsize $[{lo}, {hi}]$}}")


def percent(v: float) -> str:
    """A fraction in signed percent: +7, -12; where whole percent would round a non-zero value to 0, as
    many decimals (up to two) as keep it from 0 (-0.4, +0.05), so no sign is rounded away; 0 only for 0."""
    p = 100 * v
    for digits in (0, 1, 2):
        text = signed(p, digits)
        if p == 0 or float(text) != 0:
            return text
    return ("-" if p < 0 else "+") + "0.00"


def paper_cell(p: dict | None, key: str) -> tuple[str, str]:
    v = p.get(key) if p else None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return DASH
    return (f"{signed(100 * v, 0)} %", f"${signed(100 * v, 0)}\\,\\%$") if key == "overhead" else (f"{v:.2f}", f"${v:.2f}$")


def marks(r: dict) -> tuple[str, str]:
    md = (" †" if r.get("mixed") else "") + (" ‡" if r.get("pair_mixed") else "")
    return md, to_tex(md.replace(" ", ""))


def name_cell(r: dict, with_twin: bool = False, of: int | None = None) -> tuple[str, str]:
    """The row's display name and marks; with `of` (a table without an n column), '(n=2)' where the
    row averages fewer seeds than that."""
    md, tex = marks(r)
    n_md, n_tex = few(r["n"], of)
    twin = f"\\newline{{\\scriptsize vs.\\ {display_tex(r['twin'])}}}" if with_twin and r["twin"] else ""
    return display(r["variant"]) + n_md + md, display_tex(r["variant"]) + n_tex + tex + twin


def notes_of(rows: list[dict], settings: bool = False) -> list[tuple[str, str]]:
    """† / ‡ notes: how the runs of a row, or of its pairs, ran; with `settings`, also where each
    row's overhead was measured when that differs between rows."""
    notes = []
    for r in rows:
        if r.get("mixed"):
            notes.append(f"† {display(r['variant'])} averages runs that ran differently: {r['mixed']}.")
        if r.get("pair_mixed"):
            notes.append(f"‡ {display(r['variant'])} vs. its twin: {r['pair_mixed']}.")
    timed = [r for r in rows if r["overhead"]]
    if settings and len({r["setting"] for r in timed}) > 1:
        notes.append("Overhead measured in: " + "; ".join(f"{display(r['variant'])}: {r['setting']}" for r in timed) + ".")
    return [(n, to_tex(n)) for n in notes]
