"""cusolver_batched on a CPU: the library and its bindings load, the bindings match cusolverDn.h, the
call is checked against cuSOLVER's documented contract by a host-memory stand-in (argument order,
dtype codes, column-major layout, the workspace sizes bufferSize returned), every call runs on the
tensor's device and stream under one lock, the batched route reads nothing on the host, the size limit
and every failure come back as a reason, never an escaping exception. The `test_cuda_*` tests run the
real call and need a GPU (bench/gpu_check.sh runs them)."""
import ctypes
import gc
import re
import subprocess
import sys
import types
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ses_solvers import cusolver_batched
from fake_cuda import FakeCusolver, FakeDevices, OldFakeCusolver, RecordingLock

ROOT = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _header_argtypes(header: str, name: str) -> list:
    """The ctypes class of each parameter of `name` as cusolverDn.h declares it (pointers as one kind)."""
    params = re.search(r"CUSOLVERAPI\s+" + name + r"\s*\((.*?)\);", header, re.S).group(1).split(",")
    kinds = {"int64_t": ctypes.c_int64, "size_t": ctypes.c_size_t, "int": ctypes.c_int, "cusolverEigMode_t": ctypes.c_int,
             "cublasFillMode_t": ctypes.c_int, "cudaDataType": ctypes.c_int}  # C enums pass as int
    out = []
    for param in params:
        words = param.replace("*", " * ").replace("const", " ").split()
        out.append("pointer" if "*" in words or words[0].endswith(("Handle_t", "Params_t", "Info_t", "Stream_t"))
                   else kinds[words[0]])
    return out


def test_the_bindings_match_cusolverDn_h_and_the_library_has_them():
    """Each argtypes list against the header shipped with the CUDA wheel (an independent declaration)."""
    lib = cusolver_batched.library()
    path = Path(cusolver_batched.find_library()).parents[1] / "include" / "cusolverDn.h"
    if not path.is_file():
        pytest.skip(f"no cusolverDn.h beside {cusolver_batched.find_library()}")
    header = path.read_text(errors="replace")
    for name, argtypes in cusolver_batched._SIGNATURES.items():
        if name == "cusolverDnXsyevBatched" or name.startswith("cusolverDnXsyevBatched_"):
            if not cusolver_batched.has_xsyev_batched():
                continue  # cuSOLVER < 11.7.1
        assert hasattr(lib, name), name
        ours = ["pointer" if t is ctypes.c_void_p or hasattr(t, "contents") else t for t in argtypes]
        assert ours == _header_argtypes(header, name), name


def test_eigh_batched_rejects_what_it_cannot_solve_before_any_call(monkeypatch):
    monkeypatch.setattr(cusolver_batched, "library", lambda device=None: pytest.fail("cuSOLVER was called"))
    with pytest.raises(ValueError, match=r"\(B, k, k\) float32/float64"):
        cusolver_batched.eigh_batched(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="float32/float64"):
        cusolver_batched.eigh_batched(torch.zeros(2, 4, 4, dtype=torch.float16))
    huge = torch.zeros(1, 1, 1).expand(32769, 256, 256)  # 32769 * 256 * 256 = 2^31 + 65536: a view, no memory
    with pytest.raises(ValueError, match=r"n\*lda\*batch <= INT32_MAX"):
        cusolver_batched.eigh_batched(huge)
    assert cusolver_batched.size_error(32767, 256) == "" and cusolver_batched.size_error(1, 46341)  # 46341^2 > 2^31 - 1


def test_available_reports_the_size_limit_without_a_child(monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("a selftest child was started"))
    why = cusolver_batched.available(torch.device("cuda", 0), (32769, 256))
    assert "INT32_MAX" in why and "smaller stacks" in why


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_available_says_why_not_without_a_gpu_and_never_raises(monkeypatch):
    assert cusolver_batched.available(torch.device("cpu")) == "not a CUDA device"
    monkeypatch.setattr(cusolver_batched, "_probed", {})
    why = cusolver_batched.available(torch.device("cuda", 0))  # runs the selftest in a child process
    assert why.startswith("selftest exited 1: ") and "Traceback" not in why
    assert cusolver_batched._probed == {(0, None): why}  # asked once per device and shape


