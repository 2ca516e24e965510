"""The activation cache: the frozen prefix's output hidden state for each packed training row.

The model is split at layer ``k``; the prefix (embedding + layers ``< k``) never trains, so its
output for a packed row of token ids ``[T]`` is computed once (on an inference runtime) and kept
here, and later training runs only the suffix. :class:`HiddenCache` is one SQLite file (WAL):
each entry is keyed by the sha256 of the row's int64 little-endian token bytes and holds the
hidden state as a float16 ``[T, H]`` blob, its shape, a blake2b checksum (over the row digest,
shape and blob) and a last-used counter; least-recently-used entries are evicted past
``max_bytes``. A file made for another ``key`` (base model, bundle, split layer) or another
``hidden_size`` is cleared on open; a file that is not a database, or is found corrupt, is deleted
and recreated; an entry that fails its checks is deleted and reported as a miss, never returned.
numpy and the standard library only: this runs on the device, without torch.

Why float16: half the bytes of float32, and a rounding error of at most 2**-11 relative (about
3 significant digits; 3e-8 absolute below 6.1e-5), the precision inference runtimes commonly run
the prefix at anyway; the suffix upcasts it to its compute dtype. Values beyond float16's range
(|x| > 65504) would become inf, so such rows are not stored.

Disk cost: ``T * H * 2`` bytes of blob per row; e.g. SmolLM2-135M (``H = 576``) at ``T = 64``:
73,728 bytes per row, so the default 64 MiB cap holds 910 rows. On disk a row takes whole 4 KiB
pages (about 19: 910 such rows measured 71.5 MB of database file), and the WAL is truncated to at
most 8 MiB after a checkpoint. Packed rows hold messages back to back, so 1,000 messages of ``m``
tokens on average (separators included) fill about ``ceil(1000 * m / T)`` rows, i.e. about
``1000 * m * H * 2`` bytes (``1000 * m * 1,152`` for SmolLM2); the caller measures ``m`` on real text.
"""

from __future__ import annotations

import errno
import hashlib
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pocketpeft.errors import ConfigError, StoreError

#: Bumped whenever the table layout changes; a file with another value is cleared on open.
SCHEMA = "1"
_PARAMS_PER_QUERY = 500  # stays under SQLite's bound-parameter limit (999 on old builds)
_FP16 = np.dtype("<f2")


class _Corrupt(Exception):
    """Internal: SQLite says the file is not a database or is malformed."""


def _is_corrupt(e: sqlite3.DatabaseError) -> bool:
    code = getattr(e, "sqlite_errorcode", None)  # Python >= 3.11
    if code is not None:
        return code & 0xFF in (11, 26)  # SQLITE_CORRUPT, SQLITE_NOTADB
    msg = str(e).lower()
    return "malformed" in msg or "not a database" in msg


def _store_error(what: str, e: BaseException) -> StoreError:
    reason = "the disk is full" if getattr(e, "errno", None) == errno.ENOSPC or "full" in str(e) else str(e)
    return StoreError(f"{what}: {reason}")


def row_digest(ids: np.ndarray) -> bytes:
    """sha256 of one row's token ids as int64 little-endian bytes (the cache key of that row)."""
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).digest()


def _checksum(digest: bytes, t: int, h: int, blob: bytes) -> bytes:
    c = hashlib.blake2b(digest, digest_size=32)
    c.update(f"{t}x{h}".encode())
    c.update(blob)
    return c.digest()


def _as_rows(rows: Any, what: str = "rows") -> np.ndarray:
    a = np.asarray(rows)
    if a.ndim != 2 or a.shape[1] == 0 or a.dtype.kind not in "iu":
        raise ConfigError(f"{what} must be integer token ids shaped [R, T] with T >= 1, got {a.dtype} {a.shape}")
    return a.astype("<i8", copy=False)


