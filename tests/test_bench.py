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


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    p = bench("--device", "cpu", "--steps", "1", "--group", "1", "--repeats", "1", "--setups", "resnet18",
              "--batch", "2", "--compile", "eager", "--profile", "--json", out)
    return p, out


def test_tiny_cpu_run_fills_the_table_and_the_json(tiny_run):
    p, out = tiny_run
    assert p.returncode == 0, p.stderr[-3000:]
    assert "say little about a GPU" in p.stdout  # the CPU note
    r = json.loads(out.read_text())
    assert {(s["layers"], s["solver"]) for s in r["solvers"]} == {
        (layers, solver) for layers in ("resnet18 all", "resnet50 layer4+avgpool")
        for solver in ("float32", "float64", "host", "padded", "batched32", "batched64")}
    assert all(s["ms"] > 0 and s["reps"] == 1 for s in r["solvers"] if not s["solver"].startswith("batched"))
    assert all(s["ms"] is None and s["skipped"] == "not a CUDA device"  # the direct cuSOLVER routes: CUDA only
               for s in r["solvers"] if s["solver"].startswith("batched"))
    variants = {s["variant"] for s in r["steps"]}
    assert variants == {"baseline", "k=1", "k=3", "k=5", "k=10", "baseline compiled", "k=1 compiled",
                        "k=10 compiled", "baseline+loader"}
    base = next(s for s in r["steps"] if s["variant"] == "baseline")
    assert base["ms"] > 0 and all(s["images_per_s"] == pytest.approx(2 / (s["ms"] / 1e3)) for s in r["steps"])
    k1 = next(s for s in r["steps"] if s["variant"] == "k=1")
    assert k1["solver"] == "float32" and k1["solver_timings_ms"] == {} and k1["solver_margin"] is None  # auto on a CPU
    assert r["profile"]["resnet18"] and "convolution" in " ".join(e["op"] for e in r["profile"]["resnet18"])
    env = r["env"]
    assert env["device_type"] == "cpu" and env["torch"] == torch.__version__ and env["date"][:2] == "20"
    assert env["command"].startswith("python bench/bench_ses.py --device cpu") and isinstance(env["torch_batches_eigh"], bool)


DOC = "# Notes\n\nbefore the table\n\n<!-- ses-cost-table:begin -->\nold text\n<!-- ses-cost-table:end -->\n\nafter\n"


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
    row = next(line for line in text.splitlines() if line.startswith(f"| {r['env']['device']} |")).split(" | ")
    steps = {s["variant"]: s for s in r["steps"]}
    assert row[1:7] == [f"{r['env']['torch']} / {r['env']['cuda']}", r["env"]["date"][:10], "ResNet-18 `all`, CIFAR-100",
                        "fp32", "2", f"{steps['baseline']['ms']:.1f} ms"]
    assert row[7] == f"{100 * steps['k=1']['vs_baseline']:+.1f} %" and row[10] == f"{100 * steps['k=10']['vs_baseline']:+.1f} %"
    assert row[11] == f"{100 * (steps['k=1 compiled']['ms'] / steps['baseline compiled']['ms'] - 1):+.1f} %"
    assert cost_table.main(["--results", str(results), "--include-cpu", str(doc)]) == 0 and doc.read_text() == text
    capsys.readouterr()
    assert cost_table.main(["--results", str(results), str(doc), str(plain)]) == 1  # one file lacks the pair
    assert "plain.md has no <!-- ses-cost-table:begin -->" in capsys.readouterr().err
    assert doc.read_text() == text and plain.read_text() == "no markers here\n"  # no file changed
    (results / "broken.json").write_text("{not json")
    assert cost_table.main(["--results", str(results), str(doc)]) == 1 and doc.read_text() == text
