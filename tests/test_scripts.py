"""Every experiment script end to end with --smoke, the rerun skip, --help, the one-file bundle, and the
report of the exp13 smoke folder with its cross-attention figures."""
import importlib
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from reporting import tables as report_tables
from harness.config import SMOKE
from helpers import EXP10, ROOT, run
SCRIPTS = {
    "exp10_periodic_ses": ["baseline", "ses_k1", "ses_k3", "ses_k5", "ses_k10"],
    "exp11_resnet50_tinyimagenet": ["baseline", "ses_k1"],
    "exp12_mixup_cutmix_cifar100": ["baseline", "ses", "mixup", "mixup_ses", "cutmix", "cutmix_ses"],
    "exp13_perceiver": ["cifar10_fourier", "cifar10_fourier_ses", "cifar10_permuted_learned",
                        "cifar10_permuted_learned_ses", "modelnet40_fourier", "modelnet40_fourier_ses"],
}
RESULT_FIELDS = {"experiment", "config", "variant", "overrides", "entropy_max", "peak_mem_final_bytes", "seed", "acc", "rob", "robustness", "train_acc", "gap", "entropy",
                 "entropy_target", "ses_steps", "total_steps", "epochs", "epoch_time_s", "images_per_s",
                 "peak_mem_bytes"}


def check_experiment(exp_dir, name: str, configs: list[str], seeds=(0,)):
    for config, seed in [(c, s) for c in configs for s in seeds]:
        run_dir = exp_dir / f"{config}_seed{seed}"
        for f in ("config.json", "metrics.jsonl", "result.json"):
            assert (run_dir / f).is_file(), f"{run_dir / f} missing"
        assert not (run_dir / "checkpoint.pt").exists()  # written every epoch, dropped once the smoke result is in
        assert list((run_dir / "code").glob("*.py"))  # the producing code, next to the result
        r = json.loads((run_dir / "result.json").read_text())
        assert RESULT_FIELDS <= set(r), RESULT_FIELDS - set(r)
        assert r["experiment"] == name and r["config"] == config and r["seed"] == seed and r["epochs"] == 2
        assert set(r["robustness"]) == {"gauss_0.05", "gauss_0.1", "fgsm_1/255", "fgsm_2/255"}
        assert r["rob"] == r["robustness"]["gauss_0.1"] and abs(r["gap"] - (r["train_acc"] - r["acc"])) < 1e-12
        assert set(r["entropy"]) == set(r["entropy_target"]) and r["entropy"]
        is_ses = config != "baseline" and ("ses" in config)
        assert (r["ses_steps"] > 0) == is_ses and r["ses_steps"] <= r["total_steps"]
        if name == "exp10_periodic_ses" and config != "baseline":
            k = int(config.split("k")[1])
            assert r["ses_steps"] == len(range(0, r["total_steps"], k)) and "overhead" in r
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
        rows = [json.loads(x) for x in lines]  # the penalised train-mode H beside the eval-mode probe H
        assert ("ses_entropy" in rows[0]) == is_ses  # (later epochs of k = 10 may have no SES step)
        assert all(set(row.get("ses_entropy", row["entropy"])) == set(row["entropy"]) for row in rows)
        if name == "exp13_perceiver":  # validation hold-out per epoch, attention maps at the end
            assert "val_acc" in json.loads(lines[-1]) and "test_acc" not in json.loads(lines[-1])
            maps = torch.load(run_dir / "attention" / "epoch_002.pt", weights_only=False)["maps"]
            assert maps.shape[:2] == (4, {"cifar10_fourier": 4, "modelnet40_fourier": 2}.get(r["baseline_config"], 1))
            assert maps.shape[-1] == (2048 if config.startswith("modelnet40") else SMOKE["image_size"] ** 2)
    size = sum(f.stat().st_size for f in exp_dir.rglob("*") if f.is_file())
    assert size < 4 * 2**20 * len(configs) * len(seeds), f"a smoke run left {size / 2**20:.0f} MB"
    summary = json.loads((exp_dir / "summary.json").read_text())
    assert [r["config"] for r in summary["runs"]] == [c for c in configs for _ in seeds] and summary["unfinished"] == []


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xdist_group("exp10_smoke"))
                                  if n == "exp10_periodic_ses" else n for n in SCRIPTS])
