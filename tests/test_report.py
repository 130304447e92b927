"""report.py on results folders written here with known numbers: the statistics against hand
computations, the tables, macros and CSV, the label table's styles, the LaTeX layouts."""
import contextlib
import csv
import io
import json
import math
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import report
from reporting import cells, labels, latex, stats
from reporting import tables as report_tables

ROOT = Path(__file__).resolve().parents[1]
ACC = {"baseline": [0.70, 0.72, 0.74], "ses_k1": [0.75, 0.76, 0.80]}
ROB = {"baseline": [0.40, 0.41, 0.45], "ses_k1": [0.46, 0.47, 0.48]}
GAP = {"baseline": [0.10, 0.12, 0.14], "ses_k1": [0.05, 0.05, 0.08]}
EPOCH_S = {"baseline": [10.0, 20.0, 40.0], "ses_k1": [20.0, 44.0, 84.0]}  # per seed: +100, +120, +110 % over the twin
LAYERS = {"layer4.1": 512, "avgpool": 512}


def write_run(exp: Path, variant: str, seed: int, settings=None, metrics=None, **result):
    d = exp / f"{variant}_seed{seed}"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"config": dict(settings or {}, config=variant.split("+")[0])}))
    r = dict(dict(experiment=exp.name, config=variant.split("+")[0], seed=seed, baseline_config="baseline",
                  amp="bf16", device="NVIDIA L40S", processes=1), **result)
    r.setdefault("rob", r["acc"] / 2)
    r.setdefault("gap", 0.1)
    (d / "result.json").write_text(json.dumps(r))
    if metrics is not None:
        (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in metrics))
    return d


def write_results(root: Path):
    exp = root / "exp10_periodic_ses"
    for config in ("baseline", "ses_k1"):
        for seed in range(3):
            rows = [dict(epoch=e, test_acc=0.2 * e + 0.01 * seed, test_loss=3.0 / e, train_loss=3.0 / e,
                         entropy={k: 1.0 + e for k in LAYERS}) for e in (1, 2, 3)]
            write_run(exp, config, seed, dict(ses=config != "baseline", every=1), rows,
                      acc=ACC[config][seed], rob=ROB[config][seed], gap=GAP[config][seed],
                      robustness={"gauss_0.1": ROB[config][seed], "fgsm_1/255": ACC[config][seed] / 3},
                      entropy={k: 3.0 for k in LAYERS},
                      entropy_target={k: 0.7 * math.log(v) for k, v in LAYERS.items()},
                      ses_steps=0 if config == "baseline" else 30, total_steps=30, epochs=3,
                      epoch_time_s=EPOCH_S[config][seed])
    unfinished = exp / "ses_k1_seed3"
    unfinished.mkdir()
    (unfinished / "config.json").write_text(json.dumps({"config": {"ses": True}}))
    write_run(root / "exp11_resnet50_tinyimagenet", "baseline", 0, acc=0.6, rob=0.3, gap=0.2)


def md_row(md: str, first: str) -> list[str]:
    line = next(line for line in md.splitlines() if line.startswith(f"| {first} |"))
    return [c.strip() for c in line.split("|")[1:-1]]


