"""One batched cuSOLVER eigensolve for a (B, k, k) stack of symmetric matrices, called directly.

What torch does with a batched eigh / eigvalsh on CUDA depends on its version:
    torch >= 2.12   every batched input goes to one cusolverDnXsyevBatched call (PR 175403)
    torch <= 2.11   for 33 <= k <= 512 a loop of single-matrix syevj (float32) / syevd (float64)
                    calls over the batch; only k <= 32 is batched
and either way torch reads the per-matrix convergence flags `info` on the host after the call.
This module hands the whole stack to cuSOLVER in one call, through ctypes into the libcusolver that
torch has loaded (no compiler, no extra package), and leaves `info` on the device:
    cusolverDnXsyevBatched        cuSOLVER >= 11.7.1 (CUDA 12.6.2+); the cuSOLVER docs do not name its
                                  algorithm (its default mode "may switch between algorithms")
    cusolverDn{S,D}syevjBatched   older cuSOLVER: Jacobi to machine precision (default tolerance); called
                                  at any k: cusolverDn.h and its documentation set no size limit on it
                                  (the n <= 32 limit is gesvdjBatched's); its speed at k = 64-512 is not
                                  yet measured
So on torch <= 2.11 it replaces a loop of B calls; on torch >= 2.12 it differs from eigvalsh only by
that host read of `info`.

Every cuSOLVER call (bufferSize and solve) runs under a device guard for the tensor's device, on that
device's current torch stream, with the device workspace taken from torch's caching allocator
(stream-ordered, so freeing it after the launch is safe). One lock is held from cusolverDnSetStream
to the end of the launch, so a second thread never re-points the shared per-device handle in between.
Host syncs: none in this module; `info` stays on the device, and a matrix whose solve failed gets NaN
eigenvalues in ses_solvers (the NaN reaches the loss, whose non-finite check then stops the run).
cuSOLVER itself may work on the host: when XsyevBatched_bufferSize asks for host workspace
(workspaceInBytesOnHost > 0) the call can do host work, and its docs do not say whether that work is
over when the call returns; a host workspace is therefore freed only after an event recorded behind
every call that used it has completed (_HostWorkspace).
`host_workspace_bytes(device)` says what the last call on a device asked for.

Limit: cuSOLVER's batched solvers take n * lda * batch <= INT32_MAX (here n = lda = k); a larger stack
raises ValueError before any call (`size_error` says why), and `available` reports it.

Shapes: eigh_batched(a, dtype): a (B, k, k) float32/float64 CUDA, symmetric -> w (B, k) ascending,
v (B, k, k) with v[b, :, i] the i-th eigenvector, info (B,) int32 (0 = solved), in `dtype` (default
a's), from one copy of `a`. cuSOLVER is column-major: it overwrites that copy with V column by
column, which read row-major is V^T.

Not yet run on a GPU: use it only through `available(device, shape)`, which runs `selftest()` once per
device and stack shape in a child process on that device (a wrong binding could crash the process
rather than raise) and says why not if it fails: before a sweep's first run (ses_solvers.decision) or
in --preflight and the benchmark, never inside a training run. --preflight's comparison of the routes
(routes.compare_routes) also checks its eigenvalues against float64 LAPACK on the real matrices.
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
INT32_MAX = 2 ** 31 - 1
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
_lock = threading.RLock()  # one lock for the library, the handles and every SetStream..launch section
_lib = None
_handles: dict = {}       # device index -> (handle, params, syevj_info, _HostWorkspace)
_host_bytes: dict = {}    # device index -> workspaceInBytesOnHost of the last XsyevBatched call there
_probed: dict = {}        # (device index, (B, k) or None) -> "" (usable) or why not


class CusolverError(RuntimeError):
    pass


def _mapped() -> str | None:
    try:
        with open("/proc/self/maps") as f:
            paths = [line.split()[-1] for line in f if "/libcusolver.so" in line]
        return paths[0] if paths else None
    except OSError:
        return None


def find_library(device: torch.device | None = None) -> str:
    """Path of the libcusolver torch uses (it maps it lazily, on its first CUDA linalg call: this
    probes with one on `device`, default the current one), else the CUDA wheel's."""
    path = _mapped()
    if path is None and torch.cuda.is_available():
        torch.linalg.eigvalsh(torch.eye(2, device=device if device is not None else "cuda"))
        path = _mapped()
    if path:
        return path
    for root in (os.path.join(p, "nvidia") for p in sys.path if p):
        hits = sorted(glob.glob(os.path.join(root, "*", "lib", "libcusolver.so*")))
        if hits:
            return hits[-1]
    raise CusolverError("libcusolver not found (neither mapped by torch nor in an nvidia/*/lib wheel folder)")


