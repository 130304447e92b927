"""Results folder -> the paper's tables (Markdown + LaTeX booktabs) and plots.

    python report.py results                 # writes results/report.md, results/tables.tex, results/plots/
    python report.py results --reference results/paper_reference.json

Reads every <experiment>/<config>_seed<N>/result.json (and metrics.jsonl) under RESULTS_DIR.
Per experiment, one row per config: acc, rob, gap as mean +- std over seeds (std with n - 1,
omitted for a single seed), n, delta acc / delta rob vs that experiment's baseline in percentage
points, overhead where measured, and the paper's figure beside ours where one exists. Final-epoch
numbers only: nothing is selected on the test set. Unfinished runs are listed, never averaged in.
Plots (matplotlib, optional): test accuracy and training loss per epoch for every config, and the
per-layer spectral entropy per epoch against the dashed beta*log d targets, baseline vs SES.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

CAPTIONS = {
    "exp10_periodic_ses": "Periodic SES on CIFAR-100 (ResNet-18): SES applied every $k$-th step.",
    "exp11_resnet50_tinyimagenet": "ResNet-50 on Tiny-ImageNet: baseline vs SES on layer4 + avgpool.",
    "exp12_mixup_cutmix_cifar100": "SES combined with Mixup and CutMix on CIFAR-100 (ResNet-18).",
    "exp13_perceiver": "Perceiver on CIFAR-10 and ModelNet40, with and without SES on the latents.",
}
METRICS = ("acc", "rob", "gap")


# ----------------------------------------------------------------------------- reading
def read_runs(root: Path) -> dict[str, dict]:
    """experiment -> {"runs": {config: [result, ...]}, "unfinished": [run names], "curves": {config: [metrics]}}."""
    out: dict[str, dict] = {}
    for exp_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in ("plots", "smoke", "synthetic")):
        exp = {"runs": {}, "unfinished": [], "failed": [], "curves": {}, "attention": {}}
        for run_dir in sorted(p for p in exp_dir.iterdir() if p.is_dir() and "_seed" in p.name):
            result = run_dir / "result.json"
            if not result.is_file():
                if (run_dir / "failure.json").is_file():
                    f = json.loads((run_dir / "failure.json").read_text())
                    exp["failed"].append(f"{run_dir.name} ({f.get('stage')}: {f.get('message')})")
                elif (run_dir / "config.json").is_file():
                    exp["unfinished"].append(run_dir.name)
                continue
            r = json.loads(result.read_text())
            r.setdefault("variant", r["config"])
            exp["runs"].setdefault(r["variant"], []).append(r)
            maps = sorted((run_dir / "attention").glob("epoch_*.pt"))
            if maps:
                exp["attention"][run_dir.name] = maps[-1]  # the latest saved epoch
            metrics = run_dir / "metrics.jsonl"
            if metrics.is_file():
                rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
                exp["curves"].setdefault(r["variant"], []).append(rows)
        order = config_order(exp_dir, list(exp["runs"]))
        exp["runs"] = {c: exp["runs"][c] for c in order}
        exp["curves"] = {c: exp["curves"][c] for c in order if c in exp["curves"]}
        if exp["runs"] or exp["unfinished"] or exp["failed"]:
            out[exp_dir.name] = exp
    return out


def read_runs_safe(root: Path) -> dict:
    return read_runs(root) if root.is_dir() else {}


def config_order(exp_dir: Path, configs: list[str]) -> list[str]:
    """The grid order recorded in summary.json, else baseline first and the rest alphabetical."""
    summary = exp_dir / "summary.json"
    listed = [r["config"] for r in json.loads(summary.read_text()).get("runs", [])] if summary.is_file() else []
    ranked = list(dict.fromkeys([c for c in listed if c in configs] + (["baseline"] if "baseline" in configs else [])))
    return ranked + sorted(c for c in configs if c not in ranked)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std (n - 1); std is None for a single value."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


# two-sided 95 % Student t quantiles t(0.975, df), df = n - 1
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t975(df: int) -> float:
    return T975.get(df) or T975[max(k for k in T975 if k <= df)] if df < 30 else 1.96 + 2.4 / df


def paired_delta(results: list[dict], twin: list[dict], metric: str):
    """(mean, (lo, hi) or None, n) of the per-seed differences in percentage points, seeds paired."""
    by_seed = {r["seed"]: r[metric] for r in twin}
    deltas = [100 * (r[metric] - by_seed[r["seed"]]) for r in results if r["seed"] in by_seed]
    if not deltas:
        return None
    mu = statistics.fmean(deltas)
    if len(deltas) < 2:
        return mu, None, 1
    half = t975(len(deltas) - 1) * statistics.stdev(deltas) / len(deltas) ** 0.5
    return mu, (mu - half, mu + half), len(deltas)


def summarize(runs: dict[str, list[dict]], reference: dict, kind: str | None = None) -> list[dict]:
    """One row per variant: means/stds in percent, and the Δ against the config's twin (its
    `baseline_config`, with the same overrides) paired by seed, with a 95 % CI when n >= 2.
    A paper figure is shown only for a real run whose settings are the config's own."""
    rows = []
    for variant, results in runs.items():
        config = results[0]["config"]
        twin_name = results[0].get("baseline_config", "baseline")
        twin_variant = variant.replace(config, twin_name, 1)
        twin = runs.get(twin_variant) if twin_name != config else None
        row = {"config": variant, "n": len(results), "seeds": sorted(r["seed"] for r in results)}
        for m in METRICS:
            mu, sd = mean_std([r[m] for r in results])
            row[m] = (100 * mu, None if sd is None else 100 * sd)
        overheads = [r["overhead"] for r in results if r.get("overhead") is not None]
        row["overhead"] = statistics.fmean(overheads) if overheads else None
        row["vs"] = twin_variant if twin else None
        row["d_acc"] = paired_delta(results, twin, "acc") if twin else None
        row["d_rob"] = paired_delta(results, twin, "rob") if twin else None
        row["paper"] = reference.get(config) if (kind is None and variant == config) else None
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- formatting
def fmt_ms(ms, tex=False) -> str:
    mu, sd = ms
    if sd is None:
        return f"{mu:.2f}"
    return f"{mu:.2f} $\\pm$ {sd:.2f}" if tex else f"{mu:.2f} ± {sd:.2f}"


