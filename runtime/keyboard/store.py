"""What a personalizer keeps on the device: the user's text and the adapter versions.

:class:`TextStore` holds typed messages in SQLite (WAL mode), bounded by a byte cap (the
oldest rows go first), each with a timestamp and a ``trained`` marker; ``wipe()`` deletes it all.
:class:`AdapterStore` keeps accepted adapters as numbered PEFT directories (``versions/<n>/``),
each written aside, fsynced and renamed, and a ``current`` pointer replaced atomically, so a
crash at any moment leaves the last committed version whole and loadable.

Both record the base model's sha256 and refuse to open for another base.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pocketpeft.adapter import Adapter, as_float32, load_adapter, save_adapter
from pocketpeft.config import LoraConfig
from pocketpeft.errors import (
    BaseModelMismatchError,
    ConfigError,
    CorruptFileError,
    InputTextError,
    ModelFileNotFoundError,
    StoreError,
)
from pocketpeft.fsutil import write_bytes_atomic
from pocketpeft.text import validate_texts

#: ``trained`` marker values of a text row.
NEW, TRAINED, REJECTED = 0, 1, 2


def _store_error(what: str, e: BaseException) -> StoreError:
    reason = "the disk is full" if getattr(e, "errno", None) == errno.ENOSPC or "full" in str(e) else str(e)
    return StoreError(f"{what}: {reason}")


@dataclass(frozen=True)
class TextRow:
    """One stored message."""

    id: int
    text: str
    timestamp: float
    trained: int


class TextStore:
    """The user's messages in one SQLite file (WAL journal), at most ``max_bytes`` of text.

    ``path`` is the database file; its directory is created. ``base_sha256`` ties the store to
    one base model. Raises :class:`BaseModelMismatchError` when the file belongs to another base,
    :class:`StoreError` when it can't be created or read, :class:`ConfigError` for bad limits.
    Safe to share between threads (one connection behind a lock).
    """

    def __init__(
        self, path: "str | os.PathLike", base_sha256: str, max_bytes: int = 16 << 20, max_message_bytes: int = 16 << 10
    ) -> None:
        for name, v in (("max_bytes", max_bytes), ("max_message_bytes", max_message_bytes)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if max_message_bytes > max_bytes:
            raise ConfigError(f"max_message_bytes ({max_message_bytes}) exceeds max_bytes ({max_bytes})")
        self.path = Path(path)
        self.base_sha256 = base_sha256
        self.max_bytes, self.max_message_bytes = max_bytes, max_message_bytes
        self._lock = threading.RLock()
        self._db = self._connect()

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.execute(
                "CREATE TABLE IF NOT EXISTS texts (id INTEGER PRIMARY KEY AUTOINCREMENT, text TEXT NOT NULL, "
                "bytes INTEGER NOT NULL, ts REAL NOT NULL, trained INTEGER NOT NULL DEFAULT 0)"
            )
            row = db.execute("SELECT value FROM meta WHERE key='base_sha256'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('base_sha256', ?)", (self.base_sha256,))
        except sqlite3.DatabaseError as e:
            raise _store_error(f"cannot open the text store {self.path}", e) from e
        except OSError as e:
            raise _store_error(f"cannot create the text store in {self.path.parent}", e) from e
        if row is not None and row[0] != self.base_sha256:
            db.close()
            raise BaseModelMismatchError(
                f"text store {self.path} belongs to base {row[0][:12]}…, "
                f"not this bundle's base {self.base_sha256[:12]}…"
            )
        return db

    def close(self) -> None:
        """Close the database (checkpointing the WAL)."""
        with self._lock:
            self._db.close()

    def _q(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.DatabaseError as e:
                raise _store_error(f"text store {self.path}", e) from e

    def add(self, text: "str | bytes", timestamp: float | None = None) -> int:
        """Store one message; returns its row id. The oldest rows are dropped past ``max_bytes``.

        Raises :class:`InputTextError` for empty/blank, non-UTF-8 or binary text and for a message
        over ``max_message_bytes``; :class:`StoreError` when the database can't be written.
        """
        return self.add_many([text], timestamp)[0]

    def add_many(self, texts: "list[str | bytes]", timestamp: float | None = None) -> list[int]:
        """Store several messages in one transaction (all or none); returns their row ids.

        Every message is validated first, as in :meth:`add`; one bad message stores nothing.
        """
        msgs = []
        for i, t in enumerate(texts):
            (msg,) = validate_texts([t], what=f"message[{i}]" if len(texts) > 1 else "message")
            size = len(msg.encode("utf-8"))
            if size > self.max_message_bytes:
                raise InputTextError(
                    f"message{f'[{i}]' if len(texts) > 1 else ''} is {size} bytes; at most "
                    f"{self.max_message_bytes} are kept per message"
                )
            msgs.append((msg, size))
        if not msgs:
            raise InputTextError("texts is empty: expected at least one message")
        ts = time.time() if timestamp is None else float(timestamp)
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                ids = [
                    int(self._db.execute("INSERT INTO texts (text, bytes, ts) VALUES (?, ?, ?)", (m, b, ts)).lastrowid)
                    for m, b in msgs
                ]
                total = self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM texts").fetchone()[0]
                if total > self.max_bytes:  # drop the oldest rows until the cap holds
                    cut, acc = None, total
                    for rid, b in self._db.execute("SELECT id, bytes FROM texts ORDER BY id").fetchall():
                        if acc <= self.max_bytes:
                            break
                        acc, cut = acc - b, rid
                    self._db.execute("DELETE FROM texts WHERE id <= ?", (cut,))
                self._db.execute("COMMIT")
            except sqlite3.DatabaseError as e:
                self._rollback()
                raise _store_error(f"cannot write to the text store {self.path}", e) from e
            return ids

    def _rollback(self) -> None:
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.DatabaseError:
                pass

    def rows(self, trained: int | None = None) -> list[TextRow]:
        """All rows oldest first (only those with the given ``trained`` marker if set)."""
        where, args = ("WHERE trained = ?", (trained,)) if trained is not None else ("", ())
        return [TextRow(*r) for r in self._q(f"SELECT id, text, ts, trained FROM texts {where} ORDER BY id", args)]

    def mark(self, ids: "list[int]", trained: int) -> None:
        """Set the ``trained`` marker of rows ``ids`` (one transaction)."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("UPDATE texts SET trained = ? WHERE id = ?", [(trained, i) for i in ids])
                self._db.execute("COMMIT")
            except sqlite3.DatabaseError as e:
                self._rollback()
                raise _store_error(f"cannot write to the text store {self.path}", e) from e

    def stats(self) -> dict[str, int]:
        """``messages``, ``bytes`` of text, and counts per marker (``new``, ``trained``, ``rejected``)."""
        n, b = self._q("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM texts")[0]
        by = dict(self._q("SELECT trained, COUNT(*) FROM texts GROUP BY trained"))
        return {
            "messages": n,
            "bytes": b,
            "new": by.get(NEW, 0),
            "trained": by.get(TRAINED, 0),
            "rejected": by.get(REJECTED, 0),
        }

    def wipe(self) -> dict[str, Any]:
        """Delete every stored message: the database file and its WAL/shm files are removed, then
        an empty store is created in their place. Returns what was removed: ``messages``,
        ``bytes`` of text, and the ``files`` deleted."""
        with self._lock:
            st = self.stats()
            paths = [Path(f"{self.path}{suffix}") for suffix in ("", "-wal", "-shm", "-journal")]
            files = [p.name for p in paths if p.exists()]
            self._db.close()  # (sqlite removes the WAL itself on a clean close)
            for p in paths:
                try:
                    p.unlink(missing_ok=True)
                except OSError as e:
                    raise _store_error(f"cannot delete {p}", e) from e
            self._db = self._connect()
        return {"messages": st["messages"], "bytes": st["bytes"], "files": files}


