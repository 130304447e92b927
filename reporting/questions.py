"""The figures of the paper's questions (matplotlib), each at a given width.

- gain_figure (Exp 10: several SES configs of different k against one twin): Δ acc and Δ rob
  (percentage points, the per-seed difference against the twin; error bar: its 95 % t-interval)
  against k, and against the measured overhead (median over seeds; horizontal bar: min to max).
  Each k in its config's colour, Δ acc a circle, Δ rob a square, named in the legend. Hollow grey
  markers: the paper's own figures, where the report shows them (real runs only: paper_points).
- robustness_figure: accuracy (%) against the perturbation's strength, Gaussian noise σ and FGSM ε
  (strength 0 = clean), one line per config, error bar ± one std over seeds clipped to [0, 100].
- interaction_figure (Exp 12): SES's gain (Δ with its 95 % interval) with each augmentation, and
  the interaction: that gain minus SES's gain without augmentation, paired by seed.
- final_entropy_figure: the final per-layer H of each config (mean ± std over seeds, clipped at 0),
  the target β·log d (black, dash-dot) and the ceiling log min(n − 1, d) (grey, dotted).
"""
from __future__ import annotations

from reporting.labels import display, robustness_order
from reporting.plots import error_sizes, legend_below, new_figure
from reporting.rows import paper_delta
from reporting.stats import finite, mean_std

# black and grey: the configs' palette colours name configs, so a metric never borrows one
METRIC_LOOK = {"acc": ("Δ acc", "0.1", "o"), "rob": ("Δ rob", "0.55", "s")}
PAPER = dict(color="0.45", mfc="none", ls="none")


def yerr(d):
    return None if d is None or d.lo is None else [[d.mean - d.lo], [d.hi - d.mean]]


def periodic_rows(rows: list[dict]) -> list[dict]:
    """The SES rows with a k and a Δ that share one twin (of several twins, the one with the most
    values of k), by k; none unless at least two values of k are there."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["every"] is not None and (r["d_acc"] or r["d_rob"]):
            groups.setdefault(r["twin"], []).append(r)
    best = max(groups.values(), key=lambda g: len({r["every"] for r in g}), default=[])
    return sorted(best, key=lambda r: r["every"]) if len({r["every"] for r in best}) > 1 else []


def paper_points(rows: list[dict]) -> bool:
    """Whether the gain figure draws any of the paper's own figures."""
    return any(paper_delta(rows, r, m) is not None for r in periodic_rows(rows) for m in ("acc", "rob"))