def fmt_delta(v, tex=False) -> str:
    """+5.00 [+2.52, +7.48] (n = 3); '~0' marks an interval that contains 0 (within seed noise)."""
    if v is None:
        return "--" if tex else "—"
    mu, ci, _ = v
    if ci is None:
        return f"${mu:+.2f}$" if tex else f"{mu:+.2f}"
    noise = ci[0] <= 0 <= ci[1]
    if tex:
        return f"${mu:+.2f}$ [{ci[0]:+.1f}, {ci[1]:+.1f}]" + ("$^\\circ$" if noise else "")
    return f"{mu:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]" + (" ~0" if noise else "")


def fmt_overhead(v, tex=False) -> str:
    if v is None:
        return "—"
    return f"${100 * v:+.0f}\\,\\%$" if tex else f"{100 * v:+.0f} %"


def fmt_paper(p, tex=False) -> str:
    if not p:
        return "—"
    text = f"{p['acc']:.2f} / {p['rob']:.2f}"
    if p.get("overhead") is not None:
        text += f" ({fmt_overhead(p['overhead'], tex)})"
    return text


KIND_NOTE = {"smoke": "SMOKE RESULTS: tiny generated data, 2 epochs; they test the pipeline and say nothing about SES.",
             "synthetic": "SYNTHETIC RESULTS: generated data of the real shapes; for timing and memory only."}


def markdown(experiments: dict, tables: dict, kind: str | None = None) -> str:
    out = ["# SES results" + (f" ({kind.upper()}: not paper numbers)" if kind else ""), ""]
    out += [f"**{KIND_NOTE[kind]}**", ""] if kind else []
    out += ["Mean ± std over seeds (std with n − 1, omitted for one seed); final epoch; "
            "acc = clean test top-1; rob = our definition: top-1 under additive Gaussian noise σ = 0.1 on [0, 1] "
            "pixels (on point coordinates for ModelNet40), clamped, fixed noise seed; the paper's rob figures were "
            "measured under the paper's own definition. gap = train_acc − acc. Δ = per-seed difference against the "
            "config's twin (`mixup_ses` vs `mixup`, `ses` vs `baseline`), in percentage points: mean, and the 95 % "
            "Student-t interval (n − 1) when n ≥ 2; ~0 marks an interval containing 0 (within seed noise). "
            "overhead = median epoch time ÷ the twin's − 1.", ""]
    for exp, rows in tables.items():
        out += [f"## {exp}", "", CAPTIONS.get(exp, ""), "",
                "| config | n | acc (%) | rob (%) | gap (pp) | Δ acc | Δ rob | overhead | paper acc / rob |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            out.append(f"| {r['config']} | {r['n']} | {fmt_ms(r['acc'])} | {fmt_ms(r['rob'])} | {fmt_ms(r['gap'])} | "
                       f"{fmt_delta(r['d_acc'])} | {fmt_delta(r['d_rob'])} | {fmt_overhead(r['overhead'])} | "
                       f"{fmt_paper(r['paper'])} |")
        unfinished = experiments[exp]["unfinished"]
        if unfinished:
            out += ["", f"Unfinished (not averaged in): {', '.join(unfinished)}"]
        if experiments[exp]["failed"]:
            out += ["", "Failed (not averaged in; rerun the same command to retry):"]
            out += [f"- {f}" for f in experiments[exp]["failed"]]
        out.append("")
    return "\n".join(out)


