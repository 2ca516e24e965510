"""Activation cache: float16 round trip, hit/miss counts, compute-only-misses with dedup, LRU cap,
key change, damaged entries and files (edited with sqlite3 itself), wipe, a SIGKILL mid-write,
and no torch on import."""

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from pocketpeft.errors import ConfigError, PocketPeftError
from pocketpeft.runtime.keyboard.hidden_cache import HiddenCache, _checksum, row_digest

KEY = "a" * 64 + ":" + "b" * 64 + ":3"
H, T = 32, 16
ROW_BYTES = T * H * 2


def rows_of(*seeds: int, t: int = T) -> np.ndarray:
    return np.stack([np.random.default_rng(s).integers(0, 49152, t) for s in seeds]).astype(np.int64)


def hidden_of(rows: np.ndarray, h: int = H) -> np.ndarray:
    """A deterministic float32 state per row (a function of its ids), like a real prefix."""
    return np.stack([np.random.default_rng(r.tolist()).standard_normal((len(r), h)) * 4 for r in rows]).astype(
        np.float32
    )


class Prefix:
    """A compute callable that records what it was asked for."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        self.calls.append(len(rows))
        return hidden_of(rows)


def db_exec(path, sql: str, args: tuple = ()) -> None:
    db = sqlite3.connect(path)
    db.execute(sql, args)
    db.commit()
    db.close()


def test_round_trip_is_float16_and_counts_hits(tmp_path):
    c = HiddenCache(tmp_path / "h.sqlite", KEY, H)
    rows = rows_of(1, 2, 3)
    hid = hidden_of(rows)
    assert c.get(rows[0]) is None
    c.put_many(rows, hid)
    got = c.get_many(rows)
    for g, want in zip(got, hid):
        assert g.dtype == np.float16 and g.shape == (T, H)
        np.testing.assert_array_equal(g, want.astype(np.float16))  # exactly the float16 rounding
        np.testing.assert_allclose(g, want, rtol=1e-3, atol=1e-3)
    assert c.get(rows_of(4)[0]) is None
    assert c.get(rows[1][:-1]) is None  # a different length is a different row
    st = c.stats()
    assert (st["hits"], st["misses"], st["entries"], st["bytes"]) == (3, 3, 3, 3 * ROW_BYTES)
    assert st["file_bytes"] > 0 and st["max_bytes"] == 64 << 20
    c.close()
    # reopened (same key): still there, and an independent reader sees WAL and the rows
    c = HiddenCache(tmp_path / "h.sqlite", KEY, H)
    np.testing.assert_array_equal(c.get(rows[2]), hid[2].astype(np.float16))
    db = sqlite3.connect(tmp_path / "h.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT COUNT(*) FROM entries").fetchone()[0] == 3
    db.close()


def test_keys_are_sha256_of_int64_le_ids():
    ids = np.array([1, 2, 300], dtype=np.int32)
    assert row_digest(ids) == hashlib.sha256(b"".join(int(i).to_bytes(8, "little") for i in ids)).digest()


def test_hidden_for_computes_only_misses_and_dedups(tmp_path):
    c = HiddenCache(tmp_path / "h.sqlite", KEY, H)
    pre = Prefix()
    seen = []
    rows = rows_of(1, 2, 1, 3, 2, 4, 5, 6, 7, 8, 9)  # 9 distinct, two repeated
    out = c.hidden_for(rows, pre, batch=4, progress=lambda d, n: seen.append((d, n)))
    assert out.dtype == np.float16 and out.shape == (len(rows), T, H)
    np.testing.assert_array_equal(out, hidden_of(rows).astype(np.float16))
    assert pre.calls == [4, 4, 1] and seen == [(0, 9), (4, 9), (8, 9), (9, 9)]
    # second call: only the 2 new rows are computed
    pre.calls.clear()
    rows2 = np.concatenate([rows, rows_of(10, 11)])
    out2 = c.hidden_for(rows2, pre)
    assert pre.calls == [2]
    np.testing.assert_array_equal(out2, hidden_of(rows2).astype(np.float16))
    st = c.stats()
    assert st["entries"] == 11 and st["misses"] == 9 + 2 and st["hits"] == 9
    # all cached: compute is never called
    pre.calls.clear()
    c.hidden_for(rows2[:3], pre)
    assert pre.calls == []
    assert c.hidden_for(np.zeros((0, T), np.int64), pre).shape == (0, T, H)


def test_bad_arguments_raise_config_error(tmp_path):
    p = tmp_path / "h.sqlite"
    for key, hidden_size, max_bytes in ((KEY, 0, 1), (KEY, H, -1), (KEY, H, True), ("", H, 1), (None, H, 1)):
        with pytest.raises(ConfigError):
            HiddenCache(p, key, hidden_size, max_bytes)
    c = HiddenCache(p, KEY, H)
    with pytest.raises(ConfigError, match="hidden must be"):
        c.put_many(rows_of(1), np.zeros((1, T, H + 1), np.float32))
    with pytest.raises(ConfigError, match="token ids"):
        c.get_many(np.zeros((2, T), np.float32))
    with pytest.raises(ConfigError, match="compute returned"):
        c.hidden_for(rows_of(1), lambda r: np.zeros((len(r), T, 3), np.float32))
    with pytest.raises(ValueError):  # typed errors are also the builtin
        c.hidden_for(rows_of(1), Prefix(), batch=0)


def test_overflow_rows_are_not_stored(tmp_path):
    c = HiddenCache(tmp_path / "h.sqlite", KEY, H)
    rows = rows_of(1, 2, 3)
    hid = hidden_of(rows)
    hid[1, 3, 5] = 70000.0  # beyond float16's 65504: would be inf
    hid[2, 0, 0] = np.nan
    c.put_many(rows, hid)
    assert [g is not None for g in c.get_many(rows)] == [True, False, False]
    assert c.stats()["skipped_overflow"] == 2 and c.stats()["entries"] == 1
    hid[1, 3, 5] = 65504.0  # the largest float16 is fine
    c.put_many(rows[1:2], hid[1:2])
    assert c.get(rows[1])[3, 5] == 65504.0


def test_lru_eviction_keeps_the_cap(tmp_path):
    c = HiddenCache(tmp_path / "h.sqlite", KEY, H, max_bytes=5 * ROW_BYTES + 100)
    rows = rows_of(*range(12))
    c.put_many(rows[:5], hidden_of(rows[:5]))
    assert c.get(rows[0]) is not None  # row 0 becomes the most recently used
    c.put_many(rows[5:7], hidden_of(rows[5:7]))  # evicts 1 and 2, the least recently used
    assert [g is not None for g in c.get_many(rows[:7])] == [True, False, False, True, True, True, True]
    for i in range(7, 12):
        c.put_many(rows[i : i + 1], hidden_of(rows[i : i + 1]))
        st = c.stats()
        assert st["bytes"] <= st["max_bytes"] and st["entries"] == 5
    assert [c.get(r) is not None for r in rows[7:]] == [True] * 5
    # one call larger than the cap keeps its newest rows
    big = rows_of(*range(100, 120))
    c.put_many(big, hidden_of(big))
    assert [c.get(r) is not None for r in big[-5:]] == [True] * 5 and c.stats()["entries"] == 5
    # hidden_for over more rows than fit still returns them all, correct
    out = c.hidden_for(rows_of(*range(200, 220)), Prefix(), batch=3)
    np.testing.assert_array_equal(out, hidden_of(rows_of(*range(200, 220))).astype(np.float16))
    assert c.stats()["bytes"] <= c.stats()["max_bytes"]


def test_another_key_or_hidden_size_clears(tmp_path):
    p = tmp_path / "h.sqlite"
    c = HiddenCache(p, KEY, H)
    rows = rows_of(1, 2)
    c.put_many(rows, hidden_of(rows))
    c.close()
    c = HiddenCache(p, KEY + "x", H)
    assert c.stats()["cleared"] == 2 and c.stats()["entries"] == 0
    assert c.get(rows[0]) is None
    c.put_many(rows[:1], hidden_of(rows[:1]))
    c.close()
    c = HiddenCache(p, KEY + "x", H * 2)  # another hidden size: cleared too
    assert c.stats()["cleared"] == 1 and c.get(rows[0]) is None
    c.close()
    c = HiddenCache(p, KEY + "x", H * 2)  # same identity: kept
    assert c.stats()["cleared"] == 0


@pytest.mark.parametrize("damage", ["flip", "truncate", "shape", "nonfinite", "swap"])
def test_damaged_entry_is_a_miss_and_recomputed(tmp_path, damage):
    p = tmp_path / "h.sqlite"
    c = HiddenCache(p, KEY, H)
    rows = rows_of(1, 2)
    c.put_many(rows, hidden_of(rows))
    d0, d1 = row_digest(rows[0]), row_digest(rows[1])
    if damage == "flip":  # same length, one bit changed: fails the checksum
        db = sqlite3.connect(p)
        blob = bytearray(db.execute("SELECT data FROM entries WHERE digest = ?", (d0,)).fetchone()[0])
        db.close()
        blob[11] ^= 0x04
        db_exec(p, "UPDATE entries SET data = ? WHERE digest = ?", (bytes(blob), d0))
    elif damage == "truncate":
        db_exec(p, "UPDATE entries SET data = substr(data, 1, 100) WHERE digest = ?", (d0,))
    elif damage == "shape":  # the blob is intact but the recorded shape is not the row's
        db_exec(p, "UPDATE entries SET t = ?, h = ? WHERE digest = ?", (T * 2, H // 2, d0))
    elif damage == "nonfinite":  # a valid checksum over an inf: only the finiteness check catches it
        bad = hidden_of(rows[:1])[0].astype(np.float16)
        bad[0, 0] = np.inf
        blob = bad.tobytes()
        db_exec(p, "UPDATE entries SET data = ?, checksum = ? WHERE digest = ?", (blob, _checksum(d0, T, H, blob), d0))
    elif damage == "swap":  # another row's (valid) entry under this row's key
        db_exec(p, "DELETE FROM entries WHERE digest = ?", (d0,))
        db_exec(p, "UPDATE entries SET digest = ? WHERE digest = ?", (d0, d1))
        rows = rows[:1]
    got = c.get(rows[0])
    assert got is None
    st = c.stats()
    assert st["dropped_corrupt"] == 1 and st["entries"] == len(rows) - 1  # deleted, never returned
    pre = Prefix()
    out = c.hidden_for(rows, pre)
    assert pre.calls == [1]
    np.testing.assert_array_equal(out, hidden_of(rows).astype(np.float16))
    np.testing.assert_array_equal(c.get(rows[0]), hidden_of(rows[:1])[0].astype(np.float16))


def test_garbage_file_is_recreated(tmp_path):
    p = tmp_path / "h.sqlite"
    p.write_bytes(np.random.default_rng(0).bytes(50_000))
    (tmp_path / "h.sqlite-wal").write_bytes(b"junk" * 100)
    (tmp_path / "keep.txt").write_text("mine")
    c = HiddenCache(p, KEY, H)
    assert c.stats()["recreated"] == 1 and c.stats()["entries"] == 0
    rows = rows_of(1)
    np.testing.assert_array_equal(c.hidden_for(rows, Prefix()), hidden_of(rows).astype(np.float16))
    assert c.get(rows[0]) is not None
    assert (tmp_path / "keep.txt").read_text() == "mine"  # only the cache's own files are touched


def test_file_damaged_while_open_is_recreated(tmp_path):
    p = tmp_path / "h.sqlite"
    c = HiddenCache(p, KEY, H)
    rows = rows_of(1, 2)
    c.put_many(rows, hidden_of(rows))
    c.close()
    c = HiddenCache(p, KEY, H)
    c._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with open(p, "r+b") as f:  # clobber everything past the header page
        f.seek(4096)
        f.write(b"\xff" * (os.path.getsize(p) - 4096))
    db_exec(p, "CREATE TABLE other (x)")  # another writer: the open connection must drop its page cache
    assert c.get_many(rows) == [None, None]  # a miss, not an exception
    c.put_many(rows, hidden_of(rows))
    assert all(g is not None for g in c.get_many(rows)) and c.stats()["recreated"] == 1


def test_wipe_removes_files_and_reopens_empty(tmp_path):
    p = tmp_path / "h.sqlite"
    c = HiddenCache(p, KEY, H)
    rows = rows_of(1, 2, 3)
    c.put_many(rows, hidden_of(rows))
    rep = c.wipe()
    assert rep["entries"] == 3 and rep["bytes"] == 3 * ROW_BYTES and "h.sqlite" in rep["files"]
    assert sorted(os.listdir(tmp_path)) == []
    assert c.get(rows[0]) is None  # reopened lazily, empty
    assert c.stats()["entries"] == 0 and p.exists()


def test_threads_share_one_cache(tmp_path):
    c = HiddenCache(tmp_path / "h.sqlite", KEY, H, max_bytes=40 * ROW_BYTES)
    errors = []

    def work(k: int) -> None:
        try:
            for j in range(10):
                rows = rows_of(k * 100 + j, j)
                np.testing.assert_array_equal(c.hidden_for(rows, Prefix()), hidden_of(rows).astype(np.float16))
        except Exception as e:  # surfaced below
            errors.append(e)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors and c.stats()["dropped_corrupt"] == 0


CHILD = """
import sys, numpy as np
from pocketpeft.runtime.keyboard.hidden_cache import HiddenCache
sys.path.insert(0, {tests!r})
from test_hidden_cache import KEY, hidden_of, rows_of
c = HiddenCache({path!r}, KEY, {h}, max_bytes=12 * {t} * {h} * 2)
pool = rows_of(*range(40), t={t})
hid = [hidden_of(pool[i:i + 1], {h}) for i in range(40)]
i = 0
while True:
    idx = [(i + k) % 40 for k in range(4)]
    c.put_many(pool[idx], np.concatenate([hid[k] for k in idx]))
    if i == 0:
        print("ready", flush=True)
    i += 4
