"""Which figures each experiment gets, drawn at each width, and their captions for report.md.

plots/<experiment>_<figure>.pdf/.png is the text-width variant, <...>_col.pdf/.png the one-column
variant (reporting.style). Per experiment, where its results hold what the figure needs:
    curves                    held-out accuracy and loss per epoch
    entropy_<variant>         per-layer H per epoch of each SES config beside its twin
    final_entropy             final per-layer H against target and ceiling
    robustness                accuracy under the robustness suite
    gain                      Exp 10: Δ against k and against the measured overhead
    interaction               Exp 12: SES's gain with and without Mixup/CutMix
    attention_<run>           Exp 13: cross-attention maps of each config's first seed
A figure that cannot be drawn costs that figure alone: one line says which and why.
"""
from __future__ import annotations

from pathlib import Path

from reporting.labels import display, experiment_name, styles
from reporting.plots import attention_figure, curves_figure, entropy_figure, fit_ylabels
from reporting.questions import final_entropy_figure, gain_figure, interaction_figure, paper_points, robustness_figure
from reporting.rows import interactions
from reporting.style import Look, mark_kind, save

BAND = ("line: mean over seeds; ± one std over seeds where two or more (a band; with more than three configs, error "
        "bars beside the markers)")
CI = "error bar: the 95 % Student-t interval (n − 1) of the paired per-seed differences"


def jobs(plt, exp: str, data: dict, rows: list[dict]):
    """(stem, make(width) -> figure or None, caption) for each figure of the experiment."""
    style = styles(list(data["runs"]), data["twin"], data["ses"])
    name = experiment_name(exp)
    out = [(f"{exp}_curves", lambda w: curves_figure(plt, w, data, style) if data["curves"] else None,
            f"{name}: held-out accuracy and loss (cross-entropy) per epoch; {BAND}. An SES config and its twin "
            f"share a colour, SES solid, twin dashed.")]
    for v in data["curves"]:
        if data["ses"].get(v):
            out.append((f"{exp}_entropy_{v}", lambda w, v=v: entropy_figure(plt, w, data, v),
                        f"{name}: per-layer spectral entropy per epoch, {display(v)} beside its twin. Solid: probe H "
                        f"on a fixed clean batch (band ± one std over seeds); dotted: the H SES penalised (epochs "
                        f"with an SES step); dash-dot: the layer's target β log d; grey dotted: the ceiling "
                        f"log min(n − 1, d)."))
    out += [(f"{exp}_final_entropy", lambda w: final_entropy_figure(plt, w, data, style),
             f"{name}: final per-layer H of each config (mean ± one std over seeds), the target β log d and the "
             f"ceiling log min(n − 1, d) of the probe batch."),
            (f"{exp}_robustness", lambda w: robustness_figure(plt, w, rows, style),
             f"{name}: test accuracy against the strength of each perturbation (0: clean); error bar ± one std over "
             f"seeds, clipped to [0, 100] %."),
            (f"{exp}_gain", lambda w: gain_figure(plt, w, rows, style),
             f"{name}: SES's gain over its twin against the period k and against the measured overhead (median "
             f"over seeds, bar: range); {CI}. Each k in its own colour; circle: Δ acc, square: Δ rob."
             + (" Hollow grey: the paper's own figures." if paper_points(rows) else "")),
            (f"{exp}_interaction", lambda w: interaction_figure(plt, w, interactions(data, rows)),
             f"{name}: SES's gain over its twin with each augmentation (left) and that gain minus SES's gain "
             f"without augmentation, paired by seed (right); {CI}.")]
    for run, path in data["attention"].items():
        out.append((f"{exp}_attention_{run}", lambda w, path=path: attention_figure(plt, path, 3 if w == "text" else 1),
            f"{name} {display(run.rpartition('_seed')[0])}, seed {run.rpartition('_seed')[2]}: cross-attention "
            f"weights of the first cross-attend for four fixed test samples, every map on one colour scale."))
    return out


def make_figures(plt, experiments: dict, rows_of: dict, out_dir: Path, look: Look,
                 widths=("text", "column"), formats=("pdf", "png"), dpi: int = 300):
    """(written paths, [(stem, caption)], [one line per figure not drawn]); the figures of an
    experiment of generated data (its `kind`) say so on the figure."""
    written, captions, problems = [], [], []
    for exp, data in experiments.items():
        if not data["runs"]:
            continue
        for stem, make, caption in jobs(plt, exp, data, rows_of[exp]):
            drawn = False
            for w in widths:
                try:
                    with plt.rc_context(look.rc(w, 2.5)):
                        fig = make(w)
                        if fig is None:
                            break
                        mark_kind(fig, data["kind"])
                        fit_ylabels(fig)
                        written += save(fig, plt, out_dir / (stem if w == "text" else stem + "_col"), formats, dpi)
                        drawn = True
                except Exception as e:  # noqa: BLE001  one figure's failure costs that figure alone
                    plt.close("all")
                    if "attention" in stem:
                        problems.append(f"{exp}: {stem}: the attention maps cannot be read ({type(e).__name__}); "
                                        f"figure left out")
                        break
                    problems.append(f"{exp}: figure {stem} ({w}) could not be drawn: {type(e).__name__}: {e}")
            if drawn:
                captions.append((stem, caption))
    return written, captions, problems


def figures_md(captions: list[tuple[str, str]], widths, formats, look) -> str:
    if not captions:
        return ""
    sizes = {"text": f"`<name>` at the text width ({look.width_in('text'):g} in)",
             "column": f"`<name>_col` at one column ({look.width_in('column'):g} in)"}
    style = f", in {look.venue}'s style" if look.venue != "plain" else ""
    lines = ["## Figures", "", f"In `plots/`, each as {' and '.join(f.upper() for f in formats)}: "
             + " and ".join(sizes[w] for w in widths) + f"{style}.", ""]
    return "\n".join(lines + [f"- `{stem}`: {caption}" for stem, caption in captions]) + "\n"
