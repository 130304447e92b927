"""bench/bench_ses.py: one-line errors, and a tiny CPU run that fills every part of its JSON; bench/cost_table.py
turns that JSON (the schema bench_ses writes) into the Markdown table between the markers of a file."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = str(ROOT / "bench" / "bench_ses.py")
sys.path.insert(0, str(ROOT / "bench"))
import cost_table  # noqa: E402


def bench(*args, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))  # steady on a shared CPU
    return subprocess.run([sys.executable, BENCH, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def bench_in_process(capsys, *args):
    """bench_ses.main(args) in this process: (exit code, stderr)."""
    import bench_ses
    with pytest.raises(SystemExit) as e:
        bench_ses.main([str(a) for a in args])
    return e.value.code, capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line(capsys):
    code, err = bench_in_process(capsys, "--device", "cuda")
    assert code == 2 and "Traceback" not in err and err.strip().count("\n") == 0
    assert "CUDA is not available" in err


def test_zero_steps_is_one_line(capsys):
    code, err = bench_in_process(capsys, "--device", "cpu", "--steps", "0")
    assert code == 2 and "Traceback" not in err and err.strip().count("\n") == 0


def test_a_route_this_device_cannot_run_is_one_line(capsys):
    code, err = bench_in_process(capsys, "--device", "cpu", "--ses-solver", "batched32")
    assert code == 2 and "Traceback" not in err and err.strip().count("\n") == 0 and "not a CUDA device" in err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    p = bench("--device", "cpu", "--steps", "1", "--group", "1", "--repeats", "1", "--setups", "resnet18",
              "--batch", "2", "--ks", "1", "3", "--compile", "eager", "--profile", "--ses-solver", "float64", "--json", out)
    return p, out


def test_tiny_cpu_run_fills_the_table_and_the_json(tiny_run):
    p, out = tiny_run
    assert p.returncode == 0, p.stderr[-3000:]
    assert "say little about a GPU" in p.stdout  # the CPU note
    r = json.loads(out.read_text())
    assert {(s["layers"], s["solver"]) for s in r["solvers"]} == {  # only the setup asked for
        ("resnet18 all", solver) for solver in ("float32", "float64", "host", "padded", "batched32", "batched64")}
    assert all(s["ms"] > 0 and s["reps"] == 1 for s in r["solvers"] if not s["solver"].startswith("batched"))
    assert all(s["ms"] is None and s["skipped"] == "not a CUDA device"  # the direct cuSOLVER routes: CUDA only
               for s in r["solvers"] if s["solver"].startswith("batched"))
    steps = {s["variant"]: s for s in r["steps"]}
    assert set(steps) == {"baseline", "k=1", "k=3", "baseline compiled", "k=1 compiled", "k=3 compiled", "baseline+loader",
                          *(f"k=1 {route}" for route in ("float32", "float64", "host", "padded", "batched32", "batched64"))}
    timed = [s for s in r["steps"] if s["ms"] is not None]
    assert steps["baseline"]["ms"] > 0 and all(s["images_per_s"] == pytest.approx(2 / (s["ms"] / 1e3)) for s in timed)
    for s in timed:  # every timed group holds whole SES periods: exactly group / k SES steps
        k = int(s["variant"].split()[0][2:]) if s["variant"].startswith("k=") else None
        assert s["ses_steps_per_group"] == ([s["steps_per_group"] // k] if k else [0]), s
        assert k is None or s["steps_per_group"] % k == 0
    assert steps["k=3"]["steps_per_group"] == 3 and steps["k=1"]["steps_per_group"] == 1  # --group 1, rounded up
    # ResNet-18 `all`: 9 hooks, avgpool's pooled output is layer4.1's (solved once) except under torch.compile
    assert steps["k=1"]["matrices_per_ses_step"] == 8 and steps["k=1 compiled"]["matrices_per_ses_step"] == 9
    for route in ("float32", "float64", "host", "padded"):  # SES k = 1 with the route fixed, timed as training runs it
        assert steps[f"k=1 {route}"]["solver"] == route and steps[f"k=1 {route}"]["ms"] > 0
    assert steps["k=1 batched32"]["ms"] is None and steps["k=1 batched32"]["skipped"] == "not a CUDA device"
    for label in ("k=1", "k=3", "k=1 compiled", "k=3 compiled"):  # --ses-solver: the route of the SES rows
        assert steps[label]["solver"] == "float64"
    assert r["profile"]["resnet18"] and "convolution" in " ".join(e["op"] for e in r["profile"]["resnet18"])
    env = r["env"]
    assert env["device_type"] == "cpu" and env["torch"] == torch.__version__ and env["date"][:2] == "20"
    assert env["command"].startswith("python bench/bench_ses.py --device cpu") and isinstance(env["torch_batches_eigh"], bool)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert head and env["commit"].split("+")[0] == head[:12]


DOC = "# Notes\n\nbefore the table\n\n<!-- ses-cost-table:begin -->\nold text\n<!-- ses-cost-table:end -->\n\nafter\n"


def _measured(env):
    return f"{env['date'][:10]} {env['date'][11:16]} UTC, {env['commit']}"


def test_cost_table_from_a_real_bench_json_between_the_markers(tiny_run, tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    doc, plain = tmp_path / "doc.md", tmp_path / "plain.md"
    doc.write_text(DOC)
    plain.write_text("no markers here\n")
    assert cost_table.main(["--results", str(results), str(doc)]) == 0  # no JSON yet
    assert doc.read_text() == DOC.replace("old text", cost_table.NONE_YET)
    (results / "cpu_run.json").write_text(tiny_run[1].read_text())
    assert cost_table.main(["--results", str(results), str(doc)]) == 0
    assert doc.read_text() == DOC.replace("old text", cost_table.NONE_YET)  # a CPU run is not a GPU measurement
    assert cost_table.main(["--results", str(results), "--include-cpu", str(doc)]) == 0
    r, text = json.loads(tiny_run[1].read_text()), doc.read_text()
    assert text.startswith("# Notes\n\nbefore the table\n\n<!-- ses-cost-table:begin -->\n| GPU |")
    assert text.endswith("<!-- ses-cost-table:end -->\n\nafter\n") and "old text" not in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith(f"| {r['env']['device']} |")]
    assert len(rows) == 2  # the cost row and the per-route row of the one measurement
    row, routes = rows
    steps = {s["variant"]: s for s in r["steps"]}
    assert row[1:7] == [f"{r['env']['torch']} / {r['env']['cuda']}", _measured(r["env"]), "ResNet-18 `all`, CIFAR-100",
                        "fp32", "2", f"{steps['baseline']['ms']:.1f} ms"]
    assert row[7] == f"{100 * steps['k=1']['vs_baseline']:+.1f} %" and row[8] == f"{100 * steps['k=3']['vs_baseline']:+.1f} %"
    assert row[9] == row[10] == "–"  # k = 5, 10 not timed in this run
    assert row[11] == f"{100 * (steps['k=1 compiled']['ms'] / steps['baseline compiled']['ms'] - 1):+.1f} % (9 matrices, eager 8)"
    solve = {x["solver"]: x["ms"] for x in r["solvers"]}
    assert routes[5] == f"{solve['float32']:.2f} ms; k=1 {100 * steps['k=1 float32']['vs_baseline']:+.1f} %"
    assert routes[9:] == ["–", "– |"]  # batched32 / batched64 do not run on a CPU, and the lines below say why
    assert row[12] == f"float64 {solve['float64']:.2f} ms |"  # the route of the SES rows, its solve
    assert f"- {r['env']['device']}, torch {r['env']['torch']} / {r['env']['cuda']}: batched32 not run (not a CUDA device)" in text
    assert cost_table.main(["--results", str(results), "--include-cpu", str(doc)]) == 0 and doc.read_text() == text
    capsys.readouterr()
    assert cost_table.main(["--results", str(results), str(doc), str(plain)]) == 1  # one file lacks the pair
    assert "plain.md has no <!-- ses-cost-table:begin -->" in capsys.readouterr().err
    assert doc.read_text() == text and plain.read_text() == "no markers here\n"  # no file changed
    (results / "broken.json").write_text("{not json")
    assert cost_table.main(["--results", str(results), str(doc)]) == 1 and doc.read_text() == text


def test_the_eager_and_compiled_parts_of_one_measurement_make_one_row_and_another_commit_its_own(tiny_run, tmp_path):
    """gpu_check keeps the eager and the --compiled-only JSON of one run apart: the table merges them."""
    r = json.loads(tiny_run[1].read_text())
    r["env"].update(device_type="cuda", device="GPU X")
    eager = dict(r, steps=[s for s in r["steps"] if "compiled" not in s["variant"]])
    compiled = dict(r, solvers=[], steps=[s for s in r["steps"] if "compiled" in s["variant"]])
    later = json.loads(json.dumps(eager))
    later["env"].update(commit="0123456789ab", date="2031-01-02T03:04:05+00:00")
    block, n = cost_table.table([eager, compiled, later])
    cost = [row for row in (line.split(" | ") for line in block.splitlines() if line.startswith("| GPU X |"))
            if len(row) == 13]  # the cost table's rows (the per-route table has 11 columns)
    assert n == 2 and [row[2] for row in cost] == [_measured(r["env"]), "2031-01-02 03:04 UTC, 0123456789ab"]
    assert cost[0][11].endswith("(9 matrices, eager 8)") and cost[1][11] == "–"  # merged; the other commit has none


def test_the_default_files_are_the_readme_and_docs_solver_md(tiny_run, tmp_path, monkeypatch, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "bench" / "results").mkdir(parents=True)
    for name in ("README.md", "docs/solver.md"):
        (tmp_path / name).write_text(DOC)
    r = json.loads(tiny_run[1].read_text())
    r["env"]["device_type"] = "cuda"  # stands in for a GPU measurement
    (tmp_path / "bench" / "results" / "x.json").write_text(json.dumps(r))
    monkeypatch.setattr(cost_table, "ROOT", tmp_path)
    assert cost_table.main([]) == 0
    assert all(f"| {r['env']['device']} |" in (tmp_path / name).read_text() for name in ("README.md", "docs/solver.md"))


def test_the_cost_table_runs_without_torch(tiny_run, tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(DOC)
    (tmp_path / "r").mkdir()
    code = ("import sys; sys.modules['torch'] = None; sys.modules['tqdm'] = None; sys.path.insert(0, sys.argv[1]); "
            "import cost_table; sys.exit(cost_table.main(['--results', sys.argv[2], sys.argv[3]]))")
    p = subprocess.run([sys.executable, "-c", code, str(ROOT / "bench"), str(tmp_path / "r"), str(doc)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    assert cost_table.NONE_YET in doc.read_text()


def test_a_record_names_its_commit_dirty_or_not_and_none_outside_a_checkout(tmp_path, monkeypatch):
    import records
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # git looks for no checkout above tmp_path
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", "-C", str(tmp_path / "repo")]
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "a.txt").write_text("one\n")
    for cmd in (["init", "-q"], ["add", "a.txt"], ["commit", "-q", "-m", "a"]):
        subprocess.run(git + cmd, check=True, capture_output=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert records.commit(tmp_path / "repo") == head[:12]
    (tmp_path / "repo" / "untracked.txt").write_text("not part of the code\n")
    assert records.commit(tmp_path / "repo") == head[:12]  # untracked files do not make it dirty
    (tmp_path / "repo" / "a.txt").write_text("two\n")
    assert records.commit(tmp_path / "repo") == head[:12] + "+dirty"
    (tmp_path / "copy").mkdir()
    assert records.commit(tmp_path / "copy") is None  # a copied folder, no checkout


def test_a_record_that_cannot_be_moved_into_place_leaves_no_temp_file(tmp_path):
    import records
    (tmp_path / "out.json").write_text("old")
    records.write_atomic(tmp_path / "out.json", "new")
    assert (tmp_path / "out.json").read_text() == "new"
    (tmp_path / "taken").mkdir()  # a folder where the file should go: os.replace fails
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(OSError):
        records.write_atomic(tmp_path / "taken", "text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "taken"]