def test_available_never_raises_when_the_library_fails(monkeypatch):
    def broken(device=None):
        raise RuntimeError("CUDA driver initialization failed\nsecond line")
    monkeypatch.setattr(cusolver_batched, "library", broken)
    monkeypatch.setattr(cusolver_batched, "_probed", {})
    assert cusolver_batched.available(torch.device("cuda", 2), (8, 256)) == \
        "RuntimeError: CUDA driver initialization failed"
    monkeypatch.setattr(torch.cuda, "current_device", lambda: broken())  # no index to ask about
    assert cusolver_batched.available(torch.device("cuda")).startswith("RuntimeError: ")


def test_the_selftest_child_runs_on_the_device_and_shape_asked_for(monkeypatch):
    seen = {}
    monkeypatch.setattr(cusolver_batched, "library", lambda device=None: seen.setdefault("library", device))
    monkeypatch.setattr(cusolver_batched, "_probed", {})
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: seen.setdefault("args", args) and
                        types.SimpleNamespace(returncode=0, stdout="passed", stderr=""))
    assert cusolver_batched.available(torch.device("cuda", 3), (8, 256)) == ""
    assert seen["library"] == torch.device("cuda", 3)  # find_library's probe runs there, not on GPU 0
    assert seen["args"][3:] == ["--selftest", "cuda:3", "--shape", "8x256"]
    assert cusolver_batched._probed == {(3, (8, 256)): ""}


def test_find_library_probes_on_the_device_asked_for(monkeypatch):
    mapped, probed = iter([None, "/x/libcusolver.so.12"]), []
    monkeypatch.setattr(cusolver_batched, "_mapped", lambda: next(mapped))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "eye", lambda n, device=None: probed.append(device))
    monkeypatch.setattr(torch.linalg, "eigvalsh", lambda a: None)
    assert cusolver_batched.find_library(torch.device("cuda", 1)) == "/x/libcusolver.so.12"
    assert probed == [torch.device("cuda", 1)]


def test_the_selftest_covers_the_real_padded_stack():
    cases = dict(cusolver_batched._cases([(8, 256), (3, 512)], torch.Generator().manual_seed(0)))
    assert {k: tuple(a.shape) for k, a in cases.items() if "padded" in k} == {
        "B=8 k=256 padded": (8, 256, 256), "B=3 k=512 padded": (3, 512, 512)}
    a = cases["B=8 k=256 padded"]
    lam = torch.linalg.eigvalsh(a)
    assert torch.equal(a, a.transpose(-2, -1)) and lam.min() > -1e-10  # symmetric PSD
    assert [int((lam[b] > 1e-9).sum()) for b in range(3)] == [255, 127, 63]  # sizes 256, 128, 64; rank size - 1


