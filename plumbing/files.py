"""File plumbing shared by every dataset and by the run folders: all-or-nothing writes, checksummed
downloads, decoded-dataset caches, and finding data under Kaggle's read-only input folder.

Every file written here goes to a temporary name in the same folder first and is moved into place
with os.replace, so a failed or killed process never leaves a half-written file behind: readers see
the old file or the new one. Temp names are unique (mkstemp, mkdtemp), so several processes may
write in one folder at once. Preparing a dataset (fetch, verify, extract, decode, cache) happens
under a lock (prepare_once), a lease (leases.py) in the writable data folder, so it is done by one
process while the others wait for it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
import time
import urllib.request
import zlib
from pathlib import Path

import torch
from plumbing.progress import tqdm

from plumbing import leases


class DataError(RuntimeError):
    """Missing, corrupt or mismatching data: the message says what to do."""


# ----------------------------------------------------------------------------- atomic writes
def atomic_torch_save(obj, path: Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then os.replace: all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Text via a unique temp file + os.replace (safe with several writers on one folder)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: Path):
    """The JSON in path, or None if the file is missing or cannot be read or parsed (a copy cut short)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


# ----------------------------------------------------------------------------- finding data
def writable_dir(data_dir: Path) -> Path:
    """Where downloads, extractions, caches and the data lock go: data_dir, or ./data when data_dir
    is read-only (a Kaggle input folder)."""
    data_dir = Path(data_dir)
    return data_dir if os.access(data_dir, os.W_OK) or not data_dir.exists() else Path("data")


def search_roots(data_dir: Path) -> list[Path]:
    """data_dir, the folder written instead when it is read-only, and Kaggle's read-only
    /kaggle/input/<dataset>[/<sub>] folders when present."""
    roots = list(dict.fromkeys([Path(data_dir), writable_dir(data_dir)]))
    kaggle = Path("/kaggle/input")
    if kaggle.is_dir():
        roots += sorted(p for p in kaggle.glob("*") if p.is_dir())
        roots += sorted(p for p in kaggle.glob("*/*") if p.is_dir())
    return roots


def find_in_roots(data_dir: Path, name: str, is_kind=Path.is_dir) -> Path | None:
    """The first <root>/<name> over search_roots(data_dir) that passes is_kind (a folder by default)."""
    return next((r / name for r in search_roots(data_dir) if is_kind(r / name)), None)


# ----------------------------------------------------------------------------- caches
def cache_path(data_dir: Path, name: str) -> Path:
    """Decoded-dataset cache in data_dir, or in ./data when data_dir is read-only (Kaggle input)."""
    return writable_dir(data_dir) / name


def load_cache(path: Path):
    """(train_x, train_y, test_x, test_y, classes) from a cache, or None if absent or unreadable."""
    if not path.is_file():
        return None
    try:
        d = torch.load(path, weights_only=True)
        return d["train_x"], d["train_y"], d["test_x"], d["test_y"], list(d["classes"])
    except Exception as e:  # a truncated cache is rebuilt, never trusted
        print(f"warning: cache {path} is unreadable ({e}); rebuilding it")
        return None


def save_cache(path: Path, tensors) -> None:
    keys = ("train_x", "train_y", "test_x", "test_y", "classes")
    atomic_torch_save(dict(zip(keys, tensors)), path)


def _stamp(path: Path):
    try:
        st = path.stat()
        return st.st_ino, st.st_mtime_ns, st.st_size
    except FileNotFoundError:
        return None


def prepare_once(data_dir: Path, what: str, find, make):
    """find(), if it finds dataset `what` prepared (an extracted folder, a cache); else make(folder),
    done by one process at a time under the data lock <folder>/.lock-<what>.<gen>.json, a lease
    (plumbing/leases.py), after a last find() (folder = writable_dir(data_dir)). A process that
    finds the lock held prints one line saying whom it waits for and returns find()'s result as
    soon as there is one; it takes the lock itself if the holder died. When the holder fails (no
    internet, a bad checksum), it leaves its one-line error in <folder>/.failed-<what>.json before
    it lets go, and every process that was waiting raises that same DataError instead of trying
    again one after the other. An OSError while preparing (disk full, a file removed underneath, no
    permission) becomes a one-line DataError."""
    started = time.time()
    found = find()
    if found is not None:
        return found
    folder = writable_dir(data_dir)
    safe = re.sub(r"[^\w-]", "_", what)
    failed = folder / f".failed-{safe}.json"

    def done():
        result = find()
        if result is not None:
            return result
        failure = read_json(failed)  # the holder failed after this process began to wait: fail alike
        if isinstance(failure, dict) and failure.get("time", 0) >= started:
            return DataError(failure.get("message", f"preparing {what} failed in another process"))
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lease, found = leases.wait_acquire(folder, ".lock-" + safe, f"preparing {what}", done)
    except OSError as e:
        raise DataError(f"cannot create the lock for preparing {what} in {folder} ({e}); make it writable "
                        f"or pass --data-dir to a writable folder") from None
    if isinstance(found, DataError):
        raise found
    if lease is None:
        return found
    if lease.previous is not None:
        print(f"note: taking over the {lease.reason} lock of {leases.who(lease.previous)} on {what}", flush=True)
    try:
        failed.unlink(missing_ok=True)  # this attempt starts afresh
        found = find()  # finished by another process between the last look and the lock
        return found if found is not None else make(folder)
    except DataError as e:
        write_json(failed, dict(message=str(e), time=time.time()))
        raise
    except OSError as e:
        error = DataError(f"could not prepare {what} in {folder} ({type(e).__name__}: {e}); check its free space "
                          f"and permissions and rerun, or pass --data-dir to another folder")
        write_json(failed, dict(message=str(error), time=time.time()))
        raise error from None
    finally:
        lease.release()