def library(device: torch.device | None = None):
    """The loaded libcusolver with argument types set (`device`: where find_library probes, once)."""
    global _lib
    with _lock:
        if _lib is None:
            lib = ctypes.CDLL(find_library(device))
            for name, argtypes in _SIGNATURES.items():
                fn = getattr(lib, name, None)  # XsyevBatched is missing before cuSOLVER 11.7.1
                if fn is not None:
                    fn.argtypes, fn.restype = argtypes, ctypes.c_int
            _lib = lib
        return _lib


def has_xsyev_batched() -> bool:
    return hasattr(library(), "cusolverDnXsyevBatched")


def torch_batches_eigh(version: str = torch.__version__) -> bool:
    """Whether this torch sends a batched CUDA eigh/eigvalsh to one cusolverDnXsyevBatched call (>= 2.12)."""
    major, minor = (int(x) for x in version.split("+")[0].split(".")[:2])
    return (major, minor) >= (2, 12)


def size_error(batch: int, k: int) -> str:
    """'' if a (batch, k, k) stack is within cuSOLVER's n * lda * batch <= INT32_MAX, else why not."""
    if k * k * batch <= INT32_MAX:
        return ""
    return (f"a ({batch}, {k}, {k}) stack exceeds cuSOLVER's batched limit n*lda*batch <= INT32_MAX "
            f"({k * k * batch} > {INT32_MAX}); solve it in smaller stacks")


def host_workspace_bytes(device: torch.device) -> int | None:
    """workspaceInBytesOnHost of the last XsyevBatched call on `device` (None: none made there yet,
    or the syevjBatched branch, which takes no host workspace). > 0 means cuSOLVER may work on the host."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _host_bytes.get(index)


def _check(status: int, what: str) -> None:
    if status != 0:
        raise CusolverError(f"{what} returned cusolverStatus {status}")


def _handle(index) -> tuple:
    with _lock:
        if index not in _handles:
            lib = library()
            handle, params, info = _P(), _P(), _P()
            with torch.cuda.device(index):  # a handle belongs to the device current at its creation
                _check(lib.cusolverDnCreate(ctypes.byref(handle)), "cusolverDnCreate")
                _check(lib.cusolverDnCreateParams(ctypes.byref(params)), "cusolverDnCreateParams")
                _check(lib.cusolverDnCreateSyevjInfo(ctypes.byref(info)), "cusolverDnCreateSyevjInfo")
            _handles[index] = (handle, params, info, _HostWorkspace())
        return _handles[index]


class _HostWorkspace:
    """One device's host workspace for XsyevBatched, grown as calls ask for more. cuSOLVER's docs do not
    say that the host work of a call is over when the call returns (it may run later, in stream order),
    so a buffer that is outgrown is kept, not freed, until an event recorded after the last call that used
    it, on each stream that call ran on, has completed; retired buffers are checked (event.query(), no
    wait) at every call and dropped once done."""

    def __init__(self):
        self.buffer = ctypes.create_string_buffer(1)
        self.uses: dict = {}     # stream -> event recorded after the last call that used self.buffer there
        self.retired: list = []  # (events, buffer) of outgrown buffers whose work may still run

    def get(self, nbytes: int):
        self.retired = [(events, buf) for events, buf in self.retired if not all(e.query() for e in events)]
        if nbytes > len(self.buffer):
            self.retired.append((list(self.uses.values()), self.buffer))
            self.buffer, self.uses = ctypes.create_string_buffer(nbytes), {}
        return self.buffer

    def used(self, stream: int) -> None:
        """Record, on the current stream, the end of the call just launched with self.buffer."""
        self.uses[stream] = _event_after_launch()


def _event_after_launch():
    event = torch.cuda.Event()
    event.record()  # the current stream: the one the call was launched on
    return event


def eigh_batched(a: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w, v, info) of a symmetric (B, k, k) CUDA stack in one cuSOLVER call, solved in `dtype`
    (float32/float64, default a's) on a's device and current stream; no host sync here."""
    dtype = dtype or a.dtype
    if a.dim() != 3 or a.shape[-1] != a.shape[-2] or dtype not in (torch.float32, torch.float64):
        raise ValueError(f"eigh_batched takes a (B, k, k) float32/float64 stack, got {tuple(a.shape)} {dtype}")
    batch, k = a.shape[0], a.shape[-1]
    why = size_error(batch, k)
    if why:
        raise ValueError(why)
    lib = library(a.device)
    with torch.cuda.device(a.device):
        index = a.device.index if a.device.index is not None else torch.cuda.current_device()
        # the one copy: overwritten with V, column-major (row-major: V^T)
        vt = a.detach().to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
        w = torch.empty(batch, k, dtype=dtype, device=a.device)
        info = torch.zeros(batch, dtype=torch.int32, device=a.device)
        A, W, INFO = _P(vt.data_ptr()), _P(w.data_ptr()), _P(info.data_ptr())
        with _lock:  # from SetStream to the end of the launch: no other thread re-points the handle
            handle, params, syevj, host_ws = _handle(index)
            stream = torch.cuda.current_stream(a.device).cuda_stream
            _check(lib.cusolverDnSetStream(handle, _P(stream)), "cusolverDnSetStream")
            if hasattr(lib, "cusolverDnXsyevBatched"):
                _xsyev(lib, handle, params, host_ws, index, dtype, A, W, INFO, k, batch, a.device, stream)
            else:
                _syevj(lib, handle, syevj, dtype, A, W, INFO, k, batch, a.device)
    return w, vt.transpose(-2, -1), info


