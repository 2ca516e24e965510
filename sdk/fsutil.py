"""Atomic file and directory writes (build aside, fsync, rename: a failure never leaves a
half-written file or directory in place of a good one), checked JSON reads, and the cache directory."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import CorruptFileError, StoreError


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` and the directories themselves."""
    for root, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(root))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a fresh staging directory next to ``target``; on clean exit it replaces ``target``
    (fsynced, then renamed). On any exception the staging directory is removed and ``target``
    is untouched. Raises :class:`StoreError` when the parent directory isn't writable or
    ``target`` exists and ``overwrite`` is False."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as e:
        raise StoreError(f"cannot write to {target.parent}: {e.strerror or e}") from e
    if target.exists() and not overwrite:
        shutil.rmtree(stage, ignore_errors=True)
        raise StoreError(f"{target} already exists")
    try:
        yield stage
        fsync_tree(stage)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(stage, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, ``{}`` if the file is absent; :class:`CorruptFileError` if bad."""
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"cannot parse {path}: {e}") from e
    if not isinstance(d, dict):
        raise CorruptFileError(f"{path} does not hold a JSON object")
    return d


def cache_dir() -> Path:
    """Where cached bundles and benchmark files live: ``$POCKETPEFT_CACHE`` or ``~/.cache/pocketpeft``."""
    return Path(os.environ.get("POCKETPEFT_CACHE") or Path.home() / ".cache" / "pocketpeft")