"""


def test_sigkill_mid_write_leaves_only_valid_entries(tmp_path):
    """A writer killed at random moments (inserts and LRU evictions in flight) leaves a cache
    whose every returned entry is exactly what was put."""
    p = tmp_path / "h.sqlite"
    h, t = 576, 64  # real-size rows (73,728 bytes) so a kill lands mid-write
    pool = rows_of(*range(40), t=t)
    want = hidden_of(pool, h).astype(np.float16)
    tests = os.path.dirname(__file__)
    for delay in (0.15, 0.3, 0.45):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD.format(tests=tests, path=str(p), h=h, t=t)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert child.stdout.readline().strip() == b"ready", child.stderr.read().decode()
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        assert child.returncode == -signal.SIGKILL
        c = HiddenCache(p, KEY, h, max_bytes=12 * t * h * 2)
        got = c.get_many(pool)
        st = c.stats()
        assert st["recreated"] == 0 and st["cleared"] == 0 and st["dropped_corrupt"] == 0
        hits = [i for i, g in enumerate(got) if g is not None]
        assert 0 < len(hits) == st["entries"] <= 12 and st["bytes"] <= st["max_bytes"]
        for i in hits:
            np.testing.assert_array_equal(got[i], want[i])
        c.close()


def test_import_does_not_pull_torch():
    code = "import sys; import pocketpeft.runtime.keyboard.hidden_cache; assert 'torch' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_errors_are_typed(tmp_path):
    with pytest.raises(PocketPeftError):
        HiddenCache(tmp_path / "h.sqlite", KEY, -3)
