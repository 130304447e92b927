"""File plumbing shared by every dataset and by the run folders: all-or-nothing writes, checksummed
downloads, decoded-dataset caches, and finding data under Kaggle's read-only input folder.

Every file written here goes to a temporary name in the same folder first and is moved into place
with os.replace, so a failed or killed process never leaves a half-written file behind: readers see
the old file or the new one.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import urllib.request
from pathlib import Path

import torch
from tqdm.auto import tqdm


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


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


# ----------------------------------------------------------------------------- finding data
def search_roots(data_dir: Path) -> list[Path]:
    """data_dir, plus Kaggle's read-only /kaggle/input/<dataset>[/<sub>] folders when present."""
    roots = [Path(data_dir)]
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
    data_dir = Path(data_dir)
    writable = os.access(data_dir, os.W_OK) or not data_dir.exists()
    return (data_dir if writable else Path("data")) / name


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
    """Download url to dest via a .part file, checked before it takes its final name: against its
    md5, or (for archives with no published checksum) by verify(path), which raises DataError."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as f:
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
    os.replace(part, dest)
    return dest


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
    return download(url, Path(data_dir) / name, md5)
