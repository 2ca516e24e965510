"""Text store (SQLite, WAL, byte cap, wipe, validation, base check) and adapter store (atomic
PEFT versions, pointer, restore, hash checks, failures that lose nothing), checked against
sqlite3 itself and real peft."""

import copy
import errno
import json
import os
import sqlite3

import numpy as np
import pytest
import torch

import pocketpeft as pp
from pocketpeft.errors import (
    BaseModelMismatchError,
    CorruptFileError,
    InputTextError,
    ModelFileNotFoundError,
    StoreError,
)
from pocketpeft.runtime.keyboard.store import NEW, REJECTED, TRAINED, AdapterStore, TextStore, tensors_sha256

BASE = "a" * 64


# ------------------------------------------------------------------------- text store
def test_text_rows_markers_and_wal(tmp_path):
    st = TextStore(tmp_path / "t.sqlite", BASE)
    ids = [st.add("hello there"), st.add(b"caf\xc3\xa9 later?", timestamp=123.0)]
    st.add_many(["one", "two"])
    rows = st.rows()
    assert [r.text for r in rows] == ["hello there", "café later?", "one", "two"]
    assert rows[1].timestamp == 123.0 and all(r.trained == NEW for r in rows)
    st.mark(ids, TRAINED)
    st.mark([rows[2].id], REJECTED)
    assert [r.text for r in st.rows(TRAINED)] == ["hello there", "café later?"]
    assert st.stats() == {
        "messages": 4,
        "bytes": sum(len(r.text.encode()) for r in rows),
        "new": 1,
        "trained": 2,
        "rejected": 1,
    }
    # an independent reader (sqlite3 itself) sees the committed rows and WAL mode
    db = sqlite3.connect(tmp_path / "t.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT COUNT(*) FROM texts").fetchone()[0] == 4
    db.close()


def test_text_byte_cap_drops_oldest(tmp_path):
    st = TextStore(tmp_path / "t.sqlite", BASE, max_bytes=100, max_message_bytes=40)
    for i in range(12):
        st.add(f"message number {i:02d}")  # 17 bytes each
    rows = st.rows()
    assert st.stats()["bytes"] <= 100 and len(rows) == 100 // 17
    assert [r.text for r in rows] == [f"message number {i:02d}" for i in range(12 - len(rows), 12)]


def test_text_wipe_removes_files(tmp_path):
    st = TextStore(tmp_path / "t.sqlite", BASE)
    st.add_many(["private one", "private two"])
    assert (tmp_path / "t.sqlite-wal").exists()
    out = st.wipe()
    assert out["messages"] == 2 and out["bytes"] == len("private one") + len("private two")
    assert "t.sqlite" in out["files"] and "t.sqlite-wal" in out["files"]
    assert st.rows() == [] and st.stats()["messages"] == 0
    st.close()
    for suffix in ("", "-wal", "-shm"):  # nothing of the old text remains on disk
        p = tmp_path / f"t.sqlite{suffix}"
        assert not p.exists() or b"private" not in p.read_bytes()


@pytest.mark.parametrize("bad", ["", "   \n", b"\xff\xfe bad", "bin\x00ary", "x" * 5000, 42])
def test_text_bad_input_is_typed_and_stores_nothing(tmp_path, bad):
    st = TextStore(tmp_path / "t.sqlite", BASE, max_message_bytes=4096)
    st.add("kept")
    with pytest.raises(InputTextError, match="message"):
        st.add(bad)
    with pytest.raises(InputTextError):
        st.add_many(["fine", bad])  # all or none
    assert [r.text for r in st.rows()] == ["kept"]


def test_text_store_of_another_base_is_refused(tmp_path):
    TextStore(tmp_path / "t.sqlite", BASE).add("hi")
    with pytest.raises(BaseModelMismatchError, match="belongs to base"):
        TextStore(tmp_path / "t.sqlite", "b" * 64)


def test_text_store_in_unwritable_place(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StoreError):
        TextStore(tmp_path / "file" / "t.sqlite", BASE)


# ------------------------------------------------------------------------- adapter store
R = 4


@pytest.fixture(scope="module")
def peft_parts(tiny_hf_model):
    """A peft LoRA model over the tiny Llama, its LoraConfig and PEFT-named tensors (real peft names)."""
    import peft

    cfg = peft.LoraConfig(r=R, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(tiny_hf_model), cfg)
    tensors = {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model).items()}
    return pp.LoraConfig(r=R, lora_alpha=8, target_modules=["q_proj", "v_proj"]), tensors


def _rand(tensors, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in tensors.items()}


