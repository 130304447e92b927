"""bench/bench_ses.py: one-line errors, and a tiny CPU run that fills every part of its JSON."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = str(ROOT / "bench" / "bench_ses.py")


def bench(*args, timeout=900):
    return subprocess.run([sys.executable, BENCH, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line():
    p = bench("--device", "cuda")
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.strip().count("\n") == 0
    assert "CUDA is not available" in p.stderr


def test_zero_steps_is_one_line():
    p = bench("--device", "cpu", "--steps", "0")
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.strip().count("\n") == 0


def test_tiny_cpu_run_fills_the_table_and_the_json(tmp_path):
    out = tmp_path / "bench.json"
    p = bench("--device", "cpu", "--steps", "1", "--repeats", "1", "--setups", "resnet18", "--batch", "4",
              "--compile", "aot_eager", "--profile", "--json", out)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "say little about a GPU" in p.stdout  # the CPU note
    r = json.loads(out.read_text())
    assert {(s["layers"], s["solver"]) for s in r["solvers"]} == {
        (layers, solver) for layers in ("resnet18 all", "resnet50 layer4+avgpool")
        for solver in ("float32", "float64", "host", "padded", "batched32", "batched64")}
    assert all(s["ms"] > 0 for s in r["solvers"] if not s["solver"].startswith("batched"))
    assert all(s["ms"] is None and s["skipped"] == "not a CUDA device"  # the direct cuSOLVER routes: CUDA only
               for s in r["solvers"] if s["solver"].startswith("batched"))
    variants = {s["variant"] for s in r["steps"]}
    assert variants == {"baseline", "k=1", "k=3", "k=5", "k=10", "baseline compiled", "k=1 compiled",
                        "k=10 compiled", "baseline+loader"}
    base = next(s for s in r["steps"] if s["variant"] == "baseline")
    assert base["ms"] > 0 and all(s["images_per_s"] == pytest.approx(4 / (s["ms"] / 1e3)) for s in r["steps"])
    assert r["profile"]["resnet18"] and "convolution" in " ".join(e["op"] for e in r["profile"]["resnet18"])