def tex_escape(s: str) -> str:
    return s.replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("%", "\\%").replace("&", "\\&")


def latex(experiments: dict, tables: dict, kind: str | None = None) -> str:
    out = ["% Generated by report.py; needs \\usepackage{booktabs}. \\input{tables.tex} in the paper."]
    for exp, rows in tables.items():
        n_seeds = sorted({r["n"] for r in rows})
        if n_seeds == [1]:
            seeds = "one seed (no spread)"
        elif len(n_seeds) == 1:
            seeds = f"mean $\\pm$ std over $n = {n_seeds[0]}$ seeds"
        else:
            seeds = "mean $\\pm$ std over the $n$ seeds of each row"
        caption = (f"{CAPTIONS.get(exp, tex_escape(exp))} Final-epoch test accuracy (Acc), accuracy under our "
                   f"Gaussian noise $\\sigma = 0.1$ (Rob; the paper's figures use its own definition) and "
                   f"train--test gap, {seeds}; $\\Delta$: paired per-seed difference vs.\\ the config's twin "
                   f"in percentage points, with a 95\\,\\% $t$-interval when $n \\ge 2$ ($^\\circ$: contains 0).")
        if kind:
            caption = f"{kind.upper()} RESULTS, NOT PAPER NUMBERS. " + caption
        out += ["", "\\begin{table}[t]", "\\centering", "\\small", f"\\caption{{{caption}}}",
                f"\\label{{tab:{exp}}}", "\\begin{tabular}{lrrrrrrrl}", "\\toprule",
                "Config & $n$ & Acc (\\%) & Rob (\\%) & Gap (pp) & $\\Delta$Acc & $\\Delta$Rob & Overhead & "
                "Paper Acc / Rob \\\\", "\\midrule"]
        for r in rows:
            out.append(f"{tex_escape(r['config'])} & {r['n']} & {fmt_ms(r['acc'], True)} & {fmt_ms(r['rob'], True)} & "
                       f"{fmt_ms(r['gap'], True)} & {fmt_delta(r['d_acc'], True)} & {fmt_delta(r['d_rob'], True)} & "
                       f"{fmt_overhead(r['overhead'], True).replace('—', '--')} & "
                       f"{fmt_paper(r['paper'], True).replace('—', '--')} \\\\")
        out += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
        if experiments[exp]["unfinished"]:
            out.append(f"% unfinished runs, not averaged in: {', '.join(experiments[exp]['unfinished'])}")
        for f in experiments[exp]["failed"]:
            out.append(f"% failed run, not averaged in: {f}")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- plots
def mean_curve(curves: list[list[dict]], key: str) -> tuple[list[int], list[float]]:
    """Per-epoch mean over seeds, over the epochs every seed has."""
    n = min(len(c) for c in curves)
    return ([curves[0][i]["epoch"] for i in range(n)],
            [statistics.fmean(c[i][key] for c in curves) for i in range(n)])


