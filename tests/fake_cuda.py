"""CPU stand-ins for what cusolver_batched calls on a GPU: the current-device and stream functions of
torch.cuda, a lock that reports what is held, and libcusolver's batched eigen-solvers by their
documented contract on host memory. Used by test_cusolver_batched."""
import contextlib
import ctypes
import threading
import types

import numpy as np


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
