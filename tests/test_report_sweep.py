"""report.py on real outputs: a three-seed smoke sweep of every script (`--smoke --seeds 0 1 2`),
as it is and in damaged copies (files deleted, cut short, nulls, NaN, garbage JSON), and the
figures it draws (sizes, fonts, styles, marks). Each script's sweep runs once per session, when a
test first asks for it; every test here runs on one xdist worker (xdist_group "report_sweep")."""
import csv
import importlib.util
import json
import random
import re
import shutil
from pathlib import Path

import pytest

import report
from helpers import ROOT, overlapping_texts, run

pytestmark = pytest.mark.xdist_group("report_sweep")
SCRIPTS = ("exp10_periodic_ses", "exp11_resnet50_tinyimagenet", "exp12_mixup_cutmix_cifar100", "exp13_perceiver")
CHEAP = ["--widths", "column", "--formats", "png", "--dpi", "40"]  # the damaged copies: every figure, drawn small


def sweep_of(script: str, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp(script)
    p = run([ROOT / f"{script}.py", "--smoke", "--seeds", "0", "1", "2", "--out-dir", out], cwd=out)
    assert p.returncode == 0, p.stderr[-3000:]
    return out / "smoke" / script


@pytest.fixture(scope="session")
def sweeps(tmp_path_factory):
    """sweeps(script) -> <out>/smoke/<script>: its three-seed smoke sweep, run on first use (a test
    per script comes first, so no single test waits for all four)."""
    done = {}

    def get(script: str) -> Path:
        if script not in done:
            done[script] = sweep_of(script, tmp_path_factory)
        return done[script]
    return get


@pytest.fixture(scope="session")
def smoke_sweep(sweeps, tmp_path_factory):
    """One smoke/ folder holding the four sweeps' runs (without their code/ copies)."""
    smoke = tmp_path_factory.mktemp("sweep") / "smoke"
    for script in SCRIPTS:
        shutil.copytree(sweeps(script), smoke / script, ignore=shutil.ignore_patterns("code", "checkpoint.pt"))
    return smoke


def copy_of(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("code", "checkpoint.pt", "plots"))
    return dest


def run_dirs(smoke: Path) -> list[Path]:
    return sorted(d for d in smoke.glob("*/*_seed*") if d.is_dir() and d.parent.name != "plots")


def left_out(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("left out:")]


def md_rows(md: str, header_start: str) -> list[list[str]]:
    """The rows of the first Markdown table whose header starts with header_start."""
    lines = md.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.split("|")[1:-1]])
    return rows


# ----------------------------------------------------------------------------- each script's sweep
def test_exp10_sweep_gives_the_papers_table_and_periodic_epochs_without_ses_steps_are_drawn(sweeps, tmp_path,
                                                                                             capsys):
    exp10_sweep = sweeps("exp10_periodic_ses")
    runs = [json.loads(line) for line in (exp10_sweep / "ses_k10_seed0" / "metrics.jsonl").read_text().splitlines()]
    assert any("ses_entropy" not in row for row in runs)  # the case that once ended the report in a traceback
    smoke = copy_of(exp10_sweep.parent, tmp_path / "copied")  # smoke runs under a folder of another name
    for result in smoke.glob("*/*_seed*/result.json"):  # as if each twin had finished after its SES run
        r = json.loads(result.read_text())
        r.pop("overhead", None)
        result.write_text(json.dumps(r))
    assert report.main([str(smoke), *CHEAP]) == 0
    out = capsys.readouterr().out
    assert not left_out(out)
    md = (smoke / "report.md").read_text()
    assert md.startswith("# SES results (SMOKE") and "## Exp 10 (`exp10_periodic_ses`): SMOKE" in md
    brief = md_rows(md, "| Config | Acc (%) | Rob (%) | Overhead |")
    assert [r[0] for r in brief] == ["Baseline", "SES k=1", "SES k=3", "SES k=5", "SES k=10"]
    epoch_s = {d.name: json.loads((d / "result.json").read_text())["epoch_time_s"]
               for d in (smoke / "exp10_periodic_ses").glob("*_seed*")}
    for row, k in zip(brief[1:], (1, 3, 5, 10)):  # each seed's epoch time over the same seed's baseline's
        ratios = sorted(100 * (epoch_s[f"ses_k{k}_seed{s}"] / epoch_s[f"baseline_seed{s}"] - 1) for s in range(3))
        shown = re.fullmatch(r"(\S+) % \[(\S+), (\S+)\]( °)?", row[3])
        assert shown, row
        for text, true in zip(shown.groups()[:3], (ratios[1], ratios[0], ratios[2])):  # median, min, max
            decimals = len(text.partition(".")[2])
            assert abs(float(text) - true) <= 0.5 * 10 ** -decimals + 1e-9, (row, ratios)  # rounded, not cut
            assert true == 0 or text[0] == ("+" if true > 0 else "-"), (row, ratios)  # no sign rounded away
        assert (shown.group(4) is not None) == (ratios[0] <= 0 <= ratios[2]), (row, ratios)
    assert "Paper" not in md.split("## Exp 11")[0]  # smoke results never stand beside the paper's figures
    assert "Hollow grey" not in md and "`exp10_periodic_ses_gain`" in md  # no paper points drawn, none named
    plots = {p.name for p in (smoke / "plots").iterdir()}
    assert {f"exp10_periodic_ses_entropy_ses_k{k}_col.png" for k in (1, 3, 5, 10)} <= plots
    assert {"exp10_periodic_ses_gain_col.png", "exp10_periodic_ses_final_entropy_col.png"} <= plots