def test_the_selftest_source_is_served_inside_a_bundle(tmp_path):
    """available() hands the child its own source; in a tools/bundle.py bundle that comes from the importer."""
    sys.path.insert(0, str(ROOT / "tools"))
    import bundle
    out = tmp_path / "exp10.py"
    out.write_text(bundle.bundle(ROOT / "exp10_periodic_ses.py"))
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('b', sys.argv[1]); "
            "b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b); "
            "from ses_solvers import cusolver_batched as c; name = 'ses_solvers.cusolver_batched'; "
            "print(c.__loader__.get_source(name) == b._BUNDLED_SOURCES[name])")
    p = subprocess.run([sys.executable, "-c", code, str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.stdout.strip() == "True", p.stderr[-2000:]


# ----------------------------------------------------------------------------- the call, by its contract
@pytest.fixture
def fake_cuda(monkeypatch):
    """(devices, lock, make(xsyev) -> fake library installed): cusolver_batched runs on the CPU stand-ins."""
    devices, lock = FakeDevices(), RecordingLock()
    monkeypatch.setattr(cusolver_batched, "_handles", {})
    monkeypatch.setattr(cusolver_batched, "_host_bytes", {})
    monkeypatch.setattr(cusolver_batched, "_lock", lock)
    for name in ("device", "current_device", "current_stream"):
        monkeypatch.setattr(torch.cuda, name, getattr(devices, name))
    monkeypatch.setattr(cusolver_batched, "_event_after_launch", lambda: types.SimpleNamespace(query=lambda: True))

    def make(xsyev=True):
        fake = (FakeCusolver if xsyev else OldFakeCusolver)(devices, lock)
        monkeypatch.setattr(cusolver_batched, "library", lambda device=None: fake)
        return fake
    return devices, lock, make


def _sym(batch, k, dtype=torch.float64):
    x = torch.randn(batch, k, 10, dtype=torch.float64)
    return (x @ x.transpose(-2, -1) + torch.diag_embed(torch.arange(float(k), dtype=torch.float64))).to(dtype)  # distinct eigenvalues


@pytest.mark.parametrize("xsyev", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eigh_batched_passes_cusolver_the_right_arguments_and_reads_its_layout(fake_cuda, xsyev, dtype):
    fake = fake_cuda[2](xsyev)
    a = _sym(3, 24)
    a[:, 5, 0] += 100.0  # junk where uplo = lower does not look: column-major upper = row-major lower
    w, v, info = cusolver_batched.eigh_batched(a.to(dtype))
    sym = torch.triu(a) + torch.triu(a, 1).transpose(-2, -1)
    assert fake.called[0][0] == ("XsyevBatched" if xsyev else ("SsyevjBatched" if dtype == torch.float32 else "DsyevjBatched"))
    assert w.dtype == v.dtype == dtype and info.tolist() == [0, 0, 0]
    tol = 1e-3 if dtype == torch.float32 else 1e-9
    assert torch.allclose(w.double(), torch.linalg.eigvalsh(sym), atol=tol * sym.abs().max().item())
    # v[b, :, i] is the i-th eigenvector: A v = v diag(w)
    assert torch.allclose((sym @ v.double()), v.double() * w.double().unsqueeze(-2), atol=tol * sym.abs().max().item())
    with torch.cuda.device(a.device):  # the stand-in's tensors live on the CPU
        assert cusolver_batched.host_workspace_bytes(a.device) == (fake.sizes[1] if xsyev else None)


@pytest.mark.parametrize("xsyev", [True, False])
def test_every_call_runs_on_the_tensors_device_and_stream_under_one_lock(fake_cuda, xsyev):
    """Another device is current (cuda:7); every call, handle creation, bufferSize and solve, must see the
    tensor's device current, the stream must be that device's, and SetStream..solve one lock acquisition."""
    devices, lock, make = fake_cuda
    fake = make(xsyev)
    a = _sym(2, 8)
    for _ in range(2):  # the second call reuses the handle
        cusolver_batched.eigh_batched(a)
    assert {dev for _, dev, _ in fake.log} == {str(a.device)} and devices.current == "cuda:7"
    assert devices.streams == [(str(a.device), str(a.device))] * 2 and fake.stream == 4242
    names = [name for name, _, _ in fake.log]
    assert names.count("SetStream") == 2 and names.count("solve") == 2
    for first in (i for i, n in enumerate(names) if n == "SetStream"):
        section = fake.log[first:names.index("solve", first) + 1]  # SetStream, bufferSize..., solve
        assert len({held for _, _, held in section}) == 1 and section[0][2] is not None


def test_eigh_batched_makes_one_copy_of_the_stack_whatever_dtype_it_solves_in(fake_cuda):
    fake_cuda[2](True)
    a = _sym(4, 16, torch.float32)

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.clone, torch.ops.aten.copy_) \
                    and tuple(args[0].shape) == (4, 16, 16):
                self.ops.append(func.overloadpacket.__name__)
            return out
    for dtype in (torch.float32, torch.float64):
        with Copies() as mode:
            w, v, info = cusolver_batched.eigh_batched(a, dtype)
        assert len(mode.ops) == 1 and v.dtype == dtype and a.dtype == torch.float32, mode.ops


class HostReads(TorchDispatchMode):
    """Records every op that reads a tensor's value on the host (item(), bool(), torch's own `info` check)
    or copies to the CPU by name (`.to("cpu", ...)`, a non-blocking or pinned copy). On a CPU a copy of a
    CPU tensor to the CPU is no op at all, and torch's CPU eigvalsh checks `info` inside its kernel, so
    only what a route's own code asks for is seen."""
    READS = ("_local_scalar_dense", "is_nonzero", "equal", "_linalg_check_errors", "_pin_memory")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in self.READS or (name == "_to_copy" and (str(kwargs.get("device")) == "cpu" or kwargs.get("non_blocking"))):
            self.seen.append(name)
        return func(*args, **kwargs)


class PendingEvent:
    """A CUDA event stand-in whose work is done only when the test says so."""

    def __init__(self):
        self.done = False

    def query(self) -> bool:
        return self.done


def test_an_outgrown_host_workspace_lives_until_the_work_queued_with_it_is_done(fake_cuda, monkeypatch):
    """XsyevBatched's host workspace grows with the stack (the stand-in asks for 16 + B bytes): the
    outgrown buffer is not freed while an event recorded after its last call is pending, and is freed
    at the first call after that event completes."""
    fake_cuda[2](True)
    events = []
    monkeypatch.setattr(cusolver_batched, "_event_after_launch", lambda: events.append(PendingEvent()) or events[-1])
    cusolver_batched.eigh_batched(_sym(2, 8))
    (workspace,) = [h[3] for h in cusolver_batched._handles.values()]
    old = weakref.ref(workspace.buffer)
    assert len(old()) == 16 + 2 and len(events) == 1
    cusolver_batched.eigh_batched(_sym(5, 8))  # needs 21 bytes: a new buffer; the old one's call may still run
    gc.collect()
    assert len(workspace.buffer) == 16 + 5 and old() is not None
    cusolver_batched.eigh_batched(_sym(5, 8))  # still pending: kept
    gc.collect()
    assert old() is not None
    events[0].done = True
    cusolver_batched.eigh_batched(_sym(5, 8))
    gc.collect()
    assert old() is None and workspace.retired == []


def test_the_batched_route_reads_nothing_on_the_host(fake_cuda, monkeypatch):
    """forward + backward of "batched32" through the real binding (cuSOLVER stood in for): no host read, no
    copy to the CPU. The detector itself catches the "host" route and a route that reads `info` with .item()."""
    from ses_solvers import routes
    from ses_core import _centred_gram, entropy_of_spectrum
    fake_cuda[2](True)
    grams = [_centred_gram(torch.randn(32, d)) for d in (8, 16, 16, 24)]
    with HostReads() as mode:
        hs = routes.forward_backward(grams, "batched32", entropy_of_spectrum)
    assert mode.seen == [] and all(torch.isfinite(h) for h in hs)
    with HostReads() as mode:
        routes.forward_backward(grams, "host", entropy_of_spectrum)
    assert "_to_copy" in mode.seen
    real = cusolver_batched.eigh_batched

    def reads_info(a, dtype=None):
        w, v, info = real(a, dtype)
        assert not info.any().item()  # the host read a route must not make
        return w, v, info
    monkeypatch.setattr(cusolver_batched, "eigh_batched", reads_info)
    with HostReads() as mode:
        routes.forward_backward(grams, "batched32", entropy_of_spectrum)
    assert "_local_scalar_dense" in mode.seen


# ----------------------------------------------------------------------------- on a GPU
@cuda
def test_cuda_eigh_batched_solves_on_every_device_whatever_device_is_current():
    """Each device solved while the next one is current. With one GPU the device and the current one
    are the same: that case says nothing about the guard, so it is skipped."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs: with one, the tensor's device is always the current one")
    x = torch.randn(8, 256, 200, dtype=torch.float64)
    a = x @ x.transpose(-2, -1) / 200
    ref = torch.linalg.eigvalsh(a)
    n = torch.cuda.device_count()
    for i in range(n):
        with torch.cuda.device((i + 1) % n):
            for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
                w, v, info = cusolver_batched.eigh_batched(a.to(f"cuda:{i}"), dtype)
                assert w.device == torch.device("cuda", i) and not info.any().item()
                assert ((w.double().cpu() - ref).abs().max() / ref.abs().max()).item() < tol


@cuda
def test_cuda_available_at_the_real_shape():
    """The child selftest at ResNet-18 `all`'s stack (the other real shapes: bench/gpu_probes.py selftest)."""
    assert cusolver_batched.available(torch.device("cuda", 0), (8, 256)) == ""


@cuda
def test_cuda_eigh_batched_runs_on_the_current_side_stream():
    """The stack is written on a side stream behind a long sleep and solved there: a call on any other
    stream would read it before it is written."""
    x = torch.randn(8, 256, 200, dtype=torch.float64)
    a = x @ x.transpose(-2, -1) / 200
    ref = torch.linalg.eigvalsh(a)
    side = torch.cuda.Stream()
    host = a.float().pin_memory()
    with torch.cuda.stream(side):
        dev = torch.zeros(8, 256, 256, device="cuda")
        torch.cuda._sleep(200_000_000)  # ~0.1 s or more of GPU clock before the stack is written
        dev.copy_(host, non_blocking=True)
        w, v, info = cusolver_batched.eigh_batched(dev)
    side.synchronize()
    assert not info.any().item()
    assert ((w.double().cpu() - ref).abs().max() / ref.abs().max()).item() < 1e-4