def test_tables_hold_hand_computed_statistics(tmp_path, capsys):
    write_results(tmp_path)
    assert report.main([str(tmp_path), "--no-figures"]) == 0
    md = (tmp_path / "report.md").read_text()
    # baseline acc 70/72/74: mean 72, sample std 2; ses acc 75/76/80: mean 77, std sqrt(7) = 2.65.
    # Paired by seed, acc deltas 5, 4, 6: mean 5, sd 1, t(.975, 2) = 4.303: 5 -+ 4.303 / sqrt 3 = [2.52, 7.48];
    # rob deltas 6, 6, 3: mean 5, sd sqrt 3: 5 -+ 4.303 = [0.70, 9.30]. Seeds at which each interval excludes 0:
    # n = 2 gives 12.706 sd / sqrt 2 (8.98, 15.56) > 5, n = 3 gives 4.303 sd / sqrt 3 (2.48, 4.30) < 5: 3 and 3.
    assert md_row(md, "ses_k1") == ["ses_k1", "SES k=1", "Baseline", "3", "77.00 ± 2.65", "47.00 ± 1.00", "6.00 ± 1.73",
                                    "+5.00 [+2.52, +7.48]", "+5.00 [+0.70, +9.30]", "3 / 3"]
    assert md_row(md, "baseline")[:7] == ["baseline", "Baseline", "—", "3", "72.00 ± 2.00", "42.00 ± 2.65",
                                          "12.00 ± 2.00"]
    # the paper's table: median of the per-seed overheads +100, +120, +110 % is +110 %, range [+100, +120]; the
    # paper's figures beside
    assert md_row(md, "SES k=1") == ["SES k=1", "77.00 ± 2.65", "47.00 ± 1.00", "+110 % [+100, +120]", "76.11",
                                     "47.70", "+195 %"]
    assert md_row(md, "Baseline")[:4] == ["Baseline", "72.00 ± 2.00", "42.00 ± 2.65", "—"]
    assert "measured in bf16 on NVIDIA L40S" in md
    assert "Unfinished (not averaged in): ses_k1_seed3" in md
    # the robustness suite: FGSM 1/255 = acc / 3 per seed -> 24.00 and 25.67
    assert md_row(md, "SES k=1")[:1] == ["SES k=1"]
    robust = [line for line in md.splitlines() if line.startswith("| SES k=1 |")][-1]
    assert "| 25.67 ± " in robust and "| 47.00 ± 1.00 |" in robust
    tex = (tmp_path / "tables.tex").read_text()
    assert "SES $k{=}1$\\newline{\\scriptsize vs.\\ Baseline} & 3 & $77.00_{\\pm 2.6}$" in tex
    assert "$+5.00_{\\pm 2.5}$ & $+5.00_{\\pm 4.3}$ & \\begin{tabular}[t]{@{}r@{}}3 \\\\ 3\\end{tabular} \\\\" in tex
    assert ("\\begin{tabular}[t]{@{}r@{}}$+110\\,\\%$ \\\\ {\\scriptsize $[+100, +120]$}\\end{tabular} & $76.11$ & $47.70$ & "
            "$+195\\,\\%$ \\\\") in tex
    assert tex.count("\\begin{table") == tex.count("\\end{table") and "\\label{tab:exp10_periodic_ses-full}" in tex
    assert "% unfinished run, not averaged in: ses_k1_seed3" in tex


def test_a_delta_names_its_twin_and_the_interaction_is_paired_by_seed(tmp_path):
    exp = tmp_path / "exp12_mixup_cutmix_cifar100"
    accs = {"baseline": [0.50, 0.60, 0.55], "ses": [0.52, 0.61, 0.58], "mixup": [0.70, 0.71, 0.69],
            "mixup_ses": [0.75, 0.73, 0.74]}
    for config, values in accs.items():
        for seed, acc in enumerate(values):
            write_run(exp, config, seed, dict(ses=config.endswith("ses")), acc=acc,
                      baseline_config="mixup" if config == "mixup_ses" else "baseline")
    assert report.main([str(tmp_path), "--no-figures"]) == 0
    md = (tmp_path / "report.md").read_text()
    assert md_row(md, "mixup_ses")[:3] == ["mixup_ses", "Mixup + SES", "Mixup"]  # vs its twin, named
    assert md_row(md, "mixup")[:3] == ["mixup", "Mixup", "Baseline"]
    # SES's gain alone per seed: 2, 1, 3; with Mixup: 5, 2, 5; interaction 3, 1, 2: mean 2, sd 1 -> [-0.48, +4.48]
    row = md_row(md, "Mixup + SES vs. Mixup")
    assert row[1].startswith("+4.00 [") and row[3] == "+2.00 [-0.48, +4.48] °"
    assert md_row(md, "SES vs. Baseline")[3] == "—"
    defs = dict(re.findall(r"\\newcommand\{\\([A-Za-z]+)\}\{\\ensuremath\{([^}]*)\}\}", (tmp_path / "macros.tex").read_text()))
    assert defs["sesExpTwelveMixupSesInteractionAcc"] == "+2.00" and defs["sesExpTwelveMixupSesInteractionAccCI"] == "2.48"


def test_t_quantiles_match_the_t_distribution():
    """t975(df) against the Student-t CDF integrated numerically (Simpson) from its density."""
    def cdf(t, df, steps=4000):
        c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
        f = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731
        h = t / steps
        area = f(0) + f(t) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, steps))
        return 0.5 + area * h / 3
    for df in (2, 3, 5, 9, 17, 29, 30, 31, 45, 120):
        assert cdf(stats.t975(df), df) == pytest.approx(0.975, abs=2e-5), df


