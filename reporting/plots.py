"""The report's figures over epochs and of attention (matplotlib), each at a given width.

- curves_figure: held-out accuracy (%) and held-out loss (cross-entropy, nats; the same quantity
  for every config, unlike the training loss, which is CE + λR for SES) per epoch. Line: the
  mean over the seeds that have the epoch; band: ± one std where at least two do, clipped to what
  the metric allows ([0, 100] %, loss >= 0); with more than three configs, error bars at the
  markers instead, each config's bars a little to the side of its marker so that none hides another
  (the lines and markers stay at their epochs).
- entropy_figure: per-layer spectral entropy per epoch of an SES config beside its twin. Solid:
  the eval-mode probe H (a fixed clean batch), with its ± 1 std band; dotted: the train-mode H that
  SES penalised (mean over the epoch's SES steps; absent on epochs without one, as with periodic
  SES); dash-dot, in the layer's colour: its target β·log d; grey dotted: the ceiling
  log min(n − 1, d) a batch of n can reach. Layers whose curves are identical in every seed and
  epoch (ResNet's `layer4.1` and `avgpool`) are drawn once and named together.
- attention_figure: Perceiver cross-attention of the first cross-attend, one row per saved test
  sample, every map on one colour scale with one colour bar.
Styles come from reporting.labels.styles; sizes and fonts from reporting.style.
"""
from __future__ import annotations

from reporting.labels import display
from reporting.stats import finite, mean_std
from reporting.style import FONT_PT

NAN = float("nan")


def new_figure(plt, height_in: float, nrows: int = 1, ncols: int = 1, **kw):
    width = plt.rcParams["figure.figsize"][0]
    return plt.subplots(nrows, ncols, figsize=(width, height_in), squeeze=False, layout="constrained", **kw)


def series(runs: list[list[dict]], get) -> tuple[list[int], list[float], list[float]]:
    """(epochs, mean, std) over the runs' rows of each epoch: NaN where no finite value (std: < 2)."""
    epochs = sorted({row["epoch"] for run in runs for row in run})
    by_epoch = {e: [] for e in epochs}
    for run in runs:
        for row in run:
            by_epoch[row["epoch"]].append(get(row))
    spreads = [mean_std(by_epoch[e]) for e in epochs]
    return (epochs, [NAN if s.mean is None else s.mean for s in spreads],
            [NAN if s.std is None else s.std for s in spreads])


def clipped(mean, std, lo=None, hi=None) -> tuple[list[float], list[float]]:
    """The bounds mean ± std, each clipped to [lo, hi] (None: open), per point."""
    clip = lambda v: min(hi if hi is not None else v, max(lo if lo is not None else v, v))  # noqa: E731
    return [clip(m - s) for m, s in zip(mean, std)], [clip(m + s) for m, s in zip(mean, std)]


def error_sizes(mean, std, lo=None, hi=None) -> list[list[float]]:
    """yerr for errorbar: the lengths below and above each mean of its ± std clipped to [lo, hi]; never
    negative (a mean outside [lo, hi], a damaged record, gets no bar), 0 where a value is NaN."""
    low, high = clipped(mean, std, lo, hi)
    return [[max(0.0, m - a) if m == m and a == a else 0 for m, a in zip(mean, low)],
            [max(0.0, b - m) if m == m and b == b else 0 for m, b in zip(mean, high)]]


def band(ax, x, mean, std, lo=None, hi=None, fill=True, bar_shift: float = 0.0, **kw):
    """The mean line at x and its ± std clipped to [lo, hi]: a band, or (fill=False, where many configs
    share an axis and bands would blend) error bars at every marker, drawn bar_shift epochs to its side
    (only the bars: the line and its markers stay at their epochs)."""
    ax.plot(x, mean, **kw)
    if not any(s == s for s in std):  # no finite std
        return
    if fill:
        ax.fill_between(x, *clipped(mean, std, lo, hi), color=kw.get("color"), alpha=0.15, lw=0)
        return
    ax.errorbar([e + bar_shift for e in x], mean, yerr=error_sizes(mean, std, lo, hi), fmt="none",
                ecolor=kw.get("color"), errorevery=kw.get("markevery", 1), capsize=1.5, elinewidth=0.6)


def integer_epochs(ax):
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)