# ------------------------------------------------------------------------- adapters
def tensors_sha256(tensors: Mapping[str, Any]) -> str:
    """sha256 over sorted names, shapes and float32 bytes of adapter tensors (numpy or torch)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        v = tensors[k]
        a = as_float32(v)
        h.update(k.encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class AdapterVersion:
    """One committed adapter: its number, directory, tensor hash, when, and the metrics it was accepted with."""

    version: int
    path: Path
    sha256: str
    created: float
    metrics: dict[str, Any]


class AdapterStore:
    """Numbered adapter versions in PEFT format under ``root/versions/<n>/`` plus ``root/current``.

    A version's tensor hash and metrics ride in its safetensors metadata, so they are committed
    with the tensors in one rename. ``base_sha256`` (recorded in ``root/store.json``) ties the
    store to one base. Raises :class:`BaseModelMismatchError` for a store of another base and
    :class:`StoreError` when ``root`` can't be created.
    """

    POINTER = "current"

    def __init__(
        self, root: "str | os.PathLike", base_sha256: str, lora: LoraConfig, base_name: str | None = None
    ) -> None:
        self.root = Path(root)
        self.base_sha256, self.lora, self.base_name = base_sha256, lora, base_name
        meta = self.root / "store.json"
        if meta.is_file():
            try:
                recorded = json.loads(meta.read_text(encoding="utf-8"))["base_sha256"]
            except (ValueError, KeyError, TypeError) as e:
                raise CorruptFileError(f"adapter store file {meta} is unreadable: {e}") from e
            if recorded != base_sha256:
                raise BaseModelMismatchError(
                    f"adapter store {self.root} belongs to base {recorded[:12]}…, "
                    f"not this bundle's base {base_sha256[:12]}…"
                )
        else:
            try:
                write_bytes_atomic(meta, (json.dumps({"base_sha256": base_sha256}) + "\n").encode())
            except OSError as e:
                raise _store_error(f"cannot create the adapter store in {self.root}", e) from e
        self._clean_staging()

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    def _clean_staging(self) -> None:
        """Remove what an interrupted commit left aside (staging dirs, temp pointer files)."""
        for d in (self.root, self.versions_dir):
            if d.is_dir():
                for p in d.iterdir():
                    if p.name.startswith(".") and (p.name.endswith(".tmp") or ".old-" in p.name):
                        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def _numbers(self) -> list[int]:
        if not self.versions_dir.is_dir():
            return []
        return sorted(int(p.name) for p in self.versions_dir.iterdir() if p.name.isdigit() and p.is_dir())

    def current_version(self) -> int | None:
        """The committed version the pointer names, or ``None`` before the first commit.

        Raises :class:`CorruptFileError` if the pointer is unreadable (it is only ever replaced
        atomically, so this means outside damage)."""
        p = self.root / self.POINTER
        if not p.is_file():
            return None
        try:
            return int(json.loads(p.read_text(encoding="utf-8"))["version"])
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptFileError(f"adapter pointer {p} is unreadable: {e}") from e

    def _set_current(self, n: int) -> None:
        try:
            write_bytes_atomic(self.root / self.POINTER, (json.dumps({"version": n}) + "\n").encode())
        except OSError as e:
            raise _store_error(
                f"cannot update {self.root / self.POINTER} (version {self.current_version()} stays current)", e
            ) from e

    def commit(self, tensors: Mapping[str, Any], metrics: Mapping[str, Any] | None = None) -> AdapterVersion:
        """Write ``tensors`` (PEFT names, numpy or torch) as the next version and make it current.

        The version directory is staged, fsynced and renamed, then the pointer is replaced
        atomically. Raises :class:`StoreError` (read-only directory, full disk, …); the previously
        current version is then untouched and stays current.
        """
        n = max(self._numbers(), default=0) + 1
        digest = tensors_sha256(tensors)
        meta = {
            "pocketpeft.tensors_sha256": digest,
            "pocketpeft.version": str(n),
            "pocketpeft.created": repr(time.time()),
            "pocketpeft.metrics": json.dumps(dict(metrics or {}), default=float),
        }
        tt = {k: as_float32(v) for k, v in tensors.items()}
        path = self.versions_dir / str(n)
        try:
            self.versions_dir.mkdir(parents=True, exist_ok=True)
            save_adapter(Adapter(self.lora, tt, self.base_sha256, meta), path, base_name=self.base_name)
        except StoreError as e:
            raise StoreError(
                f"cannot commit adapter version {n}: {e} (version {self.current_version()} stays current)"
            ) from e
        except OSError as e:
            raise _store_error(
                f"cannot commit adapter version {n} to {path} (version {self.current_version()} stays current)", e
            ) from e
        self._set_current(n)
        return self.version(n)

    def version(self, n: int) -> AdapterVersion:
        """Version ``n``'s record, its tensors checked against their hash.

        Raises :class:`ModelFileNotFoundError` for an unknown version and :class:`CorruptFileError`
        when its tensors don't match the recorded hash."""
        return self._read(n)[0]

    def load(self, n: int | None = None) -> Adapter:
        """The adapter of version ``n`` (default: the current one), hash-checked.

        Raises :class:`ModelFileNotFoundError` when there is no such version (or none committed)."""
        if n is None:
            n = self.current_version()
            if n is None:
                raise ModelFileNotFoundError(f"adapter store {self.root} has no committed version yet")
        return self._read(n)[1]

    def _read(self, n: int) -> tuple[AdapterVersion, Adapter]:
        path = self.versions_dir / str(n)
        if not path.is_dir():
            raise ModelFileNotFoundError(
                f"adapter version {n} not found in {self.versions_dir} (have: {self._numbers() or 'none'})"
            )
        ad = load_adapter(path, expect_base_sha256=self.base_sha256)
        want = ad.metadata.get("pocketpeft.tensors_sha256")
        got = tensors_sha256(ad.tensors)
        if want != got:
            raise CorruptFileError(f"adapter version {n} in {path}: tensors do not match their recorded sha256")
        metrics = json.loads(ad.metadata.get("pocketpeft.metrics", "{}"))
        created = float(ad.metadata.get("pocketpeft.created", "0"))
        return AdapterVersion(n, path, got, created, metrics), ad

    def list(self) -> list[AdapterVersion]:
        """Every readable version, oldest first, with its metrics (damaged ones are skipped)."""
        out = []
        for n in self._numbers():
            try:
                out.append(self.version(n))
            except (CorruptFileError, ModelFileNotFoundError):
                continue
        return out

    def restore(self, n: int) -> AdapterVersion:
        """Make version ``n`` current again (after checking it loads intact); returns its record."""
        v = self.version(n)
        self._set_current(n)
        return v