def test_versions_commit_list_restore_and_load_in_peft(tmp_path, peft_parts, tiny_hf_model):
    import peft

    lora, tensors = peft_parts
    st = AdapterStore(tmp_path / "ad", BASE, lora)
    assert st.current_version() is None and st.list() == []
    with pytest.raises(ModelFileNotFoundError):
        st.load()
    v1 = st.commit(_rand(tensors, 1), {"heldout_loss_after": 3.5})
    v2 = st.commit(_rand(tensors, 2), {"heldout_loss_after": 3.1})
    assert (v1.version, v2.version) == (1, 2) and st.current_version() == 2
    assert [(v.version, v.metrics["heldout_loss_after"]) for v in st.list()] == [(1, 3.5), (2, 3.1)]
    assert st.restore(1).sha256 == tensors_sha256(_rand(tensors, 1)) and st.current_version() == 1
    assert AdapterStore(tmp_path / "ad", BASE, lora).current_version() == 1  # survives reopen
    # the version directory is a PEFT adapter: real peft loads it with these exact weights
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_hf_model), str(v2.path))
    got = peft.get_peft_model_state_dict(pm)
    for k, v in _rand(tensors, 2).items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)


def test_damaged_version_is_detected(tmp_path, peft_parts):
    lora, tensors = peft_parts
    st = AdapterStore(tmp_path / "ad", BASE, lora)
    v = st.commit(_rand(tensors, 1))
    w = v.path / "adapter_model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-5] ^= 0xFF  # flip bits inside the last tensor's data
    w.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match="sha256"):
        st.load(1)
    assert st.list() == []


def test_adapter_store_of_another_base_is_refused(tmp_path, peft_parts):
    lora, tensors = peft_parts
    AdapterStore(tmp_path / "ad", BASE, lora).commit(_rand(tensors, 1))
    with pytest.raises(BaseModelMismatchError, match="belongs to base"):
        AdapterStore(tmp_path / "ad", "c" * 64, lora)


def _assert_v1_intact(st, tensors):
    assert st.current_version() == 1
    assert st.version(1).sha256 == tensors_sha256(_rand(tensors, 1))
    assert sorted(p.name for p in st.versions_dir.iterdir()) == ["1"]  # nothing half-written left


def test_full_disk_keeps_previous_version(tmp_path, peft_parts, monkeypatch):
    """ENOSPC from the tensor file write (injected: no small filesystem can be mounted here)."""
    import safetensors.numpy

    lora, tensors = peft_parts
    st = AdapterStore(tmp_path / "ad", BASE, lora)
    st.commit(_rand(tensors, 1))

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:  # a partial file, then the disk fills up
            fh.write(b"\x00" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", full)
    with pytest.raises(StoreError, match="version 1 stays current.*disk is full"):
        st.commit(_rand(tensors, 2))
    monkeypatch.undo()
    _assert_v1_intact(AdapterStore(tmp_path / "ad", BASE, lora), tensors)


def test_read_only_dir_keeps_previous_version(tmp_path, peft_parts, monkeypatch):
    lora, tensors = peft_parts
    st = AdapterStore(tmp_path / "ad", BASE, lora)
    st.commit(_rand(tensors, 1))
    os.chmod(st.versions_dir, 0o555)
    try:
        if os.access(st.versions_dir, os.W_OK):
            # running as root: permissions don't stop writes, so the kernel's answer is injected
            import pocketpeft.fsutil as fsutil

            def denied(*a, **k):
                raise PermissionError(errno.EACCES, "Permission denied")

            monkeypatch.setattr(fsutil.tempfile, "mkdtemp", denied)
        with pytest.raises(StoreError, match="version 1 stays current"):
            st.commit(_rand(tensors, 2))
    finally:
        monkeypatch.undo()
        os.chmod(st.versions_dir, 0o755)
    _assert_v1_intact(st, tensors)


def test_pointer_write_failure_keeps_previous_current(tmp_path, peft_parts, monkeypatch):
    import pocketpeft.runtime.keyboard.store as store_mod

    lora, tensors = peft_parts
    st = AdapterStore(tmp_path / "ad", BASE, lora)
    st.commit(_rand(tensors, 1))

    def fail(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod, "write_bytes_atomic", fail)
    with pytest.raises(StoreError, match="version 1 stays current"):
        st.commit(_rand(tensors, 2))
    monkeypatch.undo()
    assert st.current_version() == 1 and st.load().metadata["pocketpeft.version"] == "1"
    assert json.loads((st.root / "current").read_text()) == {"version": 1}
    # the orphaned complete version 2 is never made current by accident; the next commit is 3
    assert st.commit(_rand(tensors, 3)).version == 3 and st.current_version() == 3
    assert np.isclose(
        st.load(2).tensors[next(iter(tensors))].sum().item(), _rand(tensors, 2)[next(iter(tensors))].sum().item()
    )