def test_exp11_sweep_gives_the_papers_table(sweeps, tmp_path):
    exp11_sweep = sweeps("exp11_resnet50_tinyimagenet")
    smoke = copy_of(exp11_sweep.parent, tmp_path / "smoke")
    assert report.main([str(smoke), "--no-figures"]) == 0
    md = (smoke / "report.md").read_text()
    assert [r[0] for r in md_rows(md, "| Config | Acc (%) | Rob (%) | Overhead |")] == ["Baseline", "SES k=1"]
    assert [r[:4] for r in md_rows(md, "| config | name | vs |")] == [["baseline", "Baseline", "—", "3"],
                                                                      ["ses_k1", "SES k=1", "Baseline", "3"]]


def test_exp12_sweep_gives_the_interaction_paired_by_seed(sweeps, tmp_path):
    exp12_sweep = sweeps("exp12_mixup_cutmix_cifar100")
    smoke = copy_of(exp12_sweep.parent, tmp_path / "smoke")
    assert report.main([str(smoke), "--no-figures"]) == 0
    md = (smoke / "report.md").read_text()
    pairs = md_rows(md, "| Pair |")
    assert [r[0] for r in pairs] == ["SES vs. Baseline", "Mixup + SES vs. Mixup", "CutMix + SES vs. CutMix"]
    assert pairs[0][3] == "—" and all(r[3] != "—" for r in pairs[1:])  # an interaction for each augmentation
    assert [r[2] for r in md_rows(md, "| config | name | vs |")] == ["—", "Baseline", "Baseline", "Mixup", "Baseline",
                                                                     "CutMix"]
    assert "tab:exp12_mixup_cutmix_cifar100-interaction" in (smoke / "tables.tex").read_text()


def test_exp13_sweep_draws_each_configs_attention_on_one_scale(sweeps, tmp_path):
    exp13_sweep = sweeps("exp13_perceiver")
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from reporting.plots import attention_figure
    smoke = copy_of(exp13_sweep.parent, tmp_path / "smoke")
    assert report.main([str(smoke), *CHEAP]) == 0
    md = (smoke / "report.md").read_text()
    assert "Exp 13: the paper's table" not in md  # the paper has no figures for exp13
    caption = md.split("### Exp 13: robustness suite")[1].split("|")[0]  # what is perturbed, per kind of input
    images, points = caption.split("point clouds (")
    assert "CIFAR-10 Fourier" in images and "clamped to [0, 1]" in images and "ModelNet40" not in images
    assert "ModelNet40" in points and "not clamped" in points and "pixels" not in points
    drawn = sorted(p.name for p in (smoke / "plots").glob("exp13_perceiver_attention_*_col.png"))
    configs = sorted({d.name.rpartition("_seed")[0] for d in exp13_sweep.glob("*_seed*")})
    assert drawn == [f"exp13_perceiver_attention_{c}_seed0_col.png" for c in configs]  # the first seed of each
    fig = attention_figure(plt, exp13_sweep / "cifar10_fourier_seed0" / "attention" / "epoch_002.pt")
    images = [im for ax in fig.axes for im in ax.images if im.get_array().ndim == 2]  # the maps, not the inputs
    assert len(images) == 4 * 5 and len({im.get_clim() for im in images}) == 1  # mean, overlay, 3 latents per row
    assert len(fig.axes) == 4 * 6 + 1  # 4 samples x (input, mean, overlay, 3 latents), one colour bar
    plt.close(fig)