def gain_figure(plt, width: str, rows: list[dict], styles: dict):
    """Each k in its config's colour (styles: the same as in the other figures), each metric by its
    marker; a legend names both, so no point needs a label of its own."""
    from matplotlib.lines import Line2D
    ses = periodic_rows(rows)
    if not ses:
        return None
    timed = [r for r in ses if r["overhead"] is not None]
    column = width == "column"
    n = 2 if timed else 1
    fig, axes = new_figure(plt, 2.0 * n + 0.7 if column else 2.6, n if column else 1, 1 if column else n, sharey=True)
    ax_k = axes.flat[0]
    ks = [r["every"] for r in ses]
    for j, m in enumerate(("acc", "rob")):
        _, _, marker = METRIC_LOOK[m]
        shift = 0.94 if j == 0 else 1.06
        for r in ses:
            d, colour = r[f"d_{m}"], styles[r["variant"]].colour
            if d is not None:
                ax_k.errorbar(r["every"] * shift, d.mean, yerr=yerr(d), color=colour, marker=marker, ls="none",
                              capsize=2, lw=0.8)
            p = paper_delta(rows, r, m)
            if p is not None:
                ax_k.plot(r["every"] * shift, p, marker=marker, **PAPER)
        for r in timed:
            d, colour = r[f"d_{m}"], styles[r["variant"]].colour
            med, lo, hi = (100 * v for v in r["overhead"][:3])
            if d is not None:
                axes.flat[1].errorbar(med, d.mean, xerr=[[med - lo], [hi - med]], yerr=yerr(d), color=colour,
                                      marker=marker, ls="none", capsize=2, lw=0.8)
            p, p_over = paper_delta(rows, r, m), (r["paper"] or {}).get("overhead")
            if p is not None and isinstance(p_over, (int, float)):
                axes.flat[1].plot(100 * p_over, p, marker=marker, **PAPER)
    ax_k.set_xscale("log")
    ax_k.set_xticks(ks, [str(k) for k in ks])
    ax_k.minorticks_off()
    ax_k.set_xlabel("SES period k (steps)")
    ax_k.set_ylabel(f"Δ vs. {display(ses[0]['twin'])} (pp)")
    for ax in axes.flat:
        ax.axhline(0, color="0.6", lw=0.6)
        ax.grid(alpha=0.3)
    if timed:
        axes.flat[1].set_xlabel("overhead (%): median, range over seeds")
        if column:
            axes.flat[1].set_ylabel(f"Δ vs. {display(ses[0]['twin'])} (pp)")
    handles = [Line2D([], [], color=styles[r["variant"]].colour, lw=2.5) for r in ses]
    names = [display(r["variant"]) for r in ses]
    for m in ("acc", "rob"):
        label, _, marker = METRIC_LOOK[m]
        handles.append(Line2D([], [], color="0.25", marker=marker, ls="none"))
        names.append(label + " (95 % CI)")
    if paper_points(rows):
        handles.append(Line2D([], [], marker="o", **PAPER))
        names.append("paper")
    legend_below(fig, handles, names, (len(names) + 1) // 2)  # two rows where they fit: the k, then the marks
    return fig


def robustness_figure(plt, width: str, rows: list[dict], styles: dict):
    keys = robustness_order(k for r in rows for k in r["robustness"])
    kinds = [kind for kind in ("gauss", "fgsm") if any(k.startswith(kind + "_") and strength(k) is not None
                                                        for k in keys)]
    if not kinds:
        return None
    column = width == "column"
    fig, axes = new_figure(plt, 1.9 * len(kinds) + 0.7 if column else 2.5, len(kinds) if column else 1,
                           1 if column else len(kinds), sharey=True)
    for ax, kind in zip(axes.flat, kinds):
        levels = [k for k in keys if k.startswith(kind + "_") and strength(k) is not None]
        xs = [0.0] + [strength(k) for k in levels]
        for r in rows:
            spreads = [r["acc"]] + [r["robustness"].get(k) for k in levels]
            pts = [(x, s.mean, s.std or 0.0) for x, s in zip(xs, spreads) if s is not None and s.mean is not None]
            if not pts:
                continue
            st = styles[r["variant"]]
            x, mu, sd = zip(*pts)
            ax.errorbar(x, mu, yerr=error_sizes(mu, sd, 0.0, 100.0), color=st.colour, ls=st.linestyle,
                        marker=st.marker, ms=3, capsize=1.5, lw=1.0, label=display(r["variant"]))
        ax.set_xticks(xs, ["clean"] + [level_label(k) for k in levels])
        ax.set_xlabel("Gaussian noise σ" if kind == "gauss" else "FGSM ε")
        bottom, top = ax.get_ylim()  # the axis spans the data within [0, 100] %, so a point's difference shows
        bottom, top = max(0.0, bottom), min(100.0, top)
        ax.set_ylim(bottom, max(top, bottom + 1.0))
        ax.grid(alpha=0.3)
        ax.set_ylabel("test accuracy (%)")
    legend_below(fig, *axes.flat[0].get_legend_handles_labels())
    return fig


def strength(key: str) -> float | None:
    """'gauss_0.05' -> 0.05, 'fgsm_2/255' -> 2/255; None for a level that is not a number."""
    num, _, den = key.partition("_")[2].partition("/")
    try:
        return float(num) / (float(den) if den else 1.0)
    except (ValueError, ZeroDivisionError):
        return None


def level_label(key: str) -> str:
    return key.partition("_")[2]


def interaction_figure(plt, width: str, items: list[dict]):
    if not items:
        return None
    column = width == "column"
    fig, axes = new_figure(plt, 4.2 if column else 2.4, 2 if column else 1, 1 if column else 2)  # own y scales
    names = ["none"] + [display(it["twin"]) for it in items[1:]]
    for j, m in enumerate(("acc", "rob")):
        label, colour, marker = METRIC_LOOK[m]
        off = -0.12 if j == 0 else 0.12
        for i, it in enumerate(items):
            for ax, d, x in ((axes.flat[0], it["row"][f"d_{m}"], i), (axes.flat[1], it[f"interaction_{m}"], i - 1)):
                if d is not None:
                    ax.errorbar(x + off, d.mean, yerr=yerr(d), color=colour, marker=marker, ls="none", capsize=2,
                                lw=0.8, label=label + " (95 % CI)")
    axes.flat[0].set_ylabel("SES gain (pp)")
    axes.flat[1].set_ylabel("gain − gain without (pp)")
    for ax, ticks in zip(axes.flat, (names, names[1:])):
        ax.set_xticks(range(len(ticks)), ticks)
        ax.set_xlim(-0.5, len(ticks) - 0.5)
        ax.axhline(0, color="0.6", lw=0.6)
        ax.grid(alpha=0.3, axis="y")
    for ax in axes.flat[-1:] if column else axes.flat:  # under the bottom panel, or under each side by side
        ax.set_xlabel("augmentation")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    legend_below(fig, list(unique.values()), list(unique))
    return fig


def final_entropy_figure(plt, width: str, data: dict, styles: dict):
    runs = data["runs"]
    layers = list(dict.fromkeys(k for rs in runs.values() for r in rs for k in r["entropy"]))
    if not layers:
        return None
    column = width == "column"
    fig, axes = new_figure(plt, 2.9 if column else 2.5)
    ax = axes[0][0]
    xs = list(range(len(layers)))
    step = min(0.08, 0.5 / len(runs))
    for i, (v, rs) in enumerate(runs.items()):
        st = styles[v]
        spreads = [mean_std(r["entropy"].get(layer) for r in rs) for layer in layers]
        shift = (i - (len(runs) - 1) / 2) * step  # side by side, so the error bars do not hide each other
        pts = [(x + shift, s.mean, s.std or 0.0) for x, s in zip(xs, spreads) if s.mean is not None]
        if pts:
            x, mu, sd = zip(*pts)
            ax.errorbar(x, mu, yerr=error_sizes(mu, sd, 0.0), color=st.colour,
                        ls=st.linestyle, marker=st.marker, ms=3, capsize=1.5, lw=1.0, label=display(v))
    for key, look in (("entropy_target", dict(color="black", ls="-.", label="target β log d")),
                      ("entropy_max", dict(color="0.5", ls=":", label="ceiling log min(n−1, d)"))):
        ref = [finite(r[key].get(layer) for rs in runs.values() for r in rs) for layer in layers]
        if any(ref):
            ax.step(xs, [max(v) if v else float("nan") for v in ref], where="mid", lw=0.9, **look)
    ax.set_xticks(xs, layers, rotation=45 if column or len(layers) > 8 else 0, ha="right" if column else "center")
    ax.set_ylabel("final H (nats)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3, axis="y")
    legend_below(fig, *ax.get_legend_handles_labels())
    return fig
