"""The report's figures (matplotlib), each written as PDF (vector, for the paper) and PNG.

Per experiment:
- `<exp>_curves`: held-out accuracy and training loss per epoch. The mean over seeds is the line,
  a band shows ± one std when n >= 2. A config and its twin (`mixup_ses` / `mixup`) share a colour,
  the SES config solid, the twin dashed; where several SES configs share one twin (exp10's k
  values) each has its own colour and the twin is black.
- `<exp>_entropy_<config>`: per-layer spectral entropy per epoch, the twin's panel beside the SES
  config's. Solid: the eval-mode probe H (a fixed clean batch); dotted: the train-mode H that SES
  penalised, averaged over the epoch's SES steps. One grey line per distinct target β·log d (or the
  rank target), labelled with the layers it belongs to. Layers whose curves are identical (ResNet's
  `layer4.1` and `avgpool`: the spectrum of the block is that of its global average) are drawn once
  and named together.
- `<exp>_attention_<run>`: Perceiver cross-attention maps of the first cross-attend.
"""
from __future__ import annotations

import os
import statistics
from pathlib import Path


def styles(data: dict) -> dict[str, tuple]:
    """variant -> (colour, linestyle): twins share a colour, SES solid and twin dashed."""
    import matplotlib.pyplot as plt
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    runs = data["runs"]
    twin_of = {v: rs[0].get("baseline_config", "baseline") for v, rs in runs.items()}
    twin_of = {v: v.replace(rs[0]["config"], twin_of[v], 1) for v, rs in runs.items()}
    family: dict[str, list[str]] = {}
    for v in runs:
        if twin_of[v] != v and twin_of[v] in runs:
            family.setdefault(twin_of[v], []).append(v)
    out, i = {}, 0
    for v in runs:
        if v in out:
            continue
        members = family.get(v, [])
        if len(members) == 1:  # a pair: one colour
            out[v], out[members[0]] = (palette[i % len(palette)], "--"), (palette[i % len(palette)], "-")
            i += 1
        elif members:          # one twin, several SES configs
            out[v] = ("black", "--")
            for m in members:
                out[m] = (palette[i % len(palette)], "-")
                i += 1
        elif twin_of[v] == v or twin_of[v] not in runs:
            out[v] = (palette[i % len(palette)], "-")
            i += 1
    return out


def mean_band(curves: list[list[dict]], get) -> tuple[list[int], list[float], list[float] | None]:
    """(epochs, mean, std or None) over seeds, over the epochs every seed has; get(row) -> value."""
    n = min(len(c) for c in curves)
    epochs = [curves[0][i]["epoch"] for i in range(n)]
    values = [[get(c[i]) for c in curves] for i in range(n)]
    mean = [statistics.fmean(v) for v in values]
    return epochs, mean, ([statistics.stdev(v) for v in values] if len(curves) > 1 else None)


def line(ax, epochs, mean, std, **kw):
    ax.plot(epochs, mean, **kw)
    if std is not None:
        ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=kw.get("color"), alpha=0.15, lw=0)


def integer_epochs(ax):
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)


def curves_figure(plt, exp: str, data: dict):
    curves = data["curves"]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    split = "val" if any("val_acc" in runs[0][0] for runs in curves.values()) else "test"
    style = styles(data)
    for config, runs in curves.items():
        color, ls = style.get(config, (None, "-"))
        key = f"{split}_acc" if f"{split}_acc" in runs[0][0] else "test_acc"
        ep, mu, sd = mean_band(runs, lambda r: 100 * r[key])
        line(ax_acc, ep, mu, sd, color=color, ls=ls, label=f"{config} (n={len(runs)})")
        line(ax_loss, *mean_band(runs, lambda r: r["train_loss"]), color=color, ls=ls)
    name = "validation (hold-out)" if split == "val" else "test"
    ax_acc.set(title=f"{name} accuracy", ylabel=f"clean {name} top-1 (%)")
    ax_loss.set(title="training loss (CE + λR for SES)", ylabel="loss (nats)")
    for ax in (ax_acc, ax_loss):
        integer_epochs(ax)
    ax_acc.legend(fontsize=7)
    fig.suptitle(f"{exp}: mean over seeds, band ± 1 std", fontsize=10)
    return fig


def merged_layers(runs: list[list[dict]]) -> list[list[str]]:
    """Groups of layers whose probe-H curves are identical in every seed and epoch."""
    groups: list[list[str]] = []
    for layer in runs[0][0]["entropy"]:
        for g in groups:
            if all(row["entropy"][layer] == row["entropy"][g[0]] for r in runs for row in r):
                g.append(layer)
                break
        else:
            groups.append([layer])
    return groups


