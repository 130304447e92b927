"""bench/gpu_check.sh: the --cpu rehearsal end to end (every part run or skipped with its reason, one JSON and one
text file), and the orchestrator's limits on stand-in parts: a hanging part is ended at its limit with its
process group, a missing module or a spent budget is a reason, a failing part never stops the others."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402
import gpu_check_parts  # noqa: E402
from gpu_check_parts import Part, probe_result  # noqa: E402


def test_the_cpu_rehearsal_runs_every_part_or_says_why_not(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu", str(out)], cwd=tmp_path,
                       env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    text = (out / "gpu_check.txt").read_text()
    assert report["mode"] == "cpu" and report["seconds"] <= gpu_check.BUDGET_S and report["results"] == []
    parts = {r["name"]: r for r in report["parts"]}
    assert list(parts) == [part.name for part in gpu_check_parts.PARTS]
    for name, r in parts.items():
        assert r["status"] in ("ok", "skipped"), (name, r)
        assert any(line.split()[:2] == [name, r["status"]] for line in text.splitlines()), name
        if r["status"] == "skipped":
            assert r["reason"] and r["reason"] in text and r["command"] is None
        else:
            assert r["exit_code"] == 0 and r["seconds"] > 0 and (out / r["log"]).is_file() and r["command"] in text
    for name in ("selftest", "hostsync", "cuda_tests"):
        assert parts[name]["reason"] == "needs CUDA"
    assert {parts[n]["status"] for n in ("env", "bench_resnet18_bf16", "torchrun_smoke", "collectives",
                                        "exp12_preflight")} == {"ok"}
    assert parts["env"]["figures"]["torch"] and parts["env"]["figures"]["cuda_available"] is False
    bench = parts["bench_resnet18_bf16"]["figures"]
    assert bench["device_type"] == "cpu" and {"baseline", "k=1", "k=3", "k=5", "k=10"} <= set(bench["steps"])
    assert (out / bench["json"]).is_file() and bench["auto"]["route"] == "float32"
    (run,) = parts["torchrun_smoke"]["figures"].values()
    assert run["config"] == "ses_k1" and run["ses_solver"] == "float32" and run["epochs"] == 1
    assert parts["collectives"]["figures"]["backend"] == "gloo" and parts["collectives"]["figures"]["all_gather"] is True
    assert [r["config"] for r in parts["exp12_preflight"]["figures"]["rows"]] == ["mixup"]
    assert parts["exp12_preflight"]["figures"]["projected"].startswith("projected sweep")


def _part(name, argv, limit=30, needs=("torch",)):
    return Part(name, name, argv, argv, 1, 1, limit, probe_result, needs=needs)


PY = sys.executable
PID_FILE = "child.pid"
HANG = [PY, "-c", f"import os, signal; open({PID_FILE!r}, 'w').write(str(os.getpid())); signal.pause()"]


@pytest.fixture
def stand_ins(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)  # parts run in tmp_path
    monkeypatch.setattr(gpu_check_parts, "PARTS", [
        _part("probe", lambda c: [PY, "-c", "print('noise'); print('GPU_CHECK_RESULT {\"x\": 1}')"]),
        _part("broken", lambda c: [PY, "-c", "import sys; print('what failed'); sys.exit(3)"]),
        _part("missing", lambda c: [PY, "-c", "pass"], needs=("torch", "no_such_module_here")),
        _part("hangs", lambda c: HANG, limit=2),
        _part("after", lambda c: [PY, "-c", "print('GPU_CHECK_RESULT {}')"]),
    ])
    monkeypatch.setattr(gpu_check, "MODULES", ("torch", "no_such_module_here"))
    return tmp_path


def test_a_failing_hanging_or_unmet_part_is_recorded_and_the_check_goes_on(stand_ins, capsys):
    assert gpu_check.main(["--cpu", str(stand_ins / "out")]) == 1
    report = json.loads((stand_ins / "out" / "gpu_check.json").read_text())
    got = {r["name"]: r for r in report["parts"]}
    assert [(n, r["status"], r["exit_code"]) for n, r in got.items()] == [
        ("probe", "ok", 0), ("broken", "failed", 3), ("missing", "skipped", None), ("hangs", "timeout", got["hangs"]["exit_code"]),
        ("after", "ok", 0)]
    assert got["probe"]["figures"] == {"x": 1} and got["broken"]["last_line"] == "what failed"
    assert got["missing"]["reason"] == "needs no_such_module_here (not installed here)"
    assert got["hangs"]["limit_s"] == 2 and got["hangs"]["seconds"] < 15
    pid = int((stand_ins / PID_FILE).read_text())
    with pytest.raises(ProcessLookupError):  # its process was ended with the part
        os.kill(pid, 0)
    assert report["modules"] == {"torch": True, "no_such_module_here": False}
    text = (stand_ins / "out" / "gpu_check.txt").read_text()
    assert "broken                       failed" in text and "what failed" in text and "needs no_such_module_here" in text


def test_a_part_that_would_start_after_the_budget_is_skipped(stand_ins, monkeypatch):
    monkeypatch.setattr(gpu_check, "BUDGET_S", gpu_check.MIN_PART_S - 1)
    assert gpu_check.main(["--cpu", str(stand_ins / "out")]) == 0
    report = json.loads((stand_ins / "out" / "gpu_check.json").read_text())
    assert {r["status"] for r in report["parts"]} == {"skipped"}
    assert all("budget is spent" in r["reason"] for r in report["parts"] if r["name"] != "missing")


def test_without_cuda_the_gpu_mode_says_so_and_skips_the_rest(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)
    monkeypatch.setattr(gpu_check_parts, "PARTS", [
        _part("env", lambda c: [PY, "-c", "print('GPU_CHECK_RESULT {\"cuda_available\": false}')"]),
        _part("bench", lambda c: [PY, "-c", "raise SystemExit('must not run')"])])
    assert gpu_check.main([str(tmp_path / "out")]) == 2
    assert "CUDA is not available here" in capsys.readouterr().err.strip().splitlines()[-1]
    bench = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["parts"][1]
    assert bench["status"] == "skipped" and "--cpu rehearses" in bench["reason"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU answer")
def test_a_probe_that_fails_says_why_in_one_line_and_in_its_result():
    p = subprocess.run([PY, str(ROOT / "bench" / "gpu_probes.py"), "selftest", "--device", "cuda:0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert probe_result(None, p.stdout) == {"error": p.stderr.strip()}
