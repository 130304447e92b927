"""report.py on a results folder written here: 2 configs x 3 seeds with known numbers."""
import json
import math
import sys
from pathlib import Path

import pytest

import report

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
    expected_tex = ["baseline & 3 & 72.00 $\\pm$ 2.00 & 42.00 $\\pm$ 2.65 & 12.00 $\\pm$ 2.00 & -- & -- & -- & 74.99 / 46.32 \\\\",
                    "ses\\_k1 & 3 & 77.00 $\\pm$ 2.65 & 47.00 $\\pm$ 1.00 & 6.00 $\\pm$ 1.73 & $+5.00$ [+2.5, +7.5] & $+5.00$ [+0.7, +9.3] & "
                    "$+110\\,\\%$ & 76.11 / 47.70 ($+195\\,\\%$) \\\\",
                    "\\label{tab:exp10_periodic_ses}", "\\toprule", "\\bottomrule", "\\caption{"]
    for line in expected_tex:
        assert line in tex, line
    assert tex.count("\\begin{table}") == tex.count("\\end{table}") == 2
    assert "% unfinished runs, not averaged in: ses_k1_seed3" in tex


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