def _xsyev(lib, handle, params, host_ws, index, dtype, A, W, INFO, k, batch, device, stream) -> None:
    dt = _CUDA_R_32F if dtype == torch.float32 else _CUDA_R_64F
    dev_bytes, host_bytes = _SZ(), _SZ()
    _check(lib.cusolverDnXsyevBatched_bufferSize(handle, params, _EIG_MODE_VECTOR, _FILL_LOWER, k, dt, A, k, dt, W,
                                                 dt, ctypes.byref(dev_bytes), ctypes.byref(host_bytes), batch),
           "cusolverDnXsyevBatched_bufferSize")
    _host_bytes[index] = host_bytes.value
    work = torch.empty(max(dev_bytes.value, 1), dtype=torch.uint8, device=device)
    host = host_ws.get(host_bytes.value)
    _check(lib.cusolverDnXsyevBatched(handle, params, _EIG_MODE_VECTOR, _FILL_LOWER, k, dt, A, k, dt, W, dt,
                                      _P(work.data_ptr()), dev_bytes.value, ctypes.cast(host, _P),
                                      host_bytes.value, INFO, batch), "cusolverDnXsyevBatched")
    if host_bytes.value:
        host_ws.used(stream)


def _syevj(lib, handle, syevj, dtype, A, W, INFO, k, batch, device) -> None:
    prefix = "cusolverDnS" if dtype == torch.float32 else "cusolverDnD"
    lwork = _I()
    _check(getattr(lib, prefix + "syevjBatched_bufferSize")(handle, _EIG_MODE_VECTOR, _FILL_LOWER, k, A, k, W,
                                                            ctypes.byref(lwork), syevj, batch),
           prefix + "syevjBatched_bufferSize")
    work = torch.empty(max(lwork.value, 1), dtype=dtype, device=device)
    _check(getattr(lib, prefix + "syevjBatched")(handle, _EIG_MODE_VECTOR, _FILL_LOWER, k, A, k, W,
                                                 _P(work.data_ptr()), lwork.value, INFO, syevj, batch),
           prefix + "syevjBatched")


