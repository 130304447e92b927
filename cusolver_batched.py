"""One batched cuSOLVER eigensolve for a (B, k, k) stack of symmetric matrices, called directly.

Why this exists: torch.linalg.eigh / eigvalsh on CUDA hands a batch to cuSOLVER's batched solvers
only for k <= 32 (pytorch issue 175585); for 33 <= k <= 512 it loops over the batch, one
syevj (float32) or syevd (float64) call per matrix, and reads the convergence flags on the host.
SES solves one matrix per hooked layer with k = 64-256, so its cost is that loop's latency. Here the
whole stack goes to cuSOLVER in one call, through ctypes into the libcusolver that torch has loaded
(no compiler, no extra package):
    cusolverDnXsyevBatched        cuSOLVER >= 11.7.1 (CUDA 12.6.2+): divide and conquer, as syevd
    cusolverDn{S,D}syevjBatched   older cuSOLVER: Jacobi to machine precision (default tolerance)
on torch's current stream, the device workspace taken from torch's caching allocator (stream-
ordered, so freeing it after the launch is safe). Nothing here waits for the host: the per-matrix
status `info` stays on the device, and a matrix whose solve failed gets NaN eigenvalues (the NaN
reaches the loss, whose non-finite check then stops the run).

Shapes: eigh_batched(a): a (B, k, k) float32/float64 CUDA, symmetric -> w (B, k) ascending,
v (B, k, k) with v[b, :, i] the i-th eigenvector, info (B,) int32 (0 = solved). cuSOLVER is
column-major: it overwrites the stack with V column by column, which read row-major is V^T.

Never run on a GPU when written (the sessions that built it had none): use it only through
`available()`, which runs `selftest()` once per device in a child process (a wrong binding could
crash the process rather than raise) and says why not if it fails. ses_solvers' "auto" then
checks its eigenvalues against float64 LAPACK on the real matrices before timing it.
"""
from __future__ import annotations

import ctypes
import glob
import os
import subprocess
import sys
import threading

import torch

_CUDA_R_32F, _CUDA_R_64F = 0, 1          # library_types.h
_EIG_MODE_VECTOR = 1                     # cusolver_common.h: CUSOLVER_EIG_MODE_VECTOR
_FILL_LOWER = 0                          # cublas_api.h: CUBLAS_FILL_MODE_LOWER (any triangle: symmetric)
_P, _I, _I64, _SZ = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_size_t
_SIGNATURES = {  # cusolverDn.h, CUDA 13.0
    "cusolverDnCreate": [ctypes.POINTER(_P)],
    "cusolverDnSetStream": [_P, _P],
    "cusolverDnCreateParams": [ctypes.POINTER(_P)],
    "cusolverDnCreateSyevjInfo": [ctypes.POINTER(_P)],
    "cusolverDnXsyevBatched_bufferSize": [_P, _P, _I, _I, _I64, _I, _P, _I64, _I, _P, _I,
                                          ctypes.POINTER(_SZ), ctypes.POINTER(_SZ), _I64],
    "cusolverDnXsyevBatched": [_P, _P, _I, _I, _I64, _I, _P, _I64, _I, _P, _I, _P, _SZ, _P, _SZ, _P, _I64],
    "cusolverDnSsyevjBatched_bufferSize": [_P, _I, _I, _I, _P, _I, _P, ctypes.POINTER(_I), _P, _I],
    "cusolverDnDsyevjBatched_bufferSize": [_P, _I, _I, _I, _P, _I, _P, ctypes.POINTER(_I), _P, _I],
    "cusolverDnSsyevjBatched": [_P, _I, _I, _I, _P, _I, _P, _P, _I, _P, _P, _I],
    "cusolverDnDsyevjBatched": [_P, _I, _I, _I, _P, _I, _P, _P, _I, _P, _P, _I],
}
_lock = threading.RLock()  # _handle() calls library() while holding it
_lib = None
_handles: dict[int, tuple] = {}          # device index -> (handle, params, syevj_info, host workspace)
_probed: dict[int, str] = {}             # device index -> "" (usable) or why not