def legend_below(fig, handles, labels, ncols: int | None = None):
    """One legend under the axes, in as many columns as fit the figure's width (at most ncols)."""
    if not handles:
        return
    size = fig.get_figwidth() - 0.1
    em = FONT_PT["small"] / 72  # inches
    entry = max(text_width_in(label, FONT_PT["small"]) for label in labels) + (1.8 + 0.8 + 1.0) * em  # text, handle,
    # the gap between them and the column spacing
    fits = max(1, int(size // entry))
    fig.legend(handles, labels, loc="outside lower center", ncols=min(fits, ncols or fits, len(labels)),
               columnspacing=1.0, handlelength=1.8)


def curves_figure(plt, width: str, data: dict, styles: dict):
    curves = data["curves"]
    split = "val" if any(row.get("val_acc") is not None for rs in curves.values() for r in rs for row in r) else "test"
    column = width == "column"
    fig, axes = new_figure(plt, 3.7 if column else 2.5, 2 if column else 1, 1 if column else 2, sharex=True)
    ax_acc, ax_loss = axes.flat
    fill = len(curves) <= 3  # more bands would blend: error bars, each config's a little to the side
    for i, (v, runs) in enumerate(curves.items()):
        st = styles[v]
        every = max(1, len(runs[0]) // 6)
        # the configs' bars at one marker side by side, spread over a third of the gap between markers
        shift = 0.0 if fill else (i - (len(curves) - 1) / 2) * every / (3 * max(1, len(curves) - 1))
        kw = dict(color=st.colour, ls=st.linestyle, marker=st.marker, markevery=every, ms=3, fill=fill, bar_shift=shift)
        ep, mu, sd = series(runs, lambda r: None if r.get(f"{split}_acc") is None else 100 * r[f"{split}_acc"])
        band(ax_acc, ep, mu, sd, 0, 100, label=f"{display(v)} (n={len(runs)})", **kw)
        ep, mu, sd = series(runs, lambda r: r.get(f"{split}_loss"))
        band(ax_loss, ep, mu, sd, 0, None, **kw)
    name = "validation" if split == "val" else "test"
    ax_acc.set_ylabel(f"{name} accuracy (%)")
    ax_loss.set_ylabel(f"{name} loss (CE, nats)")
    for ax in (ax_acc, ax_loss):
        integer_epochs(ax)
    if column:
        ax_acc.set_xlabel("")
    legend_below(fig, *ax_acc.get_legend_handles_labels(), 3)
    return fig


def merged_layers(runs: list[list[dict]]) -> list[list[str]]:
    """Groups of layers whose probe-H curves are identical in every seed and epoch."""
    layers = list(dict.fromkeys(k for run in runs for row in run for k in row.get("entropy", {})))
    groups: list[list[str]] = []
    for layer in layers:
        for g in groups:
            if all(row.get("entropy", {}).get(layer) == row.get("entropy", {}).get(g[0]) for r in runs for row in r):
                g.append(layer)
                break
        else:
            groups.append([layer])
    return groups


def entropy_figure(plt, width: str, data: dict, variant: str):
    from matplotlib.lines import Line2D
    curves, runs = data["curves"], data["runs"]
    twin = data["twin"].get(variant)
    panels = [twin, variant] if twin and twin != variant and twin in curves else [variant]
    column = width == "column"
    rows_cols = (len(panels), 1) if column else (1, len(panels))
    fig, axes = new_figure(plt, 2.0 * len(panels) + 0.9 if column else 2.6, *rows_cols, sharey=True, sharex=True)
    groups = merged_layers(curves[variant])
    colours = plt.cm.viridis([i / max(len(groups) - 1, 1) * 0.9 for i in range(len(groups))])
    for ax, v in zip(axes.flat, panels):
        result = runs[v][0]
        for colour, group in zip(colours, groups):
            layer = group[0]
            ep, mu, sd = series(curves[v], lambda r: r.get("entropy", {}).get(layer))
            band(ax, ep, mu, sd, 0, None, color=colour, lw=1.0, label=" = ".join(group))
            ep, mu, _ = series(curves[v], lambda r: r.get("ses_entropy", {}).get(layer))
            if finite(mu):  # a marker every few epochs: the SES epochs show, the probe H stays readable
                ax.plot(ep, mu, color=colour, ls=":", lw=1.0, marker=".", ms=2, markevery=max(1, len(ep) // 12))
            target = result["entropy_target"].get(layer)
            if target is not None:
                ax.axhline(target, color=colour, ls="-.", lw=0.7)
        for ceiling in sorted(set(finite(result["entropy_max"].values()))):
            ax.axhline(ceiling, color="0.5", ls=":", lw=0.8)
        ax.set_title(display(v))
        integer_epochs(ax)
        ax.set_ylabel("H (nats)")
    if column and len(panels) > 1:
        axes.flat[0].set_xlabel("")
    meaning = [Line2D([], [], color="0.2", ls="-"), Line2D([], [], color="0.2", ls=":"),
               Line2D([], [], color="0.2", ls="-.", lw=0.7), Line2D([], [], color="0.5", ls=":", lw=0.8)]
    labels = ["probe H", "penalised H", "target β log d", "ceiling log min(n−1,d)"]
    handles, names = axes.flat[0].get_legend_handles_labels()
    legend_below(fig, handles + meaning, names + labels)
    return fig


def slots_to_image(weights, perm, h: int, w: int):
    """Attention over token slots (N,) -> (h, w) image; slot j carries pixel perm[j] when permuted."""
    import torch
    out = torch.zeros_like(weights)
    out[perm if perm is not None else slice(None)] = weights
    return out.view(h, w).numpy()


def text_width_in(text: str, size_pt: float) -> float:
    """The printed width of one line of text in the current font, from the font's own metrics."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextToPath
    return TextToPath().get_text_width_height_descent(text, FontProperties(size=size_pt), ismath=False)[0] / 72


def two_lines(text: str) -> str:
    """text broken at the space nearest its middle."""
    if " " not in text:
        return text
    cut = min((i for i, ch in enumerate(text) if ch == " "), key=lambda i: abs(i - len(text) / 2))
    return text[:cut] + "\n" + text[cut + 1:]


def fit(text: str, width_in: float, size_pt: float) -> str:
    """text on two lines where one line would be wider than width_in at size_pt, so that
    neighbouring titles never meet."""
    return text if text_width_in(text, size_pt) <= width_in else two_lines(text)


def fit_ylabels(fig) -> None:
    """A y-label longer than its axes is tall takes two lines, so the labels of stacked panels never meet."""
    fig.draw_without_rendering()
    for ax in fig.axes:
        label = ax.yaxis.label
        if label.get_text() and "\n" not in label.get_text() and \
                label.get_window_extent().height > ax.get_window_extent().height:
            label.set_text(two_lines(label.get_text()))


def attention_figure(plt, path, n_latents: int = 3):
    """Cross-attention of the first cross-attend for the saved test samples: one row per sample.
    Images: input | mean over latents | overlay | single latents (mapped back to pixel positions
    when the pixels were permuted). Point clouds: x-y projection coloured by attention. Every map
    shares one colour scale [0, the largest weight shown], with one colour bar under the grid (the
    panels keep the whole width); a title wider than its panel takes two lines."""
    import torch
    d = torch.load(path, map_location="cpu", weights_only=False)
    maps = d["maps"][:, 0].float()                        # (S, M, N): first cross-attend
    x, labels = d["inputs"], d["labels"]
    is_image = x.dtype == torch.uint8
    cols = 3 + n_latents if is_image else 1 + n_latents
    vmax = max(float(maps[:, :n_latents].max()), float(maps.mean(1).max()))
    width = plt.rcParams["figure.figsize"][0]
    panel = width / (cols + 0.4)
    fig, axes = plt.subplots(len(x), cols, figsize=(width, panel * len(x) + 0.75), squeeze=False, layout="constrained")
    size = plt.rcParams["axes.titlesize"]
    size = size if isinstance(size, (int, float)) else FONT_PT["base"]
    usable = width / cols - 0.06  # each panel's share of the width, less the layout's padding

    def title(ax, text):
        ax.set_title(fit(text, 0.95 * usable, size))
    shown = None
    for i in range(len(x)):
        heads = [("mean over latents", maps[i].mean(0))] + [(f"latent {j}", maps[i, j]) for j in range(n_latents)]
        if is_image:
            h, w = x.shape[2:]
            perm = d.get("pixel_perm")
            img = x[i].permute(1, 2, 0).numpy()
            axes[i][0].imshow(img)
            title(axes[i][0], f"input (label {int(labels[i])})")
            axes[i][2].imshow(img)
            axes[i][2].imshow(slots_to_image(heads[0][1], perm, h, w), cmap="viridis", alpha=0.6, vmin=0, vmax=vmax)
            title(axes[i][2], "overlay")
            for k, (name, wts) in zip([1] + list(range(3, cols)), heads):
                shown = axes[i][k].imshow(slots_to_image(wts, perm, h, w), cmap="viridis", vmin=0, vmax=vmax)
                title(axes[i][k], name)
        else:
            for k, (name, wts) in enumerate(heads):
                shown = axes[i][k].scatter(x[i, :, 0], x[i, :, 1], c=wts.numpy(), s=0.5, cmap="viridis", vmin=0,
                                           vmax=vmax, linewidths=0)
                title(axes[i][k], f"{name} (label {int(labels[i])})" if k == 0 else name)
                axes[i][k].set_aspect("equal")
        for ax in axes[i]:
            ax.set_axis_off()
    fig.colorbar(shown, ax=axes, location="bottom", shrink=0.5, aspect=25, label="attention weight")
    return fig
