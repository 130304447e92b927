"""How the report's figures are sized, lettered and written.

Two widths per figure: "column" (one column of a two-column paper, 3.25 in) and "text" (the text
width, 6.75 in). A venue style (`--venue icml2024`, `neurips2024`, ... : any bundle of the
`tueplots` package) takes that venue's widths, fonts and layout instead; tueplots is optional
(requirements-dev installs it): without it, or with `--venue plain`, the plain style is used.
Either way text is held to 7-9 pt at the printed size (the venues' 6 pt tick and legend labels are
raised to 7 pt), LaTeX is never needed (usetex off), and the layout is constrained so nothing is
cut off. A figure is saved at exactly its size (no tight bounding box that could grow it), as
vector PDF and as PNG (`dpi`), each to a temp name and moved into place.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

WIDTHS_IN = {"column": 3.25, "text": 6.75}
FONT_PT = {"base": 8.0, "small": 7.0, "min": 7.0, "max": 9.0}
PLAIN = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7, "xtick.labelsize": 7,
         "ytick.labelsize": 7, "legend.title_fontsize": 7, "figure.titlesize": 8,
         "axes.linewidth": 0.6, "lines.linewidth": 1.2, "lines.markersize": 4, "xtick.major.width": 0.6,
         "ytick.major.width": 0.6, "grid.linewidth": 0.4, "legend.frameon": False, "axes.spines.top": False,
         "axes.spines.right": False, "savefig.pad_inches": 0.02, "pdf.fonttype": 42}
FONT_KEYS = ("font.size", "axes.titlesize", "axes.labelsize", "legend.fontsize", "xtick.labelsize",
             "ytick.labelsize", "legend.title_fontsize", "figure.titlesize")
KIND_MARK = {"smoke": "SMOKE: tiny generated data, not results", "synthetic": "SYNTHETIC: generated data, not results"}


def venues() -> list[str] | None:
    """The venue styles there are: plain and tueplots' bundles; None without tueplots."""
    try:
        from tueplots import bundles
    except ImportError:
        return None
    import inspect
    return ["plain"] + [name for name, f in inspect.getmembers(bundles, inspect.isfunction)
                        if f.__module__ == bundles.__name__ and not name.startswith("_")]


class Look:
    """The rcParams and widths of one venue style; `rc(width, height)` for one figure. A venue that
    tueplots does not have is a ValueError (one line naming those it has); without tueplots, any
    venue is the plain style, with a note."""

    def __init__(self, venue: str = "plain"):
        self.venue, self.note = venue, None
        self.bundle = None
        if venue != "plain":
            known = venues()
            if known is None:
                self.venue = "plain"
                self.note = f"figures: venue {venue} needs tueplots (pip install tueplots); plain style used"
            elif venue not in known:
                raise ValueError(f"--venue {venue}: no such venue; there are {', '.join(known)}")
            else:
                from tueplots import bundles
                self.bundle = getattr(bundles, venue)

    def venue_rc(self, width: str) -> dict:
        import inspect
        params = inspect.signature(self.bundle).parameters
        kw = {k: v for k, v in dict(column="half" if width == "column" else "full", usetex=False,
                                     rel_width=0.5 if width == "column" else 1.0).items() if k in params}
        if "column" in kw:
            kw.pop("rel_width", None)
        rc = dict(self.bundle(**kw))
        from matplotlib import font_manager
        installed = {f.name for f in font_manager.fontManager.ttflist}
        family = rc.get("font.family")
        family = family[0] if isinstance(family, list) else family
        for key in ("serif", "sans-serif", "monospace"):  # lists of fonts none of which is here: matplotlib
            wanted = rc.get(f"font.{key}")                 # would warn at every text, say it once instead
            if wanted and not installed & set(wanted):
                rc.pop(f"font.{key}")
                if key == family:
                    rc.pop("font.family", None)
                    self.note = f"figures: none of {self.venue}'s fonts ({', '.join(wanted)}) is installed; " \
                                f"matplotlib's default font is used"
        return rc

    def width_in(self, width: str) -> float:
        """The printed width of "text" or "column" figures in this style, in inches."""
        return self.rc(width, 1.0)["figure.figsize"][0]

    def rc(self, width: str, height_in: float) -> dict:
        rc = dict(PLAIN)
        if self.bundle is not None:
            rc.update(self.venue_rc(width))
            rc["text.usetex"] = False
            w = rc["figure.figsize"][0]
        else:
            w = WIDTHS_IN[width]
        for key in FONT_KEYS:
            size = rc.get(key, FONT_PT["base"])
            size = size if isinstance(size, (int, float)) else FONT_PT["base"]
            rc[key] = min(max(size, FONT_PT["min"]), FONT_PT["max"])
        rc.update({"figure.figsize": (w, height_in), "figure.constrained_layout.use": True,
                   "figure.autolayout": False})
        return rc


def mark_kind(fig, kind: str | None) -> None:
    """A smoke or synthetic figure says so on the figure."""
    if kind in KIND_MARK:
        fig.suptitle(KIND_MARK[kind], color="#D55E00", fontsize=FONT_PT["base"], fontweight="bold")


def save(fig, plt, stem: Path, formats=("pdf", "png"), dpi: int = 300) -> list[Path]:
    """stem.<format> for each format, at the figure's own size; the figure is closed."""
    written = []
    try:
        for ext in formats:
            path = stem.with_name(f"{stem.name}.{ext}")
            fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=f".tmp.{ext}", dir=path.parent)
            os.close(fd)
            try:
                fig.savefig(tmp, dpi=dpi, format=ext)
                os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep the figure from its other readers
                os.replace(tmp, path)
            finally:
                Path(tmp).unlink(missing_ok=True)
            written.append(path)
    finally:
        plt.close(fig)
    return written
