"""The exact solver routes of ses_solvers (padding, the one-call routes, the auto comparison) and what
of cusolver_batched a CPU can check: the library and its bindings load, the child-process selftest
reports why it cannot run instead of raising. The cuSOLVER call itself needs a GPU; here it is
emulated by its contract (the `cpu_cusolver` fixture of test_ses_core)."""
import contextlib
import ctypes
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import cusolver_batched
import ses_solvers
from ses_core import _centred_gram, spectral_entropies
from test_ses_core import random_acts, reference_entropy

ROOT = Path(__file__).resolve().parents[1]
R18_DIMS = [64, 64, 128, 128, 256, 256, 512, 512]  # ResNet-18 `all` at n = 256, avgpool = layer4.1


def test_padded_routes_solve_every_layer_in_one_call(monkeypatch, cpu_cusolver):
    acts = [torch.randn(256, d) for d in R18_DIMS]
    calls = []
    real = torch.linalg.eigvalsh
    monkeypatch.setattr(torch.linalg, "eigvalsh", lambda g: calls.append(tuple(g.shape)) or real(g))
    per_size = spectral_entropies(acts, "float64")
    assert calls == [(2, 64, 64), (2, 128, 128), (4, 256, 256)]
    calls.clear()
    padded = spectral_entropies(acts, "padded")
    assert calls == [(8, 256, 256)]
    batched = spectral_entropies(acts, "batched32")
    assert cpu_cusolver == [(8, 256, 256)]
    for a, b, c in zip(per_size, padded, batched):
        assert a.item() == pytest.approx(b.item(), abs=1e-5) and a.item() == pytest.approx(c.item(), abs=1e-4)


@pytest.mark.parametrize("solver", ["padded", "batched32", "batched64"])
def test_padding_is_exact_for_rank_deficient_layers_in_value_and_gradient(solver, cpu_cusolver):
    """Dead features (zero columns) give the small matrices zero eigenvalues of their own besides the
    padding's; H and the gradient w.r.t. the activations still equal the unpadded float64 route."""
    arrays = [random_acts(64, 16, 1.0, seed=1), random_acts(64, 48, 1.0, seed=2), random_acts(64, 128, 1.0, seed=3)]
    arrays[0][:, :5] = 0.0
    arrays[1][:, 10:30] = 0.0
    acts = [torch.from_numpy(a).requires_grad_(True) for a in arrays]
    hs = spectral_entropies(acts, solver)
    for h, a in zip(hs, arrays):
        assert h.item() == pytest.approx(reference_entropy(a), abs=2e-4)
    (torch.stack(hs) ** 2).sum().backward()
    ref = [torch.from_numpy(a).double().requires_grad_(True) for a in arrays]
    (torch.stack(spectral_entropies(ref, "float64")) ** 2).sum().backward()
    for a, b in zip(acts, ref):
        assert torch.isfinite(a.grad).all()
        assert torch.allclose(a.grad.double(), b.grad, atol=1e-4, rtol=1e-3)


def test_a_failed_batched_solve_gives_nan_for_that_layer_only(monkeypatch):
    def eigh_batched(a):
        w, v = torch.linalg.eigh(a)
        return w, v, torch.tensor([0, 3, 0], dtype=torch.int32)  # matrix 1 did not converge
    monkeypatch.setattr(cusolver_batched, "eigh_batched", eigh_batched)
    hs = spectral_entropies([torch.randn(32, d) for d in (8, 16, 24)], "batched64")
    assert torch.isfinite(hs[0]) and torch.isnan(hs[1]) and torch.isfinite(hs[2])


def test_compare_routes_keeps_agreeing_routes_and_says_why_it_left_the_others_out(monkeypatch, cpu_cusolver):
    grams = [_centred_gram(torch.randn(64, d)) for d in (16, 64, 128)]
    real = ses_solvers.eigvals_psd

    def eigvals_psd(gram, solver="float32"):
        lam = real(gram, solver)
        if solver == "float32":  # a wrong route: its largest eigenvalue doubled
            lam = torch.cat([lam[..., :-1], 2 * lam[..., -1:]], -1)
        if solver == "batched64":
            raise cusolver_batched.CusolverError("cusolverDnXsyevBatched returned cusolverStatus 7")
        return lam
    monkeypatch.setattr(ses_solvers, "eigvals_psd", eigvals_psd)
    monkeypatch.setattr(cusolver_batched, "available", lambda device: "")
    with torch.no_grad():  # as SES calls it
        timings, rejected = ses_solvers.compare_routes(grams, ses_solvers.SOLVERS[1:], repeats=1)
    assert set(timings) == {"float64", "host", "padded", "batched32"} and all(t > 0 for t in timings.values())
    assert rejected["float32"].startswith("H differs from float64 LAPACK by")
    assert rejected["batched64"] == "CusolverError: cusolverDnXsyevBatched returned cusolverStatus 7"