def _cases(shapes, g) -> list:
    """(label, (B, k, k) float64 PSD stack): generic random / rank-deficient stacks, and per (B, k) of
    `shapes` a stack shaped like SES's padded one (matrix b of size k >> (b % 3), rank <= size - 1, zero-padded)."""
    out = []
    for k, rank in ((64, 64), (256, 40), (40, 3)):
        x = torch.randn(5, k, rank, generator=g, dtype=torch.float64)
        a = x @ x.transpose(-2, -1) / rank
        out.append((f"B=5 k={k} rank={rank}", (a + a.transpose(-2, -1)) / 2))  # symmetric to the last bit
    for batch, k in shapes:
        a = torch.zeros(batch, k, k, dtype=torch.float64)
        for b in range(batch):
            size = max(k >> (b % 3), 2)
            x = torch.randn(size, size - 1, generator=g, dtype=torch.float64)
            a[b, :size, :size] = x @ x.T / size
        out.append((f"B={batch} k={k} padded", (a + a.transpose(-2, -1)) / 2))
    return out


def selftest(device: str | None = None, shapes=()) -> list[dict]:
    """Raise unless eigh_batched matches float64 LAPACK on `device` (default: the current GPU; made
    the current device) for the generic stacks and for a padded-like stack of each (B, k) in `shapes`;
    per case, the errors found."""
    dev = torch.device(device or "cuda")
    dev = dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(dev)
    g = torch.Generator().manual_seed(0)
    report = []
    for label, a in _cases(shapes, g):
        why = size_error(a.shape[0], a.shape[-1])
        if why:
            raise CusolverError(f"selftest {label}: {why}")
        ref = torch.linalg.eigvalsh(a)
        scale = ref.abs().amax(-1, keepdim=True)
        for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
            w, v, info = eigh_batched(a.to(dev), dtype)
            err = ((w.double().cpu() - ref).abs() / scale).max().item()
            rec = ((v @ torch.diag_embed(w) @ v.transpose(-2, -1)).double().cpu() - a).abs().max().item() / scale.max().item()
            report.append(dict(case=label, dtype=str(dtype).split(".")[-1], eigenvalue_error=err, reconstruction_error=rec,
                               host_workspace_bytes=host_workspace_bytes(dev)))
            if info.any().item() or not err < tol or not rec < 10 * tol:
                raise CusolverError(f"selftest {dtype} {label}: info {info.tolist()}, eigenvalue error {err:.2e}, "
                                    f"reconstruction error {rec:.2e} (tolerance {tol:g})")
    return report


def available(device: torch.device, shape: tuple[int, int] | None = None) -> str:
    """'' if the batched route works on this CUDA device (for a (B, k, k) stack when `shape` = (B, k)
    is given), else why not. Never raises. The selftest runs in a child process on that device, once
    per device and shape; the size limit is checked here first."""
    if device.type != "cuda":
        return "not a CUDA device"
    if shape is not None and size_error(*shape):
        return size_error(*shape)
    key = None
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = (index, tuple(shape) if shape is not None else None)
        if key not in _probed:
            library(torch.device("cuda", index))
            source = __loader__.get_source(__name__)  # also inside a tools/bundle.py bundle
            extra = ["--shape", f"{shape[0]}x{shape[1]}"] if shape is not None else []
            child = subprocess.run([sys.executable, "-c", source, "--selftest", f"cuda:{index}", *extra],
                                   capture_output=True, text=True, timeout=300)
            lines = (child.stdout + child.stderr).strip().splitlines()
            _probed[key] = "" if child.returncode == 0 else \
                f"selftest exited {child.returncode}: {lines[-1] if lines else 'no output'}"
        return _probed[key]
    except (OSError, RuntimeError, ValueError, ImportError, AttributeError, TypeError, subprocess.SubprocessError) as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"  # a CusolverError is a RuntimeError
        if key is not None:
            _probed[key] = why
        return why


if __name__ == "__main__" and sys.argv[1:2] == ["--selftest"]:
    _args = sys.argv[2:]  # [cuda:N] [--shape BxK]
    _dev = _args[0] if _args and not _args[0].startswith("--") else None
    _shapes = [tuple(map(int, _args[_args.index("--shape") + 1].split("x")))] if "--shape" in _args else []
    selftest(_dev, _shapes)
    _dev = _dev or f"cuda:{torch.cuda.current_device()}"
    print(f"cusolver_batched selftest passed on {_dev} ({'XsyevBatched' if has_xsyev_batched() else 'syevjBatched'}; "
          f"host workspace {host_workspace_bytes(torch.device(_dev))} bytes)")
