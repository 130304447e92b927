"""report.py on a results folder written here: 2 configs x 3 seeds with known numbers."""
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import report
from reporting import plots as report_plots
from reporting import tables as report_tables

ROOT = Path(__file__).resolve().parents[1]
ACC = {"baseline": [0.70, 0.72, 0.74], "ses_k1": [0.75, 0.76, 0.80]}
ROB = {"baseline": [0.40, 0.41, 0.45], "ses_k1": [0.46, 0.47, 0.48]}
GAP = {"baseline": [0.10, 0.12, 0.14], "ses_k1": [0.05, 0.05, 0.08]}
OVERHEAD = [1.0, 1.2, 1.1]
LAYERS = {"layer4.1": 512, "avgpool": 512}


def write_results(root: Path):
    exp = root / "exp10_periodic_ses"
    for config in ("baseline", "ses_k1"):
        for seed in range(3):
            d = exp / f"{config}_seed{seed}"
            d.mkdir(parents=True)
            (d / "config.json").write_text("{}")
            r = dict(experiment=exp.name, config=config, seed=seed, acc=ACC[config][seed], rob=ROB[config][seed],
                     gap=GAP[config][seed], train_acc=ACC[config][seed] + GAP[config][seed],
                     entropy={k: 3.0 for k in LAYERS}, entropy_target={k: 0.7 * math.log(v) for k, v in LAYERS.items()},
                     ses_steps=0 if config == "baseline" else 30, total_steps=30, epochs=3)
            if config == "ses_k1":
                r["overhead"] = OVERHEAD[seed]
            (d / "result.json").write_text(json.dumps(r))
            rows = [dict(epoch=e, test_acc=0.2 * e + 0.01 * seed, train_loss=3.0 / e, entropy={k: 1.0 + e for k in LAYERS})
                    for e in (1, 2, 3)]
            (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    unfinished = exp / "ses_k1_seed3"
    unfinished.mkdir()
    (unfinished / "config.json").write_text("{}")
    single = root / "exp11_resnet50_tinyimagenet" / "baseline_seed0"
    single.mkdir(parents=True)
    (single / "result.json").write_text(json.dumps(dict(config="baseline", seed=0, acc=0.6, rob=0.3, gap=0.2)))


def test_tables_hold_hand_computed_statistics(tmp_path):
    write_results(tmp_path)
    assert report.main([str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    tex = (tmp_path / "tables.tex").read_text()
    # baseline acc 70/72/74: mean 72, sample std 2; ses acc 75/76/80: mean 77, std sqrt(7) = 2.65
    expected_md = ["| baseline | 3 | 72.00 ± 2.00 | 42.00 ± 2.65 | 12.00 ± 2.00 | — | — | — | 74.99 / 46.32 |",
                   # paired by seed: acc deltas 5, 4, 6 (mean 5, sd 1, t(.975, 2) = 4.303: 5 -+ 4.303 / sqrt 3 = [2.52, 7.48]);
                   # rob deltas 6, 6, 3 (mean 5, sd sqrt 3: 5 -+ 4.303 = [0.70, 9.30])
                   "| ses_k1 | 3 | 77.00 ± 2.65 | 47.00 ± 1.00 | 6.00 ± 1.73 | +5.00 [+2.52, +7.48] | +5.00 [+0.70, +9.30] "
                   "| +110 % | 76.11 / 47.70 (+195 %) |",
                   "| baseline | 1 | 60.00 | 30.00 | 20.00 | — | — | — | — |"]
    for line in expected_md:
        assert line in md, line
    assert "Unfinished (not averaged in): ses_k1_seed3" in md
    # LaTeX: spreads as subscripts with one decimal, delta +- the half-width of its 95 % interval (4.303 / sqrt 3 = 2.48),
    # the paper's figure on its own row
    expected_tex = ["baseline & 3 & $72.00_{\\pm 2.0}$ & $42.00_{\\pm 2.6}$ & $12.00_{\\pm 2.0}$ & -- & -- & -- \\\\",
                    "ses\\_\\allowbreak{}k1 & 3 & $77.00_{\\pm 2.6}$ & $47.00_{\\pm 1.0}$ & $6.00_{\\pm 1.7}$ & "
                    "$+5.00_{\\pm 2.5}$ & $+5.00_{\\pm 4.3}$ & $+110\\,\\%$ \\\\",
                    "\\quad\\textit{paper} &  & $76.11$ & $47.70$ &  &  &  & $+195\\,\\%$ \\\\",
                    "\\label{tab:exp10_periodic_ses}", "\\toprule", "\\bottomrule", "\\caption{"]
    for line in expected_tex:
        assert line in tex, line
    assert tex.count("\\begin{table}") == tex.count("\\end{table}") == 2
    assert "% unfinished run, not averaged in: ses_k1_seed3" in tex


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    write_results(tmp_path)
    report.main([str(tmp_path)])
    pngs = {p.name: p.stat().st_size for p in (tmp_path / "plots").glob("*.png")}
    assert {"exp10_periodic_ses_curves.png", "exp10_periodic_ses_entropy_ses_k1.png"} <= set(pngs)
    assert all(size > 10_000 for size in pngs.values())


def test_without_matplotlib_tables_are_still_written(tmp_path, monkeypatch, capsys):
    write_results(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert report.main([str(tmp_path)]) == 0
    assert (tmp_path / "tables.tex").is_file() and not (tmp_path / "plots").exists()
    assert "pip install matplotlib" in capsys.readouterr().out


def test_bad_folder_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        report.main([str(tmp_path / "nope")])
    assert e.value.code == 2


def test_twins_are_paired_by_seed_failed_runs_listed_and_smoke_marked(tmp_path):
    exp = tmp_path / "smoke" / "exp12_mixup_cutmix_cifar100"
    accs = {"baseline": [0.50, 0.60], "mixup": [0.70, 0.71], "mixup_ses": [0.71, 0.70]}
    for config, values in accs.items():
        for seed, acc in enumerate(values):
            d = exp / f"{config}_seed{seed}"
            d.mkdir(parents=True)
            (d / "result.json").write_text(json.dumps(dict(
                config=config, seed=seed, acc=acc, rob=acc / 2, gap=0.1, baseline_config="mixup" if config == "mixup_ses"
                else "baseline", experiment=exp.name)))
    bad = exp / "ses_seed0"
    bad.mkdir()
    (bad / "failure.json").write_text(json.dumps(dict(stage="epoch 3", message="non-finite loss")))
    with pytest.raises(SystemExit) as e:  # the out-dir holds only smoke results: say where they are
        report.main([str(tmp_path)])
    assert e.value.code == 1
    assert report.main([str(tmp_path / "smoke")]) == 0
    md = (tmp_path / "smoke" / "report.md").read_text()
    assert "SMOKE" in md.splitlines()[0]
    # mixup_ses vs mixup, not vs baseline: deltas +1, -1 -> mean 0, interval contains 0
    row = next(line for line in md.splitlines() if line.startswith("| mixup_ses |"))
    assert "| +0.00 [" in row and "~0" in row
    assert "ses_seed0 (epoch 3: non-finite loss)" in md
    assert "SMOKE RESULTS, NOT PAPER NUMBERS" in (tmp_path / "smoke" / "tables.tex").read_text()


# ----------------------------------------------------------------------------- LaTeX that drops in
def worst_rows(configs):
    """Rows as wide as real ones get: 3 seeds, negative and 3-digit values, an override, a paper row."""
    rows = []
    for c in configs:
        rows.append(dict(config=c + "+every=10", n=3, acc=(100.0, 10.55), rob=(-0.0, 12.34), gap=(-10.25, 10.5),
                         d_acc=(-10.25, (-22.22, 1.72), 3), d_rob=(+10.25, (-12.5, 33.0), 3), overhead=12.34,
                         paper=dict(acc=99.99, rob=99.99, overhead=19.95)))
    return rows


def test_computer_modern_metrics_match_tex():
    # TeX facts: cmr10 digits are 0.5 em (5 pt at 10 pt), '+' and '=' 0.7778 em, '.' 0.2778 em
    assert report_tables.text_width_pt("0123456789", font_pt=10) == pytest.approx(50.0)
    assert report_tables.text_width_pt("$+1.5$", font_pt=10) == pytest.approx(10 * (0.7778 + 0.5 + 0.2778 + 0.5))


def test_every_table_fits_a_single_column_article():
    import exp10_periodic_ses
    import exp11_resnet50_tinyimagenet
    import exp12_mixup_cutmix_cifar100
    import exp13_perceiver
    for module in (exp10_periodic_ses, exp11_resnet50_tinyimagenet, exp12_mixup_cutmix_cifar100, exp13_perceiver):
        body = report_tables.table_cells(worst_rows(list(module.GRID)))
        width = report_tables.tex_width_pt(body)
        assert width <= report_tables.TEXTWIDTH_PT, (module.__name__, width)


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed (the width estimate above holds)")
def test_tables_compile_without_an_overfull_box(tmp_path):
    write_results(tmp_path)
    exp = tmp_path / "exp12_mixup_cutmix_cifar100"  # and a table whose rows and pairs mix machines (marks, notes)
    for seed in range(3):
        write_run(exp, "ses", seed, 0.7 + seed / 100, **(dict(amp="fp16", device="Tesla T4") if seed else {}))
    for seed in range(2):
        write_run(exp, "baseline", seed, 0.69, processes=2 if seed else 1)
    assert report.main([str(tmp_path)]) == 0
    assert "\\dagger" in (tmp_path / "tables.tex").read_text()
    (tmp_path / "paper.tex").write_text("\\documentclass{article}\\usepackage{booktabs}\\input{macros.tex}"
                                        "\\begin{document}\\input{tables.tex}\\sesExpTenSesKOneAcc\\end{document}\n")
    p = subprocess.run(["pdflatex", "-interaction=nonstopmode", "paper.tex"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    log = (tmp_path / "paper.log").read_text(errors="replace")
    assert p.returncode == 0 and "Overfull \\hbox" not in log, log[-3000:]


def test_macros_hold_each_headline_number(tmp_path):
    write_results(tmp_path)
    assert report.main([str(tmp_path)]) == 0
    tex = (tmp_path / "macros.tex").read_text()
    defs = dict(re.findall(r"\\newcommand\{\\([A-Za-z]+)\}\{([^}]*)\}", tex))
    assert len(defs) == tex.count("\\newcommand")  # every name is letters only (a valid command name)
    # hand-computed above: ses_k1 acc 77.00 +- 2.65, delta +5.00 with half-width 4.303 / sqrt 3 = 2.48,
    # rob delta +5.00 +- 4.30, overhead mean(1.0, 1.2, 1.1) = +110 %
    assert defs["sesExpTenSesKOneAcc"] == "77.00" and defs["sesExpTenSesKOneAccStd"] == "2.65"
    assert defs["sesExpTenSesKOneDeltaAcc"] == "+5.00" and defs["sesExpTenSesKOneDeltaAccCI"] == "2.48"
    assert defs["sesExpTenSesKOneDeltaRobCI"] == "4.30" and defs["sesExpTenSesKOneOverhead"] == "+110"
    assert defs["sesExpTenSesKOneN"] == "3" and defs["sesExpElevenBaselineAcc"] == "60.00"
    assert "sesExpElevenBaselineAccStd" not in defs  # one seed: no spread
    assert report_tables.macro_part("cifar10_permuted_learned_ses+every=3") == "CifarTenPermutedLearnedSesEveryThree"


# ----------------------------------------------------------------------------- figures
def test_figures_are_pdf_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    write_results(tmp_path)
    report.main([str(tmp_path)])
    for stem in ("exp10_periodic_ses_curves", "exp10_periodic_ses_entropy_ses_k1"):
        assert (tmp_path / "plots" / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
        assert (tmp_path / "plots" / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
    assert not list((tmp_path / "plots").glob("*.tmp.*"))


def fake_experiment(configs: dict[str, str], seeds=2, epochs=3, layers=("layer4.1", "avgpool", "layer3.0")):
    """configs: variant -> its twin. Layer4.1 and avgpool get identical curves, as in a ResNet."""
    runs, curves = {}, {}
    for c, twin in configs.items():
        runs[c] = [dict(config=c, seed=s, baseline_config=twin, ses_steps=0 if c == twin else 5,
                        entropy_target={k: 4.0 for k in layers}) for s in range(seeds)]
        curves[c] = [[dict(epoch=e, test_acc=0.1 * e + 0.01 * s, train_loss=1 / e,
                           entropy={k: (2.0 if k == "layer3.0" else 3.0) + 0.1 * e + 0.01 * s for k in layers},
                           **({} if c == twin else {"ses_entropy": {k: 3.5 for k in layers}}))
                      for e in range(1, epochs + 1)] for s in range(seeds)]
    return dict(runs=runs, curves=curves, attention={})


def test_twins_share_a_colour_with_distinct_line_styles():
    pytest.importorskip("matplotlib")
    style = report_plots.styles(fake_experiment({"baseline": "baseline", "ses": "baseline", "mixup": "mixup",
                                                 "mixup_ses": "mixup"}))
    assert style["mixup"][0] == style["mixup_ses"][0] and style["mixup"][1] != style["mixup_ses"][1]
    assert style["baseline"][0] == style["ses"][0] and style["mixup"][0] != style["baseline"][0]
    periodic = report_plots.styles(fake_experiment({"baseline": "baseline", "ses_k1": "baseline", "ses_k3": "baseline"}))
    assert periodic["baseline"] == ("black", "--") and periodic["ses_k1"][0] != periodic["ses_k3"][0]


def test_curves_have_seed_bands_and_integer_epoch_ticks():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data = fake_experiment({"mixup": "mixup", "mixup_ses": "mixup"})
    fig = report_plots.curves_figure(plt, "exp12", data)
    ax = fig.axes[0]
    assert len(ax.collections) == 2  # one band per config (n = 2 seeds)
    assert all(float(t).is_integer() for t in ax.get_xticks())
    fig = report_plots.entropy_figure(plt, "exp12", data, "mixup_ses")
    labels = fig.axes[1].get_legend_handles_labels()[1]
    assert "layer4.1 = avgpool" in labels and "layer3.0" in labels  # identical spectra drawn once, named together
    dotted = [ln for ln in fig.axes[1].lines if ln.get_linestyle() == ":"]
    assert len(dotted) == 2  # the penalised train-mode H of each (merged) layer
    assert not [ln for ln in fig.axes[0].lines if ln.get_linestyle() == ":"]  # the twin has no SES steps
    plt.close("all")


# ----------------------------------------------------------------------------- runs of several machines
def write_run(exp: Path, config: str, seed: int, acc: float, amp="bf16", device="NVIDIA L40S", processes=1):
    d = exp / f"{config}_seed{seed}"
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps(dict(
        experiment=exp.name, config=config, seed=seed, acc=acc, rob=acc / 2, gap=0.1, baseline_config="baseline",
        amp=amp, device=device, processes=processes)))


def test_a_delta_counts_its_pairs_and_runs_that_ran_differently_are_marked(tmp_path):
    exp = tmp_path / "exp10_periodic_ses"
    for seed, acc in enumerate([0.70, 0.72, 0.74]):  # ses_k1: 3 seeds, seed 2 on a T4 under fp16
        write_run(exp, "ses_k1", seed, acc, **(dict(amp="fp16", device="Tesla T4") if seed == 2 else {}))
    for seed, acc in enumerate([0.68, 0.69]):  # baseline: 2 seeds, seed 1 under torchrun on 2 GPUs
        write_run(exp, "baseline", seed, acc, **(dict(processes=2) if seed == 1 else {}))
    assert report.main([str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| ses_k1"))
    cells = [c.strip() for c in row.split("|")]
    assert cells[1] == "ses_k1 † ‡" and cells[2] == "3 (Δ: 2)"
    # Δ acc over the 2 pairs only: (70 - 68, 72 - 69) = (2, 3), mean 2.5
    assert cells[6].startswith("+2.50 [")
    assert "† `ses_k1` averages runs that ran differently: bf16 on NVIDIA L40S (2), fp16 on Tesla T4 (1)." in md
    assert "‡ `ses_k1` vs its twin: seed 1: bf16 on NVIDIA L40S vs bf16 on NVIDIA L40S x2 processes." in md
    base = next(line for line in md.splitlines() if line.startswith("| baseline"))
    assert base.split("|")[1].strip() == "baseline †" and base.split("|")[2].strip() == "2"
    tex = (tmp_path / "tables.tex").read_text()
    assert "ses\\_\\allowbreak{}k1$^\\dagger$$^\\ddagger$ & 3/2 &" in tex and "seed pairs behind $\\Delta$" in tex
    defs = dict(re.findall(r"\\newcommand\{\\([A-Za-z]+)\}\{([^}]*)\}", (tmp_path / "macros.tex").read_text()))
    assert defs["sesExpTenSesKOneN"] == "3" and defs["sesExpTenSesKOneDeltaN"] == "2"
    assert defs["sesExpTenSesKOneDeltaAcc"] == "+2.50"