class CusolverError(RuntimeError):
    pass


def _mapped() -> str | None:
    try:
        with open("/proc/self/maps") as f:
            paths = [line.split()[-1] for line in f if "/libcusolver.so" in line]
        return paths[0] if paths else None
    except OSError:
        return None


def find_library() -> str:
    """Path of the libcusolver torch uses (it maps it lazily, on its first CUDA linalg call), else the wheel's."""
    path = _mapped()
    if path is None and torch.cuda.is_available():
        torch.linalg.eigvalsh(torch.eye(2, device="cuda"))
        path = _mapped()
    if path:
        return path
    for root in (os.path.join(p, "nvidia") for p in sys.path if p):
        hits = sorted(glob.glob(os.path.join(root, "*", "lib", "libcusolver.so*")))
        if hits:
            return hits[-1]
    raise CusolverError("libcusolver not found (neither mapped by torch nor in an nvidia/*/lib wheel folder)")


def library():
    """The loaded libcusolver with argument types set; which batched entry points it has."""
    global _lib
    with _lock:
        if _lib is None:
            lib = ctypes.CDLL(find_library())
            for name, argtypes in _SIGNATURES.items():
                fn = getattr(lib, name, None)  # XsyevBatched is missing before cuSOLVER 11.7.1
                if fn is not None:
                    fn.argtypes, fn.restype = argtypes, ctypes.c_int
            _lib = lib
        return _lib


def has_xsyev_batched() -> bool:
    return hasattr(library(), "cusolverDnXsyevBatched")


def _check(status: int, what: str) -> None:
    if status != 0:
        raise CusolverError(f"{what} returned cusolverStatus {status}")


def _handle(device: torch.device) -> tuple:
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _lock:
        if index not in _handles:
            lib = library()
            handle, params, info = _P(), _P(), _P()
            with torch.cuda.device(index):  # a handle belongs to the device current at its creation
                _check(lib.cusolverDnCreate(ctypes.byref(handle)), "cusolverDnCreate")
                _check(lib.cusolverDnCreateParams(ctypes.byref(params)), "cusolverDnCreateParams")
                _check(lib.cusolverDnCreateSyevjInfo(ctypes.byref(info)), "cusolverDnCreateSyevjInfo")
            _handles[index] = (handle, params, info, [ctypes.create_string_buffer(1)])
        return _handles[index]