# ----------------------------------------------------------------------------- all of it, as it is
def pdf_size_in(path: Path) -> tuple[float, float]:
    box = re.search(rb"/MediaBox\s*\[\s*([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*\]", path.read_bytes())
    x0, y0, x1, y1 = map(float, box.groups())
    return (x1 - x0) / 72, (y1 - y0) / 72


def test_the_whole_sweep_reports_without_a_traceback_and_every_figure_is_sized_for_the_paper(smoke_sweep, tmp_path):
    smoke = copy_of(smoke_sweep, tmp_path / "smoke")
    p = run([ROOT / "report.py", smoke, "--formats", "pdf"])  # PNGs: the tests above and below
    assert p.returncode == 0 and "Traceback" not in p.stderr + p.stdout, p.stderr[-3000:]
    assert not left_out(p.stdout)
    pdfs = sorted((smoke / "plots").glob("*.pdf"))
    stems = {p.stem.removesuffix("_col") for p in pdfs}
    kinds = {re.sub(r"^exp\d+_[a-z0-9]+(_[a-z0-9]+)*?_(curves|entropy|final_entropy|robustness|gain|interaction|"
                    r"attention)(_.*)?$", r"\2", s) for s in stems}
    assert kinds == {"curves", "entropy", "final_entropy", "robustness", "gain", "interaction", "attention"}
    for pdf in pdfs:
        width, _ = pdf_size_in(pdf)
        assert width == pytest.approx(3.25 if pdf.stem.endswith("_col") else 6.75, abs=0.01), pdf.name
    assert len(pdfs) == 2 * len(stems)  # both widths of every figure
    with open(smoke / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(run_dirs(smoke))


def test_every_figure_has_7_to_9_pt_text_none_overprinted_distinct_styles_clipped_bands_and_a_smoke_mark(
        smoke_sweep, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection
    from matplotlib.text import Text
    from reporting import figures
    from reporting.read import read_results
    from reporting.rows import summarize
    from reporting.style import Look
    checked = []

    def inspect(fig, plt_, stem, formats, dpi):
        overprinted = overlapping_texts(fig)  # draws it: lays out and letters the ticks
        texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
        sizes = {round(t.get_fontsize(), 1) for t in texts}
        assert sizes and min(sizes) >= 7 and max(sizes) <= 9, (stem.name, sizes)
        assert fig.get_size_inches()[0] <= 6.75 + 1e-9
        assert "SMOKE" in fig.get_suptitle()
        assert not overprinted, (stem.name, overprinted)
        if "curves" in stem.name or "robustness" in stem.name:
            legend = fig.legends[0]
            looks = [(h.get_color(), h.get_linestyle(), h.get_marker()) for h in legend.get_lines()]
            assert len(set(looks)) == len(looks), stem.name
        for ax in fig.axes:
            if "accuracy" in ax.get_ylabel():
                for band in [c for c in ax.collections if isinstance(c, PolyCollection)]:
                    ys = [y for path in band.get_paths() for _, y in path.vertices]
                    assert min(ys) >= 0 and max(ys) <= 100
        checked.append(stem.name)
        plt_.close(fig)
        return []

    monkeypatch.setattr(figures, "save", inspect)
    experiments, _ = read_results(smoke_sweep)
    rows = {exp: summarize(d, {}) for exp, d in experiments.items()}
    venues = {"plain": list(experiments)}  # a venue's style on one experiment's figures
    if importlib.util.find_spec("tueplots"):
        venues["icml2024"] = ["exp12_mixup_cutmix_cifar100"]
    for venue, chosen in venues.items():
        checked.clear()
        _, captions, problems = figures.make_figures(plt, {e: experiments[e] for e in chosen}, rows, smoke_sweep,
                                                     Look(venue))
        assert not problems and len(checked) == 2 * len(captions), venue


# ----------------------------------------------------------------------------- damaged copies
def cut(path: Path, rng):
    data = path.read_bytes()
    path.write_bytes(data[:rng.randrange(1, max(2, len(data) - 1))])


def set_field(path: Path, rng, value):
    """A result.json field (acc, rob, gap, overhead, a robustness or entropy value) set to value."""
    r = json.loads(path.read_text())
    key = rng.choice(["acc", "rob", "gap", "overhead", "epoch_time_s", "robustness", "entropy", "entropy_target"])
    if isinstance(r.get(key), dict) and r[key]:
        r[key][rng.choice(sorted(r[key]))] = value
    else:
        r[key] = value
    path.write_text(json.dumps(r))  # json writes NaN as the bare token NaN, as Python's json module reads it


def null_metrics(path: Path, rng):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    row = rng.choice(rows)
    for key in rng.sample(sorted(row), k=min(3, len(row))):
        row[key] = rng.choice([None, float("nan"), "garbage", {}])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


DAMAGE = {  # name -> (file it acts on, what it does); each says in one line or leaves the run whole
    "delete result.json": ("result.json", lambda p, rng: p.unlink()),
    "cut result.json": ("result.json", cut),
    "garbage result.json": ("result.json", lambda p, rng: p.write_text(rng.choice(["{not json", "[1, 2]", "null", ""]))),
    "null in result.json": ("result.json", lambda p, rng: set_field(p, rng, None)),
    "NaN in result.json": ("result.json", lambda p, rng: set_field(p, rng, float("nan"))),
    "text in result.json": ("result.json", lambda p, rng: set_field(p, rng, "oops")),
    "delete metrics.jsonl": ("metrics.jsonl", lambda p, rng: p.unlink()),
    "cut metrics.jsonl": ("metrics.jsonl", cut),
    "nulls in metrics.jsonl": ("metrics.jsonl", null_metrics),
    "delete config.json": ("config.json", lambda p, rng: p.unlink()),
    "garbage config.json": ("config.json", lambda p, rng: p.write_text('{"config": [')),
    "garbage failure.json": ("failure.json", lambda p, rng: p.write_text("\x00\x01 not json")),
    "cut attention maps": ("attention", lambda p, rng: [cut(f, rng) for f in p.glob("*.pt")]),
    "delete the run": (".", lambda p, rng: shutil.rmtree(p)),
    "garbage summary.json": ("../summary.json", lambda p, rng: p.write_text("{")),
}


def damage(smoke: Path, rng, count: int) -> list[tuple[str, str]]:
    """count random damages to random runs of the copy; [(run folder name, damage)]."""
    done = []
    runs = run_dirs(smoke)
    for _ in range(count):
        name = rng.choice(sorted(DAMAGE))
        target, act = DAMAGE[name]
        run_dir = rng.choice(runs)
        if not run_dir.exists():
            continue
        path = (run_dir / target).resolve()
        if name == "garbage failure.json":
            (run_dir / "result.json").unlink(missing_ok=True)
        elif not path.exists():
            continue
        act(path, rng) if name != "garbage failure.json" else act(run_dir / "failure.json", rng)
        done.append((f"{run_dir.parent.name}/{run_dir.name}", name))
    return done


@pytest.mark.parametrize("seed", range(12))
def test_a_damaged_copy_of_the_sweep_reports_what_it_can_and_one_line_per_run_left_out(smoke_sweep, tmp_path, seed,
                                                                                      capsys):
    rng = random.Random(seed)
    smoke = copy_of(smoke_sweep, tmp_path / "smoke")
    done = damage(smoke, rng, count=4 + seed)
    try:
        code = report.main([str(smoke), *CHEAP])
    except SystemExit as e:  # nothing left to report: one line, exit 1
        code = e.code
    out, err = capsys.readouterr()
    assert code in (0, 1), (done, out, err)
    if code == 1:
        assert len(err.strip().splitlines()) == 1
        return
    lines = left_out(out)
    assert not [line for line in lines if "could not be drawn" in line], (done, lines)
    for run_dir in run_dirs(smoke):  # judged here with the json module alone
        name = f"{run_dir.parent.name}/{run_dir.name}"
        try:
            result = json.loads((run_dir / "result.json").read_text())
        except FileNotFoundError:
            continue
        except ValueError:
            result = None
        acc = result.get("acc") if isinstance(result, dict) else None
        usable = isinstance(acc, (int, float)) and acc == acc
        if not usable or not (run_dir / "metrics.jsonl").is_file():
            assert any(line.startswith(f"left out: {name}: ") for line in lines), (name, done, lines)
    md = (smoke / "report.md").read_text()
    assert all(line.removeprefix("left out: ") in md for line in lines if "figure" not in line)
    with open(smoke / "runs.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(run_dirs(smoke))
    assert (smoke / "tables.tex").is_file() and (smoke / "macros.tex").is_file()