def entropy_figure(plt, exp: str, data: dict, config: str):
    curves, runs = data["curves"], data["runs"]
    base = runs[config][0].get("baseline_config", "baseline")
    base = config.replace(runs[config][0]["config"], base, 1)
    panels = [base, config] if base in curves and base != config else [config]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 2.5, 4.2), sharey=True, squeeze=False)
    for ax, c in zip(axes[0], panels):
        groups = merged_layers(curves[c])
        colors = plt.cm.viridis([i / max(len(groups) - 1, 1) for i in range(len(groups))])
        for color, group in zip(colors, groups):
            layer = group[0]
            line(ax, *mean_band(curves[c], lambda r: r["entropy"][layer]), color=color, label=" = ".join(group))
            if all(r[0].get("ses_entropy") for r in curves[c]):
                ep, mu, _ = mean_band(curves[c], lambda r: r.get("ses_entropy", {}).get(layer, float("nan")))
                ax.plot(ep, mu, color=color, ls=":", lw=1.2)
        targets: dict[float, list[str]] = {}
        for layer, t in (runs[c][0].get("entropy_target") or {}).items():
            targets.setdefault(round(t, 4), []).append(layer)
        for t, layers in targets.items():
            ax.axhline(t, color="0.45", ls="--", lw=0.8)
            ax.annotate(f"target {t:.2f}: {', '.join(layers)}", (1, t), xycoords=("axes fraction", "data"),
                        xytext=(-3, 2), textcoords="offset points", ha="right", va="bottom", fontsize=6, color="0.3")
        ax.set_title(c)
        integer_epochs(ax)
    axes[0][0].set_ylabel("spectral entropy H (nats)")
    axes[0][-1].legend(fontsize=7, title="layer", title_fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"{exp}: solid = eval-mode probe H (band ± 1 std over seeds), dotted = train-mode H that SES "
                 f"penalised, dashed grey = target", fontsize=9)
    return fig


def plot_experiment(plt, exp: str, data: dict, out_dir: Path) -> list[Path]:
    written = []
    if not data["curves"]:
        return written
    written += save(curves_figure(plt, exp, data), plt, out_dir / f"{exp}_curves")
    for config in [c for c in data["curves"] if data["runs"][c][0].get("ses_steps", 0) > 0]:
        written += save(entropy_figure(plt, exp, data, config), plt, out_dir / f"{exp}_entropy_{config}")
    for run_name, path in data["attention"].items():
        written += save(attention_figure(plt, f"{exp} / {run_name}", path), plt, out_dir / f"{exp}_attention_{run_name}")
    return written


def slots_to_image(weights, perm, h: int, w: int):
    """Attention over token slots (N,) -> (h, w) image; slot j carries pixel perm[j] when permuted."""
    import torch
    out = torch.zeros_like(weights)
    out[perm if perm is not None else slice(None)] = weights
    return out.view(h, w).numpy()


def attention_figure(plt, title: str, path: Path, n_latents: int = 3):
    """Cross-attention of the first cross-attend for the saved test samples: one row per sample.
    Images: input | mean over latents | overlay | single latents (mapped back to pixel positions
    when the pixels were permuted). Point clouds: x-y projection coloured by attention."""
    import torch
    d = torch.load(path, map_location="cpu", weights_only=False)
    maps = d["maps"][:, 0].float()                        # (S, M, N): first cross-attend
    x, labels = d["inputs"], d["labels"]
    is_image = x.dtype == torch.uint8
    cols = 3 + n_latents if is_image else 1 + n_latents
    fig, axes = plt.subplots(len(x), cols, figsize=(2.3 * cols, 2.3 * len(x)), squeeze=False)
    for i in range(len(x)):
        heads = [("mean over latents", maps[i].mean(0))] + [(f"latent {j}", maps[i, j]) for j in range(n_latents)]
        if is_image:
            h, w = x.shape[2:]
            perm = d.get("pixel_perm")
            img = x[i].permute(1, 2, 0).numpy()
            axes[i][0].imshow(img)
            axes[i][0].set_title(f"input (label {int(labels[i])})", fontsize=8)
            axes[i][1].imshow(slots_to_image(heads[0][1], perm, h, w), cmap="viridis")
            axes[i][1].set_title("attention, mean over latents", fontsize=8)
            axes[i][2].imshow(img)
            axes[i][2].imshow(slots_to_image(heads[0][1], perm, h, w), cmap="viridis", alpha=0.6)
            axes[i][2].set_title("overlay", fontsize=8)
            for k, (name, wts) in enumerate(heads[1:], start=3):
                axes[i][k].imshow(slots_to_image(wts, perm, h, w), cmap="viridis")
                axes[i][k].set_title(name, fontsize=8)
        else:
            for k, (name, wts) in enumerate(heads):
                axes[i][k].scatter(x[i, :, 0], x[i, :, 1], c=wts.numpy(), s=2, cmap="viridis")
                axes[i][k].set_title(f"{name} (label {int(labels[i])})" if k == 0 else name, fontsize=8)
                axes[i][k].set_aspect("equal")
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{title}: cross-attention weights, epoch {d['epoch']}", fontsize=10)
    return fig


def save(fig, plt, stem: Path) -> list[Path]:
    """stem.pdf and stem.png, each written to a temp name and moved into place; nothing cut off."""
    written = []
    for ext in ("pdf", "png"):
        path = stem.with_name(f"{stem.name}.{ext}")
        tmp = stem.with_name(f"{stem.name}.tmp.{ext}")
        fig.savefig(tmp, dpi=130, bbox_inches="tight")
        os.replace(tmp, path)
        written.append(path)
    plt.close(fig)
    return written