def test_seeds_needed_is_where_the_interval_first_excludes_zero():
    rng = random.Random(0)
    for _ in range(200):
        seeds = rng.randint(2, 6)
        a = {s: rng.gauss(0, 1) for s in range(seeds)}
        b = {s: a[s] - rng.gauss(rng.uniform(-1, 1), rng.uniform(0.1, 3)) for s in range(seeds)}
        d = stats.paired(a, b)
        diffs = [a[s] - b[s] for s in range(seeds)]
        mean, sd = sum(diffs) / seeds, math.sqrt(sum((x - sum(diffs) / seeds) ** 2 for x in diffs) / (seeds - 1))
        assert d.mean == pytest.approx(mean) and d.std == pytest.approx(sd)
        assert (d.lo > 0 or d.hi < 0) == (seeds >= d.seeds_needed)  # the interval excludes 0 from that n on
        n = d.seeds_needed
        if n < stats.SEEDS_CAP:
            assert stats.t975(n - 1) * sd / math.sqrt(n) < abs(mean)
            assert n == 2 or stats.t975(n - 2) * sd / math.sqrt(n - 1) >= abs(mean)
    assert stats.paired({0: 1.0, 1: float("nan")}, {0: 0.5, 1: 0.2}) == stats.Delta(0.5, None, 1, None, None, None)
    assert stats.mean_std([None, float("nan"), 2.0, 4.0]) == stats.Spread(3.0, math.sqrt(2), 2)


def test_macros_typeset_numbers_in_math_and_help_shows_newcommand(tmp_path, capsys):
    write_results(tmp_path)
    assert report.main([str(tmp_path), "--no-figures"]) == 0
    tex = (tmp_path / "macros.tex").read_text()
    defs = dict(re.findall(r"\\newcommand\{\\([A-Za-z]+)\}\{\\ensuremath\{([^}]*)\}\}", tex))
    assert len(defs) == tex.count("\\newcommand")  # letters-only names, every value in math mode
    assert defs["sesExpTenSesKOneAcc"] == "77.00" and defs["sesExpTenSesKOneDeltaAccCI"] == "2.48"
    assert defs["sesExpTenSesKOneDeltaAcc"] == "+5.00" and defs["sesExpTenSesKOneDeltaAccSeeds"] == "3"
    assert (defs["sesExpTenSesKOneOverhead"], defs["sesExpTenSesKOneOverheadMin"], defs["sesExpTenSesKOneOverheadMax"]) \
        == ("+110", "+100", "+120")
    assert "sesExpElevenBaselineAccStd" not in defs  # one seed: no spread
    with pytest.raises(SystemExit) as e:
        report.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "\\newcommand" in out and "ewcommand" not in out.replace("\\newcommand", "")