def test_unavailable_batched_routes_are_left_out_with_the_reason(monkeypatch):
    grams = [_centred_gram(torch.randn(32, 8))]
    monkeypatch.setattr(cusolver_batched, "available", lambda device: "selftest exited 1: boom")
    timings, rejected = ses_solvers.compare_routes(grams, ["float64", "batched32"], repeats=1)
    assert set(timings) == {"float64"} and rejected == {"batched32": "selftest exited 1: boom"}


# ----------------------------------------------------------------------------- cusolver_batched on a CPU
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


def test_eigh_batched_rejects_what_it_cannot_solve():
    with pytest.raises(ValueError, match=r"\(B, k, k\) float32/float64"):
        cusolver_batched.eigh_batched(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="float32/float64"):
        cusolver_batched.eigh_batched(torch.zeros(2, 4, 4, dtype=torch.float16))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_available_says_why_not_without_a_gpu_and_never_raises(monkeypatch):
    assert cusolver_batched.available(torch.device("cpu")) == "not a CUDA device"
    monkeypatch.setattr(cusolver_batched, "_probed", {})
    why = cusolver_batched.available(torch.device("cuda", 0))  # runs the selftest in a child process
    assert why.startswith("selftest exited 1: ") and "Traceback" not in why
    assert cusolver_batched._probed == {0: why}  # asked once per device