def cached(data_dir: Path, name: str, what: str, build):
    """The decoded dataset from the cache `name` (cache_path), else build() -> tensors, cached
    atomically with one line saying so: once, by prepare_once."""
    path = cache_path(data_dir, name)
    tried = []  # cache versions read already: an unreadable one is rebuilt, not read again

    def find():
        stamp = _stamp(path)
        if stamp is None or stamp in tried:
            return None
        tried.append(stamp)
        return load_cache(path)

    def make(_folder):
        out = build()
        save_cache(path, out)
        print(f"cached {what} in {path}", flush=True)
        return out
    return prepare_once(data_dir, what, find, make)


# ----------------------------------------------------------------------------- downloads
def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_md5(path: Path, md5: str, what: str) -> None:
    got = md5sum(path)
    if got != md5:
        raise DataError(f"{path} has md5 {got}, expected {md5} for {what}: the file is corrupt or "
                        f"a different archive; delete it and rerun to download it again, or pass "
                        f"--data-dir to a folder holding the extracted dataset")


def download(url: str, dest: Path, md5: str | None, verify=None) -> Path:
    """Download url to dest via a uniquely named .part file in the same folder, checked before it
    takes its final name: against its md5, or (for archives with no published checksum) by
    verify(path), which raises DataError."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob(f".{dest.name}.*.part"):  # a killed download's (the caller holds the data lock)
        stale.unlink(missing_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    part = Path(name)
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as r:
            total = int(r.headers.get("Content-Length") or 0)
            with tqdm(total=total or None, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                while block := r.read(1 << 20):
                    f.write(block)
                    bar.update(len(block))
        verify_md5(part, md5, url) if md5 else verify(part)
    except DataError:
        part.unlink(missing_ok=True)
        raise
    except (OSError, ValueError) as e:
        part.unlink(missing_ok=True)
        raise DataError(f"could not download {url} ({e}); download it by hand and put it "
                        f"at {dest}, or attach it as a Kaggle dataset and pass --data-dir") from None
    except BaseException:  # Ctrl-C: no partial file left behind
        part.unlink(missing_ok=True)
        raise
    os.chmod(part, 0o644)
    os.replace(part, dest)
    return dest


def extract_tar(archive: Path, root: Path, member: str) -> Path:
    """The folder `member` of a tar archive extracted to root/member, all or nothing: into a unique
    temp folder in root first, then moved into place with os.replace; one line says so."""
    for stale in root.glob(f".extract-{member}-*"):  # a killed extraction's (the caller holds the data lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".extract-{member}-", dir=root))
    try:
        with tarfile.open(archive) as tar:
            try:
                tar.extractall(tmp, filter="data")  # refuses absolute paths and links out of tmp
            except TypeError:  # Python without extraction filters (< 3.10.12 / 3.11.4)
                tar.extractall(tmp)
        if not (tmp / member).is_dir():
            raise DataError(f"{archive} holds no {member}/ folder; delete it and rerun to download it again")
        os.replace(tmp / member, root / member)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise DataError(f"cannot extract {archive} ({e}); delete it and rerun to download it again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"extracted {Path(archive).name} into {root / member}", flush=True)
    return root / member


def fetch_archive(data_dir: Path, url: str, md5: str, download_ok: bool, what: str) -> Path:
    """An archive with the right md5: found under data_dir (or Kaggle input) or downloaded."""
    name = url.rsplit("/", 1)[-1]
    found = find_in_roots(data_dir, name, Path.is_file)
    if found:
        verify_md5(found, md5, what)
        return found
    if not download_ok:
        raise DataError(f"{what} not found: put {name} (from {url}, md5 {md5}) or its extracted "
                        f"folder in {data_dir}, or attach it as a Kaggle dataset (found under "
                        f"/kaggle/input automatically), or run without --no-download")
    return download(url, writable_dir(data_dir) / name, md5)
