"""bench/gpu_check.sh: the --cpu rehearsal end to end, in two halves (--only; each half runs env), every
part run or skipped with its reason, one JSON and one text file; and the orchestrator's rules on stand-in
parts: a hanging part is ended at its limit with its process group, whatever a part leaves running (in a
session of its own, as torchrun's workers are) is killed, a missing module or a spent budget is a reason,
a failing part never stops the others, and a machine without torch or a failed env part exits 2."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402
import gpu_check_parts  # noqa: E402
from gpu_check_parts import Part, probe_result  # noqa: E402
from ses_solvers import decision  # noqa: E402

SOLVER_HALF = ("nvidia_smi", "selftest", "hostsync", "cuda_tests", "bench_resnet18", "bench_resnet50", "bench_resnet18_compile")
SCRIPT_HALF = ("torchrun_smoke", "collectives", "exp11_preflight", "exp12_preflight")


def rehearse(tmp_path, only):
    """Run `bash bench/gpu_check.sh --cpu --only ...` and check what holds for every part: (parts by name, text)."""
    out = tmp_path / "out"
    p = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu", "--only", ",".join(only), str(out)],
                       cwd=tmp_path, env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True, timeout=600)
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
            assert (name in only) != (r["reason"] == "not asked for (--only)"), (name, r["reason"])
        else:
            assert r["exit_code"] == 0 and r["seconds"] > 0 and (out / r["log"]).is_file() and r["command"] in text
            assert r["left_running_killed"] == 0
    assert parts["env"]["status"] == "ok" and parts["env"]["figures"]["cuda_available"] is False
    assert parts["env"]["figures"]["torch"] and parts["env"]["figures"]["commit"]
    return parts, out


def test_the_two_rehearsal_halves_hold_every_part():
    assert sorted(("env",) + SOLVER_HALF + SCRIPT_HALF) == sorted(part.name for part in gpu_check_parts.PARTS)


def test_the_cpu_rehearsal_runs_the_solver_parts(tmp_path):
    parts, out = rehearse(tmp_path, SOLVER_HALF)
    for name in ("selftest", "hostsync"):
        assert parts[name]["reason"] == "needs CUDA"
    assert parts["bench_resnet50"]["reason"] == gpu_check_parts.R50_ON_CPU
    tests = parts["cuda_tests"]  # the suite's pytest.ini asks for -n 2: the part's command runs without xdist
    assert tests["status"] == "ok" and tests["figures"]["skipped"] >= 3 and "failed" not in tests["figures"]
    bench = parts["bench_resnet18"]["figures"]
    assert bench["device_type"] == "cpu" and {"bf16 baseline", "bf16 k=1", "bf16 k=3", "bf16 k=1 host"} <= set(bench["steps"])
    assert (out / bench["json"]).is_file() and bench["steps"]["bf16 k=1"]["solver"] == "float32"


def test_the_cpu_rehearsal_runs_the_script_parts(tmp_path):
    parts, _ = rehearse(tmp_path, SCRIPT_HALF)
    (run,) = parts["torchrun_smoke"]["figures"].values()
    assert run["config"] == "ses_k1" and run["ses_solver"] == "float32" and run["epochs"] == 1
    assert run["ses_solver_source"] == decision.ON_CPU
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


# A child in a session of its own (as torch elastic starts torchrun's workers), out of reach of the part's group.
ORPHAN = [PY, "-c", "import subprocess, sys; subprocess.Popen([sys.executable, '-c', "
          f"\"import os, signal; open({PID_FILE!r}, 'w').write(str(os.getpid())); signal.pause()\"], start_new_session=True); "
          f"import os, time\nwhile not os.path.exists({PID_FILE!r}): time.sleep(0.01)"]


@pytest.mark.parametrize("then", ["exits", "hangs"])
def test_what_a_part_leaves_running_in_another_session_is_killed(monkeypatch, tmp_path, then):
    argv = ORPHAN if then == "exits" else ORPHAN[:2] + [ORPHAN[2] + "\nimport signal; signal.pause()"]
    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)
    monkeypatch.setattr(gpu_check_parts, "PARTS", [_part("spawns", lambda c: argv, limit=2)])
    gpu_check.main(["--cpu", str(tmp_path / "out")])
    (rec,) = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["parts"]
    assert rec["status"] == ("ok" if then == "exits" else "timeout") and rec["left_running_killed"] == 1
    assert not alive(int((tmp_path / PID_FILE).read_text()))


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, killed but not yet reaped by its new parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_without_torch_or_with_a_failed_env_part_the_check_exits_2_in_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)
    monkeypatch.setattr(gpu_check_parts, "PARTS", [
        _part("env", lambda c: [PY, "-c", "import sys; print('ImportError: libtorch_cuda.so: cannot open'); sys.exit(1)"]),
        _part("bench", lambda c: [PY, "-c", "pass"], needs=())])
    assert gpu_check.main([str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu_check: the env part failed: ImportError: libtorch_cuda.so")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == "torch" else real(m, *a))
    assert gpu_check.main([str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu_check: torch is not installed for ")
    parts = json.loads((tmp_path / "out2" / "gpu_check.json").read_text())["parts"]
    assert parts[0]["reason"] == "needs torch (not installed here)" and parts[1]["status"] == "ok"


def test_the_last_line_names_the_error_and_no_limit_reaches_past_the_budget(monkeypatch, tmp_path):
    usage = "ERROR: usage: __main__.py [options] [file_or_dir]\n__main__.py: error: unrecognized arguments: -n\n"
    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)
    monkeypatch.setattr(gpu_check, "BUDGET_S", 60)
    monkeypatch.setattr(gpu_check_parts, "PARTS", [
        _part("usage", lambda c: [PY, "-c", f"import sys; sys.stdout.write({usage!r} + '  inifile: pytest.ini\\n'); sys.exit(4)"],
              limit=1000)])
    assert gpu_check.main(["--cpu", str(tmp_path / "out")]) == 1
    (rec,) = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["parts"]
    assert rec["last_line"] == "__main__.py: error: unrecognized arguments: -n"
    assert rec["limit_s"] <= 60 - gpu_check.KILL_S  # ended (SIGTERM, SIGKILL, sweep) within the budget


def test_the_compile_part_needs_a_c_compiler_and_kept_files_never_overwrite_each_other(monkeypatch):
    compile_part = next(p for p in gpu_check_parts.PARTS if p.name == "bench_resnet18_compile")
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    ctx = gpu_check_parts.Context(out=Path("/nonexistent"), cpu=False, python=PY, root=ROOT)
    assert "need a C compiler" in compile_part.skip_reason(ctx, {m: True for m in gpu_check.MODULES})
    monkeypatch.setenv("CC", "/usr/bin/cc")
    assert compile_part.skip_reason(ctx, {m: True for m in gpu_check.MODULES}) is None
    fig = dict(device="NVIDIA H100 80GB HBM3", torch="2.11.0+cu130", date="2026-11-24T10:12:03+00:00", commit="963cccb1a2b3")
    before = gpu_check_parts.result_name(fig, "bench_resnet18")
    after = gpu_check_parts.result_name(dict(fig, date="2026-11-24T16:40:00+00:00", commit="abcdef123456+dirty"), "bench_resnet18")
    assert before == "nvidia-h100-80gb-hbm3_torch2.11.0-cu130_20261124T1012_963cccb1a2b3_resnet18.json"
    assert after != before and "abcdef123456-dirty" in after


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU answer")
def test_a_probe_that_fails_says_why_in_one_line_and_in_its_result():
    p = subprocess.run([PY, str(ROOT / "bench" / "gpu_probes.py"), "selftest", "--device", "cuda:0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert probe_result(None, p.stdout) == {"error": p.stderr.strip()}
