"""CPU stand-ins for CUDA: a pretend machine's bookkeeping (PretendGPUs: an L40S or a T4), and for
what cusolver_batched calls on a GPU: the current-device and stream functions of torch.cuda, a lock
that reports what is held, and libcusolver's batched eigen-solvers by their documented contract on
host memory. Used by test_pretend_gpu and test_cusolver_batched."""
import contextlib
import ctypes
import os
import threading
import types

import numpy as np
import torch

# what torch reports for each card: name, compute capability, get_device_properties().total_memory
CARDS = {
    "l40s": dict(name="NVIDIA L40S", major=8, minor=9, total_memory=46_068 * 2 ** 20, multi_processor_count=142),
    "t4": dict(name="Tesla T4", major=7, minor=5, total_memory=15_102 * 2 ** 20, multi_processor_count=40),
}
NO_DRIVER = "Found no NVIDIA driver on your system"  # torch's own error at the first real CUDA work here
PRETEND_ENV = "SES_TEST_PRETEND_GPU"  # "<card>:<count>": tests/pretend_gpu/sitecustomize.py installs it


class PretendGPUs:
    """CUDA's bookkeeping for `count` cards of one kind, on a machine without a GPU: is_available,
    device_count (CUDA_VISIBLE_DEVICES is honoured as a driver would), current_device and
    is_initialized, get_device_properties (so capability and name), mem_get_info, is_bf16_supported
    (True, as a T4 says, counting emulation) and the driver call behind set_device. torch's own
    argument checks stay (set_device refuses a device without an index; get_device_properties an index
    out of range), and the first real CUDA work (a tensor, a kernel, NCCL) meets torch's own driver
    check, which fails here with NO_DRIVER."""

    def __init__(self, card: str, count: int = 1):
        self.props = types.SimpleNamespace(**CARDS[card])
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.count = len([v for v in visible.split(",") if v.strip()]) if visible is not None else count
        self.current, self.initialized, self.set_calls = 0, False, []

    def properties(self, device=None):
        index = torch.cuda._utils._get_device_index(device, optional=True)
        if not 0 <= index < self.count:
            raise AssertionError("Invalid device id")  # torch's own message
        return self.props

    def set_device(self, index: int) -> None:
        if not 0 <= index < self.count:
            raise RuntimeError("CUDA error: invalid device ordinal")  # the driver's answer
        self.set_calls.append(index)
        self.current, self.initialized = index, True  # the driver call initialises CUDA

    def install(self, setattr_=setattr) -> "PretendGPUs":
        """Put the stand-in in place with setattr_ (monkeypatch.setattr in a test; setattr in a child)."""
        for name, value in dict(is_available=lambda: self.count > 0, device_count=lambda: self.count,
                                current_device=lambda: self.current, is_initialized=lambda: self.initialized,
                                get_device_properties=self.properties,
                                mem_get_info=lambda device=None: (self.props.total_memory - 2 ** 29, self.props.total_memory),
                                is_bf16_supported=lambda including_emulation=True: True).items():
            setattr_(torch.cuda, name, value)
        setattr_(torch._C, "_cuda_setDevice", self.set_device)
        setattr_(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # restored after a test
        return self


class FakeDevices:
    """torch.cuda.device / current_device / current_stream stand-ins that track which device is current."""

    def __init__(self, current="cuda:7"):
        self.current, self.streams = current, []

    def device(self, d):
        @contextlib.contextmanager
        def guard():
            was, self.current = self.current, str(d)
            try:
                yield
            finally:
                self.current = was
        return guard()

    def current_device(self):
        return self.current

    def current_stream(self, device=None):
        self.streams.append((str(device), self.current))
        return types.SimpleNamespace(cuda_stream=4242)


class RecordingLock:
    """A reentrant lock that says which outermost acquisition, if any, is held."""

    def __init__(self):
        self._lock, self.depth, self.entries = threading.RLock(), 0, 0

    def __enter__(self):
        self._lock.acquire()
        self.depth += 1
        self.entries += self.depth == 1
        return self

    def __exit__(self, *exc):
        self.depth -= 1
        self._lock.release()

    def held(self):
        return self.entries if self.depth else None


class FakeCusolver:
    """cuSOLVER's documented contract on host memory: column-major stacks (A_k(i, j) = A[i + lda*j + lda*n*k]),
    only the lower triangle read, A overwritten with the eigenvectors by column, W ascending, info per matrix,
    and the solve given the workspace sizes its bufferSize call returned (sizes that differ per shape here,
    so a binding passing anything else fails). Each call records (name, the current device, the lock
    acquisition held)."""

    def __init__(self, devices=None, lock=None):
        self.called, self.log, self.devices, self.lock = [], [], devices, lock
        self.sizes = None  # what the last bufferSize call returned

    def _sized(self, got, work):
        assert self.sizes is not None and got == self.sizes, f"solve given workspace {got}, bufferSize said {self.sizes}"
        assert work.value, "solve given no device workspace"

    def _note(self, name):
        self.log.append((name, self.devices.current if self.devices else None, self.lock.held() if self.lock else None))

    def _out(self, name, ref, value):
        self._note(name)
        ref._obj.value = value
        return 0

    def cusolverDnCreate(self, ref):
        return self._out("Create", ref, 1)

    cusolverDnCreateParams = cusolverDnCreateSyevjInfo = cusolverDnCreate

    def cusolverDnSetStream(self, handle, stream):
        self._note("SetStream")
        self.stream = stream.value
        return 0

    def _solve(self, name, dtype, n, A, lda, W, info, batch):
        self._note(name)
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
        self.sizes = (128 + 8 * n * batch, 16 + batch)
        return self._out("bufferSize", dev, self.sizes[0]) or self._out("bufferSize", host, self.sizes[1])

    def cusolverDnXsyevBatched(self, h, p, jobz, uplo, n, ta, A, lda, tw, W, tc, work, dev_bytes, host, host_bytes,
                               info, batch):
        self.called.append(("XsyevBatched", ta, n, batch, dev_bytes, host_bytes))
        self._sized((dev_bytes, host_bytes), work)
        assert host.value, "solve given no host workspace where bufferSize asked for some"
        return self._solve("solve", np.float32 if ta == 0 else np.float64, n, A, lda, W, info, batch)

    def _syevj_size(self, h, jobz, uplo, n, A, lda, W, lwork, params, batch):
        self.sizes = 7 + n * batch
        return self._out("bufferSize", lwork, self.sizes)

    cusolverDnSsyevjBatched_bufferSize = cusolverDnDsyevjBatched_bufferSize = _syevj_size

    def cusolverDnSsyevjBatched(self, h, jobz, uplo, n, A, lda, W, work, lwork, info, params, batch):
        self.called.append(("SsyevjBatched", n, batch, lwork))
        self._sized(lwork, work)
        return self._solve("solve", np.float32, n, A, lda, W, info, batch)

    def cusolverDnDsyevjBatched(self, h, jobz, uplo, n, A, lda, W, work, lwork, info, params, batch):
        self.called.append(("DsyevjBatched", n, batch, lwork))
        self._sized(lwork, work)
        return self._solve("solve", np.float64, n, A, lda, W, info, batch)


class OldFakeCusolver(FakeCusolver):
    @property
    def cusolverDnXsyevBatched(self):  # cuSOLVER before 11.7.1 has no XsyevBatched
        raise AttributeError("cusolverDnXsyevBatched")