def eigh_batched(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w, v, info) of a symmetric (B, k, k) float32/float64 CUDA stack in one cuSOLVER call; no host sync."""
    if a.dim() != 3 or a.shape[-1] != a.shape[-2] or a.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"eigh_batched takes a (B, k, k) float32/float64 stack, got {tuple(a.shape)} {a.dtype}")
    lib = library()
    batch, k = a.shape[0], a.shape[-1]
    vt = a.detach().contiguous().clone()        # overwritten with V, column-major (row-major: V^T)
    w = torch.empty(batch, k, dtype=a.dtype, device=a.device)
    info = torch.zeros(batch, dtype=torch.int32, device=a.device)
    handle, params, syevj, host_ws = _handle(a.device)
    stream = torch.cuda.current_stream(a.device).cuda_stream
    _check(lib.cusolverDnSetStream(handle, _P(stream)), "cusolverDnSetStream")
    A, W, INFO = _P(vt.data_ptr()), _P(w.data_ptr()), _P(info.data_ptr())
    if hasattr(lib, "cusolverDnXsyevBatched"):
        dt = _CUDA_R_32F if a.dtype == torch.float32 else _CUDA_R_64F
        dev_bytes, host_bytes = _SZ(), _SZ()
        _check(lib.cusolverDnXsyevBatched_bufferSize(handle, params, _EIG_MODE_VECTOR, _FILL_LOWER, k, dt, A, k, dt, W,
                                                     dt, ctypes.byref(dev_bytes), ctypes.byref(host_bytes), batch),
               "cusolverDnXsyevBatched_bufferSize")
        work = torch.empty(max(dev_bytes.value, 1), dtype=torch.uint8, device=a.device)
        with _lock:  # one host workspace per device, grown as needed, kept alive for the handle's life
            if host_bytes.value > len(host_ws[0]):
                host_ws[0] = ctypes.create_string_buffer(host_bytes.value)
            _check(lib.cusolverDnXsyevBatched(handle, params, _EIG_MODE_VECTOR, _FILL_LOWER, k, dt, A, k, dt, W, dt,
                                              _P(work.data_ptr()), dev_bytes.value, ctypes.cast(host_ws[0], _P),
                                              host_bytes.value, INFO, batch), "cusolverDnXsyevBatched")
    else:
        prefix = "cusolverDnS" if a.dtype == torch.float32 else "cusolverDnD"
        lwork = _I()
        _check(getattr(lib, prefix + "syevjBatched_bufferSize")(handle, _EIG_MODE_VECTOR, _FILL_LOWER, k, A, k, W,
                                                                ctypes.byref(lwork), syevj, batch),
               prefix + "syevjBatched_bufferSize")
        work = torch.empty(max(lwork.value, 1), dtype=a.dtype, device=a.device)
        _check(getattr(lib, prefix + "syevjBatched")(handle, _EIG_MODE_VECTOR, _FILL_LOWER, k, A, k, W,
                                                     _P(work.data_ptr()), lwork.value, INFO, syevj, batch),
               prefix + "syevjBatched")
    return w, vt.transpose(-2, -1), info


def selftest(device: str = "cuda") -> None:
    """Raise unless eigh_batched matches float64 LAPACK on random and rank-deficient PSD stacks."""
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
        for k, rank in ((64, 64), (256, 40), (40, 3)):
            x = torch.randn(5, k, rank, generator=g, dtype=torch.float64)
            a = x @ x.transpose(-2, -1) / rank
            w, v, info = eigh_batched(a.to(dev, dtype))
            ref = torch.linalg.eigvalsh(a)
            scale = ref.abs().amax(-1, keepdim=True)
            err = ((w.double().cpu() - ref).abs() / scale).max().item()
            rec = ((v @ torch.diag_embed(w) @ v.transpose(-2, -1)).double().cpu() - a).abs().max().item() / scale.max().item()
            if info.any().item() or not err < tol or not rec < 10 * tol:
                raise CusolverError(f"selftest {dtype} k={k}: info {info.tolist()}, eigenvalue error {err:.2e}, "
                                    f"reconstruction error {rec:.2e} (tolerance {tol:g})")


def available(device: torch.device) -> str:
    """'' if the batched route works on this CUDA device, else why not (selftest in a child, once per device)."""
    if device.type != "cuda":
        return "not a CUDA device"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _probed:
        try:
            library()
            source = __loader__.get_source(__name__)  # also inside a tools/bundle.py bundle
            child = subprocess.run([sys.executable, "-c", source, "--selftest", f"cuda:{index}"],
                                   capture_output=True, text=True, timeout=300)
            lines = (child.stdout + child.stderr).strip().splitlines()
            _probed[index] = "" if child.returncode == 0 else \
                f"selftest exited {child.returncode}: {lines[-1] if lines else 'no output'}"
        except (OSError, CusolverError, subprocess.SubprocessError, AttributeError, TypeError) as e:
            _probed[index] = f"{type(e).__name__}: {e}"
    return _probed[index]


if __name__ == "__main__" and sys.argv[1:2] == ["--selftest"]:
    selftest(sys.argv[2] if len(sys.argv) > 2 else "cuda")
    print(f"cusolver_batched selftest passed ({'XsyevBatched' if has_xsyev_batched() else 'syevjBatched'})")