def test_smoke_end_to_end_then_rerun_skips(name, tmp_path, request, capsys):
    if name == "exp10_periodic_ses":  # run once per session: other tests start from a copy of it
        out, p = request.getfixturevalue("exp10_smoke")
    else:
        out, p = tmp_path, run([ROOT / f"{name}.py", "--smoke", "--out-dir", tmp_path], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    check_experiment(out / "smoke" / name, name, SCRIPTS[name])
    assert "acc%" in p.stdout  # the printed table
    capsys.readouterr()
    assert importlib.import_module(name).main(["--smoke", "--out-dir", str(out)]) == 0  # the rerun, in this process
    assert capsys.readouterr().out.count("finished earlier, skipped") == len(SCRIPTS[name])
    if name == "exp13_perceiver":
        check_attention_figures(out / "smoke", SCRIPTS[name])


def check_attention_figures(smoke, configs):
    """The report of the exp13 smoke folder draws every run's saved cross-attention maps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import report
    from reporting import plots
    assert report.main([str(smoke)]) == 0
    for config in configs:
        stem = smoke / "plots" / f"exp13_perceiver_attention_{config}_seed0"
        assert stem.with_name(stem.name + ".pdf").read_bytes()[:5] == b"%PDF-"
        assert stem.with_name(stem.name + ".png").read_bytes()[:4] == b"\x89PNG"
    for run, cols, first in (("cifar10_permuted_learned_seed0", 6, "input (label"),
                             ("modelnet40_fourier_seed0", 4, "mean over latents (label")):
        fig = plots.attention_figure(plt, smoke / "exp13_perceiver" / run / "attention" / "epoch_002.pt")
        assert len(fig.axes) == 4 * cols + 1  # a row per saved sample (input, mean, overlay, 3 latents; or 1 + 3
        titles = [ax.get_title().replace("\n", " ") for ax in fig.axes]  # clouds), and the colour bar
        assert titles[0].startswith(first) and titles[cols - 1] == "latent 2"
        plt.close(fig)


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_help_is_complete(name, capsys):
    with pytest.raises(SystemExit) as e:
        importlib.import_module(name).main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for flag in ("--smoke", "--configs", "--seeds", "--epochs", "--data-dir", "--out-dir", "--device",
                 "--lam", "--beta", "--every", "--layers", "--no-download", "--force", "--batch-size", "--lr"):
        assert flag in out
    for config in SCRIPTS[name]:
        assert config in out


def test_exp12_bundle_runs_alone_from_an_empty_folder_and_its_two_seed_report_fits_one_column(tmp_path):
    """The one-file bundle from a folder holding nothing else (-I: no site or user paths), on the
    report's acceptance selection: exp12's Mixup pair with two seeds, then report.py on it."""
    out = tmp_path / "dist" / "exp12_mixup_cutmix_cifar100.py"
    p = run([ROOT / "tools" / "bundle.py", ROOT / "exp12_mixup_cutmix_cifar100.py", "-o", out], cwd=ROOT)
    assert p.returncode == 0, p.stderr
    alone = tmp_path / "kaggle_working"
    alone.mkdir()
    shutil.copy(out, alone / "uploaded.py")  # nothing else of the repository is there
    p = subprocess.run([sys.executable, "-I", "uploaded.py", "--smoke", "--configs", "mixup", "mixup_ses",
                        "--seeds", "0", "1"], cwd=alone, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    smoke = alone / "results" / "smoke"
    check_experiment(smoke / "exp12_mixup_cutmix_cifar100", "exp12_mixup_cutmix_cifar100", ["mixup", "mixup_ses"],
                     seeds=(0, 1))
    cfg = json.loads((smoke / "exp12_mixup_cutmix_cifar100" / "mixup_seed0" / "config.json").read_text())
    assert cfg["environment"]["git_commit"]  # recorded from the bundle
    check_two_seed_report(smoke)


def test_bundle_embeds_modules_verbatim():
    sys.path.insert(0, str(ROOT / "tools"))
    import bundle
    mods = bundle.collect(ROOT / "exp10_periodic_ses.py")
    assert {"ses_core", "data_utils", "harness", "harness.cli", "harness.sweep", "harness.runs", "harness.training",
            "ses_solvers.routes", "plumbing.files"} <= set(mods)
    assert list(mods).index("ses_core") < list(mods).index("harness.runs")  # dependencies first
    assert list(mods).index("harness") < list(mods).index("harness.runs")  # a package before its modules
    text = bundle.bundle(ROOT / "exp10_periodic_ses.py")
    for src in mods.values():
        assert bundle.literal(src) in text


def test_each_bundle_embeds_only_what_its_script_needs():
    sys.path.insert(0, str(ROOT / "tools"))
    import bundle
    plain = set(bundle.collect(ROOT / "exp10_periodic_ses.py"))
    exp13_parts = {"perceiver", "perceiver.lamb", "perceiver.model", "perceiver.modelnet40"}
    assert not plain & exp13_parts and "reporting" not in " ".join(plain)
    assert exp13_parts <= set(bundle.collect(ROOT / "exp13_perceiver.py"))


def test_exp13_help_shows_each_experiments_own_defaults(capsys):
    with pytest.raises(SystemExit):
        importlib.import_module("exp13_perceiver").main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "0.004 (cifar10_fourier" in text and "0.001 (modelnet40_fourier" in text
    assert "64 (cifar10_fourier" in text and "32 (modelnet40_fourier" in text and "default 0.1)" not in text


def check_two_seed_report(smoke):
    """report.py on a two-seed smoke sweep of exp12's Mixup pair: mixup_ses paired with mixup."""
    import report
    assert report.main([str(smoke)]) == 0
    md = (smoke / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| mixup_ses |"))
    assert "| 2 |" in row and re.search(r"\| [+-]\d+\.\d\d \[[+-]\d+\.\d\d, [+-]\d+\.\d\d\]", row), row
    tex = (smoke / "tables.tex").read_text()
    body = [line.removesuffix(" \\\\").split(" & ") for line in tex.splitlines() if line.count(" & ") == 7]
    assert len(body) == 3  # the header, mixup, mixup_ses
    assert report_tables.tex_width_pt(body[1:]) <= report_tables.TEXTWIDTH_PT
    assert "\\newcommand{\\sesExpTwelveMixupSesDeltaAcc}" in (smoke / "macros.tex").read_text()
    plots = smoke / "plots"
    assert (plots / "exp12_mixup_cutmix_cifar100_entropy_mixup_ses.pdf").is_file()
    assert (plots / "exp12_mixup_cutmix_cifar100_curves.pdf").is_file()


NO_TQDM = """import runpy, sys
sys.modules["tqdm"] = sys.modules["tqdm.auto"] = None  # import tqdm raises ImportError, as on a bare image
sys.path.insert(0, {root!r})
from plumbing.progress import tqdm
assert tqdm.__module__ == "plumbing.progress"  # the stand-in, not tqdm's class
with tqdm(total=3, unit="B", unit_scale=True, desc="download") as bar:  # files.download's calls
    bar.update(2)
    bar.set_postfix(loss=1.0)
assert list(tqdm(range(3), total=3, desc="epoch 1", leave=False, disable=False)) == [0, 1, 2]
sys.argv = [{script!r}, *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""


def test_without_tqdm_a_script_runs_with_silent_bars(tmp_path):
    """requirements.txt installs tqdm, a bare GPU image may lack it: plumbing.progress's stand-in
    takes every call the code makes, and a smoke run trains to its result with no bar printed."""
    driver = tmp_path / "no_tqdm.py"
    driver.write_text(NO_TQDM.format(root=str(ROOT), script=str(EXP10)))
    p = run([driver, "--smoke", "--configs", "ses_k1", "--epochs", "1", "--out-dir", tmp_path / "out"])
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "smoke" / "exp10_periodic_ses" / "ses_k1+epochs=1_seed0" / "result.json").read_text())
    assert result["epochs"] == 1 and result["ses_steps"] > 0
    assert "it/s" not in p.stderr and "epoch 1:" not in p.stderr  # tqdm's bar text