class HiddenCache:
    """Prefix hidden states (float16 ``[T, hidden_size]``) per packed row, in one SQLite file.

    ``path`` is the database file (its directory is created); ``key`` names what the states depend
    on, e.g. ``f"{base_sha256}:{manifest_sha256}:{split_layer}"``; at most ``max_bytes`` of blobs
    are kept (least recently used go first). Raises :class:`ConfigError` for an empty ``key`` or a
    non-positive ``hidden_size``/``max_bytes`` and :class:`StoreError` when the file can't be
    created or written. A file of another key/hidden size is cleared, a corrupt one recreated
    (counted in :meth:`stats`). Safe to share between threads (one connection behind a lock).
    After :meth:`close` or :meth:`wipe` the next call reopens the file (an empty one after wipe).
    """

    def __init__(self, path: "str | os.PathLike", key: str, hidden_size: int, max_bytes: int = 64 << 20) -> None:
        for name, v in (("hidden_size", hidden_size), ("max_bytes", max_bytes)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(key, str) or not key.strip():
            raise ConfigError(f"key must be a non-empty string naming what the hidden states depend on, got {key!r}")
        self.path = Path(path)
        self.key, self.hidden_size, self.max_bytes = key, int(hidden_size), int(max_bytes)
        self._lock = threading.RLock()
        self._counts = dict.fromkeys(
            ("hits", "misses", "dropped_corrupt", "skipped_overflow", "cleared", "recreated"), 0
        )
        self._db: sqlite3.Connection | None = None
        self._clock = 0
        with self._lock:
            self._conn()

    # ------------------------------------------------------------------ opening
    def _files(self) -> list[Path]:
        return [Path(f"{self.path}{s}") for s in ("", "-wal", "-shm", "-journal")]

    def _remove_files(self) -> list[str]:
        removed = []
        for p in self._files():
            try:
                if p.exists():
                    p.unlink()
                    removed.append(p.name)
            except OSError as e:
                raise _store_error(f"cannot delete {p}", e) from e
        return removed

    def _conn(self) -> sqlite3.Connection:
        """The open connection; opens the file first if needed, clearing or recreating it."""
        if self._db is None:
            for attempt in range(3):  # at most: corrupt -> recreated, then ok (or stale -> cleared, then ok)
                try:
                    db = self._connect()
                except _Corrupt as e:
                    if attempt == 2:
                        raise StoreError(f"cannot open the hidden-state cache {self.path}: {e}") from e
                    self._counts["recreated"] += 1
                    self._remove_files()
                    continue
                if isinstance(db, sqlite3.Connection):
                    self._db = db
                    break
                self._counts["cleared"] += db
                self._remove_files()
            else:
                raise StoreError(f"cannot open the hidden-state cache {self.path}: it keeps failing its checks")
        return self._db

    def _connect(self) -> "sqlite3.Connection | int":
        """A connection to a file of this identity, or, when the file holds another key, hidden size
        or schema, the number of entries it holds (closed; the caller deletes it)."""
        identity = {"schema": SCHEMA, "key": self.key, "hidden_size": str(self.hidden_size)}
        db = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # only takes effect on a new file
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # a cache: a kill keeps commits, power loss may drop the last
            db.execute("PRAGMA journal_size_limit=8388608")
            ok = db.execute("PRAGMA quick_check(1)").fetchone()[0]
            if ok != "ok":
                raise sqlite3.DatabaseError(f"database disk image is malformed ({ok})")
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            have = dict(db.execute("SELECT key, value FROM meta").fetchall()) if "meta" in tables else identity
            if any(have.get(k) != v for k, v in identity.items()):  # another key: start afresh
                stale = db.execute("SELECT COUNT(*) FROM entries").fetchone()[0] if "entries" in tables else 0
                db.close()
                return stale
            db.execute("BEGIN IMMEDIATE")
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.execute(
                "CREATE TABLE IF NOT EXISTS entries (id INTEGER PRIMARY KEY, digest BLOB NOT NULL UNIQUE, "
                "t INTEGER NOT NULL, h INTEGER NOT NULL, nbytes INTEGER NOT NULL, checksum BLOB NOT NULL, "
                "used INTEGER NOT NULL, data BLOB NOT NULL)"
            )
            db.execute("CREATE INDEX IF NOT EXISTS entries_used ON entries (used)")
            db.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)", identity.items())
            db.execute("COMMIT")
            self._clock = db.execute("SELECT COALESCE(MAX(used), 0) FROM entries").fetchone()[0]
        except sqlite3.DatabaseError as e:
            if db is not None:
                db.close()
            if _is_corrupt(e):
                raise _Corrupt(str(e)) from e
            raise _store_error(f"cannot open the hidden-state cache {self.path}", e) from e
        except OSError as e:
            raise _store_error(f"cannot create the hidden-state cache in {self.path.parent}", e) from e
        return db

    def _run(self, what: str, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """``fn(db)`` under the lock; a corrupt file is recreated once and ``fn`` retried on it."""
        with self._lock:
            for attempt in (0, 1):
                db = self._conn()
                try:
                    return fn(db)
                except sqlite3.DatabaseError as e:
                    if db.in_transaction:
                        try:
                            db.execute("ROLLBACK")
                        except sqlite3.DatabaseError:
                            pass
                    if not _is_corrupt(e) or attempt:
                        raise _store_error(f"{what} {self.path}", e) from e
                    self._counts["recreated"] += 1
                    self.close()
                    self._remove_files()

    def close(self) -> None:
        """Close the database (checkpointing the WAL); the next call reopens it."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> "HiddenCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ reading
    def get(self, ids: np.ndarray) -> np.ndarray | None:
        """The cached float16 ``[T, H]`` hidden state of one row of token ids ``[T]``, or ``None``."""
        a = np.asarray(ids)
        if a.ndim != 1:
            raise ConfigError(f"ids must be one row of token ids shaped [T], got shape {a.shape}")
        return self.get_many(a[None])[0]

    def get_many(self, rows: np.ndarray) -> list[np.ndarray | None]:
        """The cached float16 ``[T, H]`` state of each row of ``rows`` ``[R, T]`` (``None`` = miss).

        An entry whose checksum, length or shape is wrong or that holds non-finite values is
        deleted and reported as a miss. Hits become the most recently used."""
        r = _as_rows(rows)
        digests = [row_digest(x) for x in r]
        found = self._lookup(digests, r.shape[1])
        return [found.get(d) for d in digests]

    def _lookup(self, digests: list[bytes], t: int) -> dict[bytes, np.ndarray]:
        """Valid entries among ``digests`` (counting hits/misses per digest asked)."""
        h = self.hidden_size
        uniq = list(dict.fromkeys(digests))

        def fn(db: sqlite3.Connection) -> tuple[dict[bytes, np.ndarray], list[bytes]]:
            found, bad = {}, []
            for i in range(0, len(uniq), _PARAMS_PER_QUERY):
                part = uniq[i : i + _PARAMS_PER_QUERY]
                marks = ",".join("?" * len(part))
                q = f"SELECT digest, t, h, nbytes, checksum, data FROM entries WHERE digest IN ({marks})"
                for dg, et, eh, nb, ck, blob in db.execute(q, part).fetchall():
                    dg, blob = bytes(dg), bytes(blob)
                    ok = (et, eh, nb, len(blob)) == (t, h, t * h * 2, t * h * 2) and ck == _checksum(dg, t, h, blob)
                    arr = np.frombuffer(blob, dtype=_FP16).reshape(t, h) if ok else None
                    if arr is None or not np.isfinite(arr).all():
                        bad.append(dg)
                    else:
                        found[dg] = arr.copy()
            if found or bad:
                db.execute("BEGIN IMMEDIATE")
                db.executemany("DELETE FROM entries WHERE digest = ?", [(d,) for d in bad])
                touched = [(self._tick(), d) for d in uniq if d in found]
                db.executemany("UPDATE entries SET used = ? WHERE digest = ?", touched)
                db.execute("COMMIT")
            return found, bad

        found, bad = self._run("cannot read the hidden-state cache", fn)
        hits = sum(d in found for d in digests)
        with self._lock:
            self._counts["dropped_corrupt"] += len(bad)
            self._counts["hits"] += hits
            self._counts["misses"] += len(digests) - hits
        return found

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    # ------------------------------------------------------------------ writing
    def put_many(self, rows: np.ndarray, hidden: np.ndarray) -> None:
        """Store ``hidden`` ``[R, T, H]`` (any float dtype, kept as float16) for ``rows`` ``[R, T]``.

        One transaction per call; then least-recently-used entries are evicted until the blobs
        fit ``max_bytes``. A row whose values are non-finite or beyond float16's range is not
        stored (counted in ``stats()["skipped_overflow"]``). Raises :class:`ConfigError` for
        mismatched shapes and :class:`StoreError` when the file can't be written."""
        r = _as_rows(rows)
        hid = np.asarray(hidden)
        if hid.shape != (*r.shape, self.hidden_size) or hid.dtype.kind != "f":
            raise ConfigError(
                f"hidden must be floats shaped [R, T, H] = {(*r.shape, self.hidden_size)}, got {hid.dtype} {hid.shape}"
            )
        self._put([row_digest(x) for x in r], hid)

    def _put(self, digests: list[bytes], hidden: np.ndarray) -> np.ndarray:
        """Store rows; returns them as float16 (rows not stored included as cast)."""
        with np.errstate(over="ignore", invalid="ignore"):
            h16 = hidden.astype(_FP16)
        finite = np.isfinite(h16).all(axis=(1, 2))
        _, t, h = h16.shape
        items = [(d, h16[i].tobytes()) for i, d in enumerate(digests) if finite[i]]

        def fn(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT OR REPLACE INTO entries (digest, t, h, nbytes, checksum, used, data) VALUES (?,?,?,?,?,?,?)",
                [(d, t, h, len(b), _checksum(d, t, h, b), self._tick(), b) for d, b in items],
            )
            self._evict(db)
            db.execute("COMMIT")
            self._vacuum(db)

        with self._lock:
            self._counts["skipped_overflow"] += int((~finite).sum())
        if items:
            self._run("cannot write to the hidden-state cache", fn)
        return h16

    def _evict(self, db: sqlite3.Connection) -> None:
        total = db.execute("SELECT COALESCE(SUM(nbytes), 0) FROM entries").fetchone()[0]
        if total <= self.max_bytes:
            return
        cut = None
        for used, nb in db.execute("SELECT used, nbytes FROM entries ORDER BY used").fetchall():
            if total <= self.max_bytes:
                break
            total, cut = total - nb, used
        db.execute("DELETE FROM entries WHERE used <= ?", (cut,))

    def _vacuum(self, db: sqlite3.Connection) -> None:
        """Give free pages back to the file system once they exceed a quarter of the cap (freed pages
        are reused by the next insert, so a cache at its cap doesn't vacuum every call)."""
        free = db.execute("PRAGMA freelist_count").fetchone()[0] * db.execute("PRAGMA page_size").fetchone()[0]
        if free > max(self.max_bytes // 4, 1 << 20):
            db.execute("PRAGMA incremental_vacuum").fetchall()

    def hidden_for(
        self,
        rows: np.ndarray,
        compute: Callable[[np.ndarray], np.ndarray],
        batch: int = 8,
        progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """Float16 ``[R, T, H]`` prefix states of ``rows`` ``[R, T]``: cached rows are read, the
        others computed by ``compute(rows_subset [b, T]) -> float [b, T, H]`` in chunks of at most
        ``batch`` distinct rows, stored (one transaction per chunk) and returned. Identical rows
        are looked up and computed once. ``progress(n_done, n_total)`` counts distinct rows: once
        after the lookup and after each chunk. A computed row that doesn't fit float16 is returned
        as cast (with inf/nan; check ``np.isfinite``) and not stored. Raises :class:`ConfigError`
        for bad shapes or ``batch``, including a ``compute`` result of the wrong shape."""
        if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch <= 0:
            raise ConfigError(f"batch must be a positive integer, got {batch!r}")
        r = _as_rows(rows)
        n, t = r.shape
        h = self.hidden_size
        digests = [row_digest(x) for x in r]
        first = {}
        for i, d in enumerate(digests):
            first.setdefault(d, i)
        uniq = list(first)
        have = self._lookup(uniq, t)
        todo = [d for d in uniq if d not in have]
        done = len(uniq) - len(todo)
        if progress is not None:
            progress(done, len(uniq))
        for s in range(0, len(todo), batch):
            part = todo[s : s + batch]
            sub = r[[first[d] for d in part]]
            got = np.asarray(compute(sub))
            if got.shape != (len(part), t, h) or got.dtype.kind != "f":
                raise ConfigError(
                    f"compute returned {got.dtype} {got.shape} for {len(part)} rows; expected floats shaped "
                    f"{(len(part), t, h)}"
                )
            h16 = self._put(part, got)
            have.update(zip(part, h16))
            done += len(part)
            if progress is not None:
                progress(done, len(uniq))
        out = np.empty((n, t, h), dtype=np.float16)
        for i, d in enumerate(digests):
            out[i] = have[d]
        return out

    # ------------------------------------------------------------------ bookkeeping
    def stats(self) -> dict[str, int]:
        """``entries``, ``bytes`` of blobs, ``max_bytes``, ``file_bytes`` on disk (database + WAL),
        and since this object was made: ``hits``, ``misses``, ``dropped_corrupt`` (entries that
        failed their checks), ``skipped_overflow`` (rows not stored: beyond float16),
        ``cleared`` (entries discarded on open: another key, hidden size or schema) and
        ``recreated`` (times the file was unreadable and made anew)."""

        def fn(db: sqlite3.Connection) -> tuple[int, int]:
            return db.execute("SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM entries").fetchone()

        with self._lock:
            n, b = self._run("cannot read the hidden-state cache", fn)
            file_bytes = sum(p.stat().st_size for p in self._files() if p.exists())
            return {"entries": n, "bytes": b, "max_bytes": self.max_bytes, "file_bytes": file_bytes, **self._counts}

    def wipe(self) -> dict[str, Any]:
        """Close and delete the database and its WAL/shm files. Returns what was removed:
        ``entries``, ``bytes`` of blobs and the ``files`` deleted. The cache stays usable: the
        next call creates an empty file."""
        with self._lock:
            st = self.stats()
            self.close()
            files = self._remove_files()
        return {"entries": st["entries"], "bytes": st["bytes"], "files": files}
