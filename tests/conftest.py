"""Fixtures shared by the test files, and one OpenMP thread per test process.

pytest.ini runs the suite on two xdist workers; each test process (and every process a test
starts, which inherits OMP_NUM_THREADS) computes on one thread, so two workers fill two cores
without the spin-waits of OpenMP threads that share a core (on shared cores two threads a process
made a preflight several times slower than one).

Every test stays under 60 s on two cores except the tests marked `end_to_end` (at most three,
each under 150 s); collection fails if more than three carry the mark. `--durations=15` shows
where each stands after every run.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

MAX_END_TO_END = 3


def pytest_collection_modifyitems(config, items):
    marked = sorted({item.nodeid.split("[")[0] for item in items if item.get_closest_marker("end_to_end")})
    if len(marked) > MAX_END_TO_END:
        raise pytest.UsageError(f"{len(marked)} tests are marked end_to_end, at most {MAX_END_TO_END} may be: "
                                + ", ".join(marked) + "; make one cheaper or merge two")


@pytest.fixture
def cpu_cusolver(monkeypatch):
    """cusolver_batched.eigh_batched (CUDA only) emulated on the CPU by its contract: (w, v, info) in `dtype`."""
    from ses_solvers import cusolver_batched
    calls = []

    def eigh_batched(a, dtype=None):
        calls.append(tuple(a.shape))
        w, v = torch.linalg.eigh(a.to(dtype or a.dtype))
        return w, v, torch.zeros(a.shape[0], dtype=torch.int32)
    monkeypatch.setattr(cusolver_batched, "eigh_batched", eigh_batched)
    return calls


@pytest.fixture
def write_lease():
    """write(path, age=0, **facts): a lease file (leases.py's format) as another process leaves it:
    its in-file heartbeat `age` seconds old, its owner this process unless facts say otherwise
    (host, pid, start, boot, pidns). Returns the facts written."""
    import json
    import secrets
    import time
    from pathlib import Path

    from plumbing import leases

    def write(path, age=0.0, **facts):
        now = time.time()
        f = dict(leases.owner_facts(), token=secrets.token_hex(8), gen=int(Path(path).name.split(".")[-2]),
                 what="training elsewhere", since=now - age - 60, heartbeat=now - age, beat=7)
        f.update(facts)
        Path(path).write_text(json.dumps(f))
        return f
    return write


@pytest.fixture
def dead_pid():
    """The pid of a process of this host that has exited and been reaped."""
    import subprocess
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.fixture
def archive_server():
    """serve({name: bytes}, hold=lambda: True) -> a server on 127.0.0.1 (a real socket, a free port)
    with .url(name) and .gets (a Counter of GET paths). Each response waits until hold() is true
    (polled), so a test decides when a download may finish. Shut down after the test."""
    import threading
    import time
    from collections import Counter
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    servers = []

    def serve(archives, hold=lambda: True):
        gets = Counter()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                gets[self.path] += 1
                body = archives.get(self.path.lstrip("/"))
                if body is None:
                    return self.send_error(404)
                deadline = time.monotonic() + 60
                while not hold() and time.monotonic() < deadline:
                    time.sleep(0.01)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.gets = gets
        httpd.url = lambda name: f"http://127.0.0.1:{httpd.server_address[1]}/{name}"
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return httpd
    yield serve
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="session")
def exp10_smoke(tmp_path_factory):
    """The out-dir of one `exp10_periodic_ses.py --smoke` (all five configs, seed 0), run once per
    session; tests that change it work on a copy (helpers.copy_out_dir)."""
    from helpers import EXP10, run
    out = tmp_path_factory.mktemp("exp10_smoke")
    p = run([EXP10, "--smoke", "--out-dir", out], cwd=out)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p