def test_the_selftest_source_is_served_inside_a_bundle(tmp_path):
    """available() hands the child its own source; in a tools/bundle.py bundle that comes from the importer."""
    sys.path.insert(0, str(ROOT / "tools"))
    import bundle
    out = tmp_path / "exp10.py"
    out.write_text(bundle.bundle(ROOT / "exp10_periodic_ses.py"))
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('b', sys.argv[1]); "
            "b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b); import cusolver_batched as c; "
            "print(c.__loader__.get_source('cusolver_batched') == b._BUNDLED_SOURCES['cusolver_batched'])")
    p = subprocess.run([sys.executable, "-c", code, str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.stdout.strip() == "True", p.stderr[-2000:]


class FakeCusolver:
    """cuSOLVER's documented contract on host memory: column-major stacks (A_k(i, j) = A[i + lda*j + lda*n*k]),
    only the lower triangle read, A overwritten with the eigenvectors by column, W ascending, info per matrix.
    Lets eigh_batched's argument order, dtype codes and layout be checked on a CPU."""

    def __init__(self):
        self.called = []

    @staticmethod
    def _out(ref, value):
        ref._obj.value = value
        return 0

    def cusolverDnCreate(self, ref):
        return self._out(ref, 1)

    cusolverDnCreateParams = cusolverDnCreateSyevjInfo = cusolverDnCreate

    def cusolverDnSetStream(self, handle, stream):
        return 0

    @staticmethod
    def _solve(dtype, n, A, lda, W, info, batch):
        ctype = ctypes.c_float if dtype == np.float32 else ctypes.c_double
        a = np.ctypeslib.as_array(ctypes.cast(A.value, ctypes.POINTER(ctype)), shape=(batch, n, lda))
        w = np.ctypeslib.as_array(ctypes.cast(W.value, ctypes.POINTER(ctype)), shape=(batch, n))
        status = np.ctypeslib.as_array(ctypes.cast(info.value, ctypes.POINTER(ctypes.c_int)), shape=(batch,))
        for k in range(batch):
            m = a[k, :, :n].T.astype(np.float64)       # a[k, j, i] = A_k(i, j)
            m = np.tril(m) + np.tril(m, -1).T          # lower triangle only
            lam, vec = np.linalg.eigh(m)
            w[k], a[k, :, :n], status[k] = lam, vec.T, 0  # column j of V lies at a[k, j, :]
        return 0

    def cusolverDnXsyevBatched_bufferSize(self, h, p, jobz, uplo, n, ta, A, lda, tw, W, tc, dev, host, batch):
        assert (jobz, uplo, ta, tw, tc) == (1, 0, ta, ta, ta) and ta in (0, 1)
        return self._out(dev, 128) or self._out(host, 16)

    def cusolverDnXsyevBatched(self, h, p, jobz, uplo, n, ta, A, lda, tw, W, tc, work, dev_bytes, host, host_bytes,
                               info, batch):
        self.called.append(("XsyevBatched", ta, n, batch, dev_bytes, host_bytes))
        return self._solve(np.float32 if ta == 0 else np.float64, n, A, lda, W, info, batch)

    def _syevj_size(self, h, jobz, uplo, n, A, lda, W, lwork, params, batch):
        return self._out(lwork, 7)

    cusolverDnSsyevjBatched_bufferSize = cusolverDnDsyevjBatched_bufferSize = _syevj_size

    def cusolverDnSsyevjBatched(self, h, jobz, uplo, n, A, lda, W, work, lwork, info, params, batch):
        self.called.append(("SsyevjBatched", n, batch, lwork))
        return self._solve(np.float32, n, A, lda, W, info, batch)

    def cusolverDnDsyevjBatched(self, h, jobz, uplo, n, A, lda, W, work, lwork, info, params, batch):
        self.called.append(("DsyevjBatched", n, batch, lwork))
        return self._solve(np.float64, n, A, lda, W, info, batch)


class OldFakeCusolver(FakeCusolver):
    @property
    def cusolverDnXsyevBatched(self):  # cuSOLVER before 11.7.1 has no XsyevBatched
        raise AttributeError("cusolverDnXsyevBatched")


@pytest.mark.parametrize("xsyev", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eigh_batched_passes_cusolver_the_right_arguments_and_reads_its_layout(monkeypatch, xsyev, dtype):
    fake = FakeCusolver() if xsyev else OldFakeCusolver()
    monkeypatch.setattr(cusolver_batched, "library", lambda: fake)
    monkeypatch.setattr(cusolver_batched, "_handles", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
    x = torch.randn(3, 24, 10, dtype=torch.float64)
    a = x @ x.transpose(-2, -1) + torch.diag_embed(torch.arange(24.0, dtype=torch.float64))  # distinct eigenvalues
    a[:, 5, 0] += 100.0  # junk where uplo = lower does not look: column-major upper = row-major lower
    w, v, info = cusolver_batched.eigh_batched(a.to(dtype))
    sym = torch.triu(a) + torch.triu(a, 1).transpose(-2, -1)
    assert fake.called[0][0] == ("XsyevBatched" if xsyev else ("SsyevjBatched" if dtype == torch.float32 else "DsyevjBatched"))
    assert w.dtype == v.dtype == dtype and info.tolist() == [0, 0, 0]
    tol = 1e-3 if dtype == torch.float32 else 1e-9
    assert torch.allclose(w.double(), torch.linalg.eigvalsh(sym), atol=tol * sym.abs().max().item())
    # v[b, :, i] is the i-th eigenvector: A v = v diag(w)
    assert torch.allclose((sym @ v.double()), v.double() * w.double().unsqueeze(-2), atol=tol * sym.abs().max().item())


def test_ranks_agree_on_the_route_fastest_on_their_slowest_rank():
    per_rank = [{"float64": 1.0, "host": 2.0, "batched32": 0.1}, {"float64": 3.0, "host": 2.5}]
    assert ses_solvers.common_route(per_rank) == "host"  # batched32 is missing on rank 1
    assert ses_solvers.common_route([{}, {}]) is None and ses_solvers.common_route([]) is None


def test_ses_takes_the_agreed_route_under_several_processes(monkeypatch):
    import ses_core
    monkeypatch.setattr(ses_core, "pick_solver", lambda grams: ("float64", {"float64": 1.0, "host": 2.0}, {}))
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    ses = ses_core.SES(model, ["0", "2"], lam=0.1, beta=0.5)
    seen = []
    ses.agree = lambda timings: seen.append(timings) or [timings, {"float64": 3.0, "host": 2.5}]
    ses.begin_step()
    model(torch.randn(32, 8))
    ses.penalty().backward()
    assert ses.solver == "host" and seen == [{"float64": 1.0, "host": 2.0}]