def test_runs_csv_has_one_row_per_run_folder(tmp_path):
    write_results(tmp_path)
    assert report.main([str(tmp_path), "--no-figures"]) == 0
    with open(tmp_path / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    folders = [d for d in tmp_path.glob("*/*_seed*") if d.is_dir()]
    assert len(rows) == len(folders) == 8
    header = list(rows[0])
    assert len(header) == len(set(header)) and {"experiment", "config", "seed", "device", "precision", "processes",
                                                 "route", "acc", "robustness.fgsm_1/255"} <= set(header)
    for r in rows:
        d = tmp_path / r["experiment"] / f"{r['variant']}_seed{r['seed']}"
        if r["status"] == "finished":
            result = json.loads((d / "result.json").read_text())
            assert float(r["acc"]) == result["acc"] and r["precision"] == result["amp"]
        else:
            assert (r["status"], r["acc"]) == ("unfinished", "")


def test_damaged_files_cost_their_run_only_with_one_line_each(tmp_path, capsys):
    write_results(tmp_path)
    exp = tmp_path / "exp10_periodic_ses"
    (exp / "baseline_seed1" / "result.json").write_text('{"acc": 0.7, "rob')                         # cut short
    (exp / "ses_k1_seed2" / "metrics.jsonl").write_text('{"epoch": 1, "test_acc": NaN}\n{"epo')       # a NaN, a cut line
    (exp / "ses_k1_seed0" / "result.json").write_text(json.dumps(dict(config="ses_k1", acc=None, rob=0.4)))
    (exp / "summary.json").write_text("[garbage")
    bad = exp / "ses_k1_seed5"
    bad.mkdir()
    (bad / "failure.json").write_text("not json\nat all")
    assert report.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    left = [line for line in out.splitlines() if line.startswith("left out:")]
    assert any("baseline_seed1: result.json is cut short" in line for line in left)
    assert any("ses_k1_seed0: result.json has no finite acc" in line for line in left)
    assert any("ses_k1_seed2: metrics.jsonl: 1 of 2 lines unreadable" in line for line in left)
    assert "could not be drawn" not in out
    md = (tmp_path / "report.md").read_text()
    assert md_row(md, "ses_k1")[3:4] == ["2 (Δ: 1)"]  # seeds 1 and 2 left; seed 2 alone pairs with a baseline
    assert "ses_k1_seed5 (?: failure.json is cut short or not JSON)" in md


def test_an_override_is_shown_as_a_change_by_the_runs_own_labels_then_the_settings_table(tmp_path):
    """A run whose folder names an override (ses_k1+lam=0.05, every=3) shows each as a change (→), by
    the label its result.json gives the setting, else by the harness's table's, in Markdown and LaTeX."""
    from harness.settings import SETTINGS
    exp = tmp_path / "exp10_periodic_ses"
    write_run(exp, "baseline", 0, acc=0.7)
    write_run(exp, "ses_k1+every=3+lam=0.05", 0, acc=0.7)                     # older runs: no labels of their own
    write_run(exp, "ses_k3+every=5+num_latents=8", 0, acc=0.7, setting_labels={"num_latents": "latents M"})
    assert report.main([str(tmp_path), "--no-figures"]) == 0
    md = (tmp_path / "report.md").read_text()
    assert SETTINGS.label("lam") != "lam" and "num_latents" not in SETTINGS
    assert f"SES k=1 ({SETTINGS.label('every')}→3, {SETTINGS.label('lam')}→0.05)" in md
    assert f"SES k=3 ({SETTINGS.label('every')}→5, latents M→8)" in md
    tex = (tmp_path / "tables.tex").read_text()
    assert "$\\lambda$$\\to$0.05" in tex and "latents M$\\to$8" in tex


def test_overhead_is_each_seeds_epoch_time_over_its_twins_when_both_ran_alike(tmp_path):
    """The twin finished after the SES run (no stored overhead), a stale stored figure, a seed whose twin
    ran elsewhere, a seed without its twin: the report times each seed against the same-seed twin itself."""
    exp = tmp_path / "exp10_periodic_ses"
    twin_s = {0: 10.0, 1: 20.0, 2: 10.0, 3: 10.0}
    ses_s = {0: 12.0, 1: 30.0, 2: 11.0, 3: 99.0, 4: 13.0}
    for seed, t in twin_s.items():
        write_run(exp, "baseline", seed, dict(ses=False), acc=0.7, epoch_time_s=t,
                  **(dict(device="Tesla T4", amp="fp16") if seed == 3 else {}))
    for seed, t in ses_s.items():  # seed 0: a stale stored overhead; seed 4: no twin run, its stored one counts
        stored = {0: dict(overhead=5.0), 4: dict(overhead=0.4)}.get(seed, {})
        write_run(exp, "ses_k1", seed, dict(ses=True, every=1), acc=0.7, epoch_time_s=t, **stored)
    assert report.main([str(tmp_path), "--no-figures"]) == 0
    # seeds 0, 1, 2 against their twins: +20, +50, +10 %; seed 3 ran on another machine than its twin: none;
    # seed 4 has no twin here: its own +40 %. Median of 10, 20, 40, 50 = 30, range [10, 50].
    assert md_row((tmp_path / "report.md").read_text(), "SES k=1 ‡")[3] == "+30 % [+10, +50]"  # ‡: seed 3's pair


def test_smoke_or_synthetic_runs_are_marked_whatever_the_folder_is_called_and_never_mixed_with_real(tmp_path):
    smoke_cfg = dict(smoke_sizes=dict(n_train=8, n_test=4, image_size=16))
    copied = tmp_path / "copied_somewhere"          # a smoke folder copied under another name
    for config in ("baseline", "ses_k1"):
        for seed in range(2):
            write_run(copied / "exp10_periodic_ses", config, seed, dict(smoke_cfg, ses=config != "baseline"), acc=0.5)
    assert report.main([str(copied), "--no-figures"]) == 0
    md, tex = (copied / "report.md").read_text(), (copied / "tables.tex").read_text()
    assert md.startswith("# SES results (SMOKE") and "Paper" not in md
    assert "Acc (\\%) & Rob (\\%) & Overhead \\\\" in tex  # no paper columns
    assert tex.count("SMOKE RESULTS, NOT PAPER NUMBERS") == tex.count("\\caption{")
    assert "% exp10_periodic_ses: SMOKE" in (copied / "macros.tex").read_text()
    with open(copied / "runs.csv", newline="") as f:
        assert {r["kind"] for r in csv.DictReader(f)} == {"smoke"}

    mixed = tmp_path / "results"                   # real runs, and generated ones beside them
    write_results(mixed)
    exp = mixed / "exp10_periodic_ses"
    write_run(exp, "ses_k1", 7, dict(smoke_cfg, ses=True), acc=0.01)                     # config.json: smoke sizes
    write_run(exp, "baseline", 7, acc=0.01, data="synthetic")                            # result.json says
    d = write_run(exp, "baseline", 8, acc=0.01)
    (d / "config.json").write_text(json.dumps({"config": {}, "environment": {"argv": ["exp10.py", "--synthetic"]}}))
    write_run(mixed / "exp11_resnet50_tinyimagenet", "ses_k1", 0, acc=0.5, data="smoke")  # exp11: real and smoke
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert report.main([str(mixed), "--no-figures"]) == 0
    left = out.getvalue()
    for run in ("exp10_periodic_ses/ses_k1_seed7", "exp10_periodic_ses/baseline_seed7",
                "exp10_periodic_ses/baseline_seed8", "exp11_resnet50_tinyimagenet/ses_k1_seed0"):
        assert len([line for line in left.splitlines() if line.startswith(f"left out: {run}: ")]) == 1, (run, left)
    md = (mixed / "report.md").read_text()
    assert "SMOKE" not in md.split("## Left out")[0] and "SYNTHETIC" not in md.split("## Left out")[0]
    assert md_row(md, "ses_k1")[3] == "3" and md_row(md, "SES k=1")[4:] == ["76.11", "47.70", "+195 %"]

    only_synthetic = tmp_path / "only"              # result.json's `data` wins over the folder it sits in
    write_run(only_synthetic / "exp11_resnet50_tinyimagenet", "baseline", 0, acc=0.5, data="synthetic")
    assert report.main([str(only_synthetic), "--no-figures"]) == 0
    assert "## Exp 11 (`exp11_resnet50_tinyimagenet`): SYNTHETIC" in (only_synthetic / "report.md").read_text()


def test_a_row_of_fewer_seeds_says_so_in_the_tables_without_an_n_column(tmp_path):
    write_results(tmp_path)
    shutil.rmtree(tmp_path / "exp10_periodic_ses" / "ses_k1_seed2")
    assert report.main([str(tmp_path), "--no-figures"]) == 0
    md = (tmp_path / "report.md").read_text().split("## Exp 11")[0]
    brief, robust = (md_row(md.split(f"### Exp 10: {t}")[1], "SES k=1 (n=2)")
                     for t in ("the paper's table", "robustness suite"))
    assert brief and robust and not re.search(r"\| Baseline \(n=", md)   # Baseline has all three seeds
    assert "over n = 3 seeds" in md.split("### Exp 10: the paper's table")[1].split("|")[0]
    tex = (tmp_path / "tables.tex").read_text()
    for label in ("tab:exp10_periodic_ses}", "tab:exp10_periodic_ses-robustness}"):
        table = tex.split(label)[1].split("\\end{table")[0]
        assert "SES $k{=}1${\\scriptsize ($n{=}2$)}" in table and "Baseline{\\scriptsize" not in table


def test_the_seeds_a_delta_needs_read_the_same_in_tables_and_macros_at_the_cap(tmp_path):
    exp = tmp_path / "exp10_periodic_ses"
    for seed, (a, b) in enumerate([(0.50, 0.49), (0.50, 0.52), (0.50, 0.491)]):  # Δ acc per seed -1, +2, -0.9 pp
        write_run(exp, "baseline", seed, dict(ses=False), acc=a)
        write_run(exp, "ses_k1", seed, dict(ses=True, every=1), acc=b)
    assert report.main([str(tmp_path), "--no-figures"]) == 0
    # mean 0.033, sd 1.70: t * sd / sqrt(n) < 0.033 needs n > (1.96 * 1.70 / 0.033)^2, about 10 000: beyond the cap
    cell = md_row((tmp_path / "report.md").read_text(), "ses_k1")[9]
    defs = dict(re.findall(r"\\newcommand\{\\([A-Za-z]+)\}\{\\ensuremath\{([^}]*)\}\}",
                           (tmp_path / "macros.tex").read_text()))
    assert cell.startswith(f"≥{stats.SEEDS_CAP}")
    assert defs["sesExpTenSesKOneDeltaAccSeeds"] == f"\\geq {stats.SEEDS_CAP}"


def test_an_empty_metrics_file_is_left_out_in_one_line(tmp_path, capsys):
    write_results(tmp_path)
    (tmp_path / "exp10_periodic_ses" / "ses_k1_seed1" / "metrics.jsonl").write_text("")
    assert report.main([str(tmp_path), "--no-figures"]) == 0
    left = [line for line in capsys.readouterr().out.splitlines() if "ses_k1_seed1" in line]
    assert len(left) == 1 and left[0].startswith("left out: ") and "metrics.jsonl" in left[0]


def test_the_gain_figure_tells_each_k_apart_without_overprinting_when_overheads_are_close(tmp_path):
    """Four k whose overheads and gains lie within a fraction of a percent of each other: each k is
    told by its own colour, named once in the legend, and no text of the figure sits on another."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from helpers import overlapping_texts
    from reporting.questions import gain_figure
    from reporting.read import read_results
    from reporting.rows import summarize
    from reporting.style import Look
    exp = tmp_path / "exp10_periodic_ses"
    ks = (1, 3, 5, 10)
    for seed, (gain, cost) in enumerate([(0.05, 0.0), (-0.05, 0.5), (0.15, 1.0)]):  # wide intervals and ranges
        write_run(exp, "baseline", seed, dict(ses=False), acc=0.6 + seed / 10, epoch_time_s=10.0)
        for i, k in enumerate(ks):
            write_run(exp, f"ses_k{k}", seed, dict(ses=True, every=k), acc=0.6 + seed / 10 + gain + i / 1000,
                      epoch_time_s=10.0 * (1 + cost + i / 1000))
    experiments, _ = read_results(tmp_path)
    data = experiments["exp10_periodic_ses"]
    style = labels.styles(list(data["runs"]), data["twin"], data["ses"])
    for width in ("text", "column"):
        with plt.rc_context(Look("plain").rc(width, 2.5)):
            fig = gain_figure(plt, width, summarize(data, {}), style)
        assert not overlapping_texts(fig), (width, overlapping_texts(fig))
        legend = dict(zip([t.get_text() for t in fig.legends[0].get_texts()], fig.legends[0].legend_handles))
        colours = [legend[f"SES k={k}"].get_color() for k in ks]
        assert len(set(colours)) == len(ks)
        for ax in fig.axes:  # every point of a k is drawn in that k's colour
            drawn = {line.get_color() for line in ax.get_lines() if line.get_marker() not in (None, "None", "")}
            assert drawn == set(colours), (width, drawn)
        plt.close(fig)


def test_without_a_summary_the_rows_keep_the_grids_order_and_the_papers_rows_stay_with_their_figures(tmp_path):
    """A killed session writes no summary.json: the rows follow the label table (k=3 before k=10, never
    alphabetical), and a config the paper reports that has no run here keeps its row, with the paper's
    figures beside n = 0."""
    exp = tmp_path / "exp10_periodic_ses"
    for seed in range(2):
        for config in ("baseline", "ses_k10", "ses_k1", "ses_k5"):  # no ses_k3
            write_run(exp, config, seed, dict(ses=config != "baseline"), acc=0.7, epoch_time_s=10.0)
    assert report.main([str(tmp_path), "--no-figures"]) == 0
    md = (tmp_path / "report.md").read_text()
    brief = md.split("### Exp 10: the paper's table")[1].split("###")[0]
    names = [line.split("|")[1].strip() for line in brief.splitlines() if line.startswith("| ")][1:]
    assert names == ["Baseline", "SES k=1", "SES k=3 (n=0)", "SES k=5", "SES k=10"]
    reference = json.loads((ROOT / "results" / "paper_reference.json").read_text())["exp10_periodic_ses"]["ses_k3"]
    assert md_row(brief, "SES k=3 (n=0)") == ["SES k=3 (n=0)", "—", "—", "—", f"{reference['acc']:.2f}",
                                               f"{reference['rob']:.2f}", f"+{100 * reference['overhead']:.0f} %"]
    full = md.split("every config against its twin")[1].split("###")[0]
    assert "ses_k3" not in full  # the other tables hold runs only


def test_a_percent_never_contradicts_its_range_and_the_latex_caption_speaks_latex():
    assert [cells.percent(v) for v in (-0.004, 0.003, 0.0, 0.07, -0.12)] == ["-0.4", "+0.3", "+0", "+7", "-12"]
    assert [cells.percent(v) for v in (0.005, -0.005, -0.0004, -1e-7)] == ["+0.5", "-0.5", "-0.04", "-0.00"]
    assert cells.overhead((0.07, -0.004, 0.07, 3))[0] == "+7 % [-0.4, +7] °"
    rows = [dict(variant="ses_k1", config="ses_k1", twin="baseline", n=3, acc=None, rob=None, gap=None,
                 d_acc=None, d_rob=None, mixed=None, pair_mixed=None, overhead=None)]
    t = report_tables.full_table("exp10_periodic_ses", rows)
    assert "LaTeX" not in t.caption and "upper line" in t.caption and "half-width" in t.caption
    assert "(Δ: …)" in t.caption_md and "upper line" not in t.caption_md


def test_curves_stay_at_their_epochs_and_a_value_out_of_range_costs_no_figure(tmp_path):
    """With more than three configs the error bars sit beside the markers; the lines themselves are drawn
    at their epochs. A negative loss (a damaged record) clips its bar away instead of failing the figure."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from reporting.plots import curves_figure
    from reporting.read import read_results
    from reporting.style import Look
    exp = tmp_path / "exp10_periodic_ses"
    epochs = list(range(1, 13))
    for seed in range(2):
        for config in ("baseline", "ses_k1", "ses_k3", "ses_k5"):
            rows = [dict(epoch=e, test_acc=0.05 * e + 0.01 * seed, test_loss=(-1.0 if e == 5 else 2.0 / e) + seed)
                    for e in epochs]
            write_run(exp, config, seed, dict(ses=config != "baseline"), rows, acc=0.6)
    experiments, _ = read_results(tmp_path)
    data = experiments["exp10_periodic_ses"]
    style = labels.styles(list(data["runs"]), data["twin"], data["ses"])
    with plt.rc_context(Look("plain").rc("text", 2.5)):
        fig = curves_figure(plt, "text", data, style)
    for ax in fig.axes:
        lines = [line for line in ax.get_lines() if line.get_linestyle() not in ("None", "")]
        assert len(lines) == 4 and all(list(line.get_xdata()) == epochs for line in lines)
    plt.close(fig)


def test_no_results_is_one_line_and_exit_1(tmp_path, capsys):
    (tmp_path / "exp10_periodic_ses").mkdir()
    with pytest.raises(SystemExit) as e:
        report.main([str(tmp_path)])
    assert e.value.code == 1 and len(capsys.readouterr().err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        report.main([str(tmp_path / "nope")])
    assert e.value.code == 2


# ----------------------------------------------------------------------------- the label table
def grids():
    import exp10_periodic_ses
    import exp11_resnet50_tinyimagenet
    import exp12_mixup_cutmix_cifar100
    import exp13_perceiver
    return [m.GRID for m in (exp10_periodic_ses, exp11_resnet50_tinyimagenet, exp12_mixup_cutmix_cifar100,
                             exp13_perceiver)]


def test_no_two_configs_share_a_style_and_each_ses_config_shares_its_twins_colour():
    rng = random.Random(1)
    for grid in grids():
        twin = {c: s.get("baseline_config", "baseline") for c, s in grid.items()}
        ses = {c: s.get("ses", False) for c, s in grid.items()}
        for trial in range(20):
            order = rng.sample(list(grid), k=len(grid) if trial == 0 else rng.randint(1, len(grid)))
            style = labels.styles(order, twin, ses)
            assert len(set(style.values())) == len(order), style
            for c in order:
                assert style[c].linestyle == ("-" if ses[c] else "--")
            partners = {t: [c for c in order if ses[c] and twin[c] == t] for t in order}
            for t, kids in partners.items():
                if len(kids) == 1:
                    assert style[kids[0]].colour == style[t].colour
        assert all(labels.display(c) != c for c in grid)  # every config of the grids has a display name
    labels.use_setting_labels({"every": "k"})
    assert labels.display("ses_k1+every=3") == "SES k=1 (k→3)" and labels.display("mixup_ses") == "Mixup + SES"
    labels.use_setting_labels({"every": "k"}, {"ses_k1+every=3": {"every": "period"}})  # the run's own label first
    assert labels.display("ses_k1+every=3") == "SES k=1 (period→3)"


# ----------------------------------------------------------------------------- LaTeX that drops in
def worst_rows(grid):
    """Rows as wide as real ones get: 3 seeds, 3-digit and negative values, an override, marks, a paper row."""
    s = stats.Spread(100.0, 10.55, 3)
    d = stats.Delta(-10.25, 5.0, 3, -22.22, 1.72, 1000)
    return [dict(variant=c + "+every=10", config=c, twin="baseline+every=10", n=2 if i == 0 else 3, seeds=[0, 1, 2],
                 ses=True,
                 acc=s, rob=s, gap=stats.Spread(-10.25, 10.5, 3), robustness={k: s for k in ("gauss_0.05", "gauss_0.1",
                                                                                          "fgsm_1/255", "fgsm_2/255")},
                 d_acc=d._replace(n=2) if i == 0 else d, d_rob=d._replace(n=2) if i == 0 else d,
                 overhead=(12.34, -0.5, 19.95, 3), setting="fp16 on Tesla T4", mixed="x",
                 pair_mixed="y", every=10, paper=dict(acc=99.99, rob=99.99, overhead=19.95),
                 input="points" if i % 2 else "image") for i, c in enumerate(grid)]


def test_every_table_fits_the_text_width_and_a_column_table_fits_a_column():
    for grid in grids():
        rows = worst_rows(grid)
        items = [dict(row=r, twin=r["twin"], interaction_acc=r["d_acc"], interaction_rob=r["d_rob"]) for r in rows]
        for t in (report_tables.brief_table("exp", rows, "src"), report_tables.full_table("exp", rows),
                  report_tables.robustness_table("exp", rows), report_tables.interaction_table("exp", items)):
            body = [[c[1] for c in row] for row in t.rows]
            head = [c[1] for c in t.header]
            first = latex.first_col_pt([head[0]] + [r[0] for r in body])
            width = latex.tex_width_pt(body, head, first)
            assert width <= latex.TEXTWIDTH_PT, (t.key, width)
            env = "table" if width <= latex.COLUMN_PT else "table*"
            assert f"\\begin{{{env}}}" in latex.render(t, "tab:x")


def test_computer_modern_metrics_match_tex():
    # TeX facts: cmr10 digits are 0.5 em (5 pt at 10 pt), '+' and '=' 0.7778 em, '.' 0.2778 em
    assert latex.text_width_pt("0123456789", font_pt=10) == pytest.approx(50.0)
    assert latex.text_width_pt("$+1.5$", font_pt=10) == pytest.approx(10 * (0.7778 + 0.5 + 0.2778 + 0.5))


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed (the width estimate above holds)")
@pytest.mark.parametrize("layout", ["", "twocolumn", "a4paper,twocolumn"])
def test_tables_compile_without_an_overfull_box(tmp_path, layout):
    write_results(tmp_path)
    exp = tmp_path / "exp12_mixup_cutmix_cifar100"  # rows and pairs that mix machines (marks, notes), an interaction
    for seed in range(3):
        for config in ("baseline", "ses", "mixup", "mixup_ses")[:4 if seed < 2 else 2]:  # Mixup rows: n = 2 (marked)
            write_run(exp, config, seed, dict(ses=config.endswith("ses")), acc=0.7 - seed / 100 + len(config) / 1000,
                      baseline_config="mixup" if config == "mixup_ses" else "baseline",
                      epoch_time_s=10.0 - 0.1 * seed * config.endswith("ses"),
                      robustness={"gauss_0.05": 0.5, "fgsm_2/255": 0.1},
                      **(dict(amp="fp16", device="Tesla T4") if seed and config == "ses" else {}))
    assert report.main([str(tmp_path), "--no-figures"]) == 0
    tex = (tmp_path / "tables.tex").read_text()
    assert "\\dagger" in tex and "\\begin{table*}" in tex and "($n{=}2$)" in tex
    (tmp_path / "paper.tex").write_text(f"\\documentclass[{layout}]{{article}}\\usepackage{{booktabs}}\\input{{macros.tex}}"
                                        "\\begin{document}\\input{tables.tex}\\sesExpTenSesKOneAcc\\end{document}\n")
    p = subprocess.run(["pdflatex", "-interaction=nonstopmode", "paper.tex"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    log = (tmp_path / "paper.log").read_text(errors="replace")
    assert p.returncode == 0 and "Overfull \\hbox" not in log, log[-3000:]


def test_a_venue_style_keeps_its_widths_and_7_to_9_pt_text_and_without_tueplots_the_plain_style(monkeypatch):
    from reporting.style import FONT_KEYS, WIDTHS_IN, Look
    plain = Look("plain")
    for width, inches in WIDTHS_IN.items():
        rc = plain.rc(width, 2.0)
        assert rc["figure.figsize"] == (inches, 2.0) and all(7 <= rc[k] <= 9 for k in FONT_KEYS)
    if __import__("importlib").util.find_spec("tueplots"):
        icml = Look("icml2024")
        assert icml.note is None
        assert icml.rc("column", 2.0)["figure.figsize"][0] == pytest.approx(3.25, abs=0.01)
        assert icml.rc("text", 2.0)["figure.figsize"][0] == pytest.approx(6.75, abs=0.01)
        assert all(7 <= icml.rc("column", 2.0)[k] <= 9 for k in FONT_KEYS)  # ICML's 6 pt ticks raised to 7
        assert not icml.rc("text", 2.0)["text.usetex"]
        with pytest.raises(ValueError, match="icml2024"):  # names the venues there are
            Look("nosuchvenue2099")
    monkeypatch.setitem(sys.modules, "tueplots", None)  # import tueplots -> ImportError
    bare = Look("icml2024")
    assert bare.venue == "plain" and "pip install tueplots" in bare.note


def test_an_unknown_venue_is_one_line_and_exit_2_and_without_tueplots_the_plain_style(tmp_path, capsys, monkeypatch):
    pytest.importorskip("tueplots")
    write_results(tmp_path)
    with pytest.raises(SystemExit) as e:
        report.main([str(tmp_path), "--venue", "nosuch", "--no-figures"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "icml2024" in err[0] and "neurips2024" in err[0]
    assert not (tmp_path / "report.md").exists()
    monkeypatch.setitem(sys.modules, "tueplots", None)
    assert report.main([str(tmp_path), "--venue", "nosuch", "--widths", "column", "--formats", "png",
                        "--dpi", "20"]) == 0
    assert "plain style used" in capsys.readouterr().out