def plot_experiment(plt, exp: str, data: dict, out_dir: Path) -> list[Path]:
    written = []
    curves = data["curves"]
    if not curves:
        return written
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    split = "val" if any("val_acc" in runs[0][0] for runs in curves.values()) else "test"
    for config, runs in curves.items():
        ep, acc = mean_curve(runs, f"{split}_acc" if f"{split}_acc" in runs[0][0] else "test_acc")
        ax_acc.plot(ep, [100 * a for a in acc], label=f"{config} (n={len(runs)})")
        ep, loss = mean_curve(runs, "train_loss")
        ax_loss.plot(ep, loss, label=config)
    name = "validation (hold-out)" if split == "val" else "test"
    ax_acc.set(title=f"{exp}: {name} accuracy", xlabel="epoch", ylabel=f"clean {name} top-1 (%)")
    ax_loss.set(title=f"{exp}: training loss (CE + λR for SES)", xlabel="epoch", ylabel="loss (nats)")
    ax_acc.legend(fontsize=8)
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    written.append(save(fig, plt, out_dir / f"{exp}_curves.png"))

    targets = {c: runs[0]["entropy_target"] for c, runs in data["runs"].items() if runs[0].get("entropy_target")}
    for config in [c for c in curves if data["runs"][c][0].get("ses_steps", 0) > 0]:
        base = data["runs"][config][0].get("baseline_config", "baseline")
        panels = [base, config] if base in curves and base != config else [config]
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), sharey=True, squeeze=False)
        for ax, c in zip(axes[0], panels):
            layers = list(curves[c][0][0]["entropy"])
            colors = plt.cm.viridis([i / max(len(layers) - 1, 1) for i in range(len(layers))])
            for color, layer in zip(colors, layers):
                n = min(len(r) for r in curves[c])
                ep = [curves[c][0][i]["epoch"] for i in range(n)]
                h = [statistics.fmean(r[i]["entropy"][layer] for r in curves[c]) for i in range(n)]
                ax.plot(ep, h, color=color, label=layer)
                if layer in targets.get(c, {}):
                    ax.axhline(targets[c][layer], color=color, ls="--", lw=0.8)
            ax.set(title=f"{exp}: {c}", xlabel="epoch", ylabel="spectral entropy H (nats)")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7, title="layer (dashed: β·log d)", loc="center left", bbox_to_anchor=(1, 0.5))
        written.append(save(fig, plt, out_dir / f"{exp}_entropy_{config}.png"))
    for run_name, path in data["attention"].items():
        written.append(plot_attention(plt, f"{exp} / {run_name}", path, out_dir / f"{exp}_attention_{run_name}.png"))
    return written


def slots_to_image(weights, perm, h: int, w: int):
    """Attention over token slots (N,) -> (h, w) image; slot j carries pixel perm[j] when permuted."""
    import torch
    out = torch.zeros_like(weights)
    out[perm if perm is not None else slice(None)] = weights
    return out.view(h, w).numpy()


def plot_attention(plt, title: str, path: Path, out: Path, n_latents: int = 3) -> Path:
    """Cross-attention of the first cross-attend for the saved test samples: one row per sample.

    Images: input | mean over latents | overlay | single latents (mapped back to pixel positions
    when the pixels were permuted). Point clouds: x-y projection coloured by attention.
    """
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
    return save(fig, plt, out)


def save(fig, plt, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results_dir", type=Path, help="the --out-dir of the experiment scripts (e.g. results)")
    p.add_argument("--reference", type=Path, default=Path(__file__).resolve().parent / "results" / "paper_reference.json",
                   help="the paper's reference numbers (default %(default)s)")
    args = p.parse_args(argv)
    if not args.results_dir.is_dir():
        p.exit(2, f"report.py: error: {args.results_dir} is not a folder; pass the --out-dir of a sweep\n")
    experiments = read_runs(args.results_dir)
    kind = args.results_dir.resolve().name if args.results_dir.resolve().name in KIND_NOTE else None
    if not experiments:
        elsewhere = [str(args.results_dir / k) for k in KIND_NOTE if read_runs_safe(args.results_dir / k)]
        hint = f"; only smoke/synthetic results here: run python report.py {elsewhere[0]}" if elsewhere else ""
        p.exit(1, f"report.py: error: no <experiment>/<config>_seed<N>/result.json under {args.results_dir}{hint}\n")
    reference = json.loads(args.reference.read_text()) if args.reference.is_file() else {}
    tables = {exp: summarize(d["runs"], reference.get(exp, {}), kind) for exp, d in experiments.items()}
    write_text(args.results_dir / "report.md", markdown(experiments, tables, kind))
    write_text(args.results_dir / "tables.tex", latex(experiments, tables, kind))
    print(f"wrote {args.results_dir / 'report.md'} and {args.results_dir / 'tables.tex'}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib, or -r requirements-dev.txt)")
        return 0
    plots = args.results_dir / "plots"
    plots.mkdir(exist_ok=True)
    written = [f for exp, d in experiments.items() for f in plot_experiment(plt, exp, d, plots)]
    print(f"wrote {len(written)} plots to {plots}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
