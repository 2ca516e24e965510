"""What a personalizer keeps on the device: the user's text and the adapter versions.

:class:`TextStore` holds typed messages in SQLite (WAL mode), bounded by a byte cap (the
oldest rows go first), each with a timestamp and a ``trained`` marker, and next to them the
keyboard's feedback (the words shown before a word and the one tapped, or none), under the same
byte cap; ``wipe()`` deletes it all.
:class:`AdapterStore` keeps accepted adapters as numbered PEFT directories (``versions/<n>/``),
each written aside, fsynced and renamed, and a ``current`` pointer replaced atomically, so a
crash at any moment leaves the last committed version whole and loadable.

Both record the base model's sha256 and refuse to open for another base.
"""

from __future__ import annotations

import errno
import hashlib
import heapq
import json
import os
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

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
from pocketpeft.text import as_text, validate_texts

#: ``trained`` marker values of a text row, and ``state`` values of a feedback row.
NEW, TRAINED, REJECTED = 0, 1, 2
_STATES = {NEW: "new", TRAINED: "trained", REJECTED: "rejected"}

#: at most this many words shown in one feedback entry
MAX_SHOWN = 16
#: at most this many UTF-8 bytes in one shown word
MAX_WORD_BYTES = 128

#: ``PRAGMA user_version`` of the text store's layout: 0 = ``meta`` + ``texts`` (stores made
#: before feedback existed, which gain the ``feedback`` table on open), 1 = with ``feedback``.
SCHEMA_VERSION = 1


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


@dataclass(frozen=True)
class FeedbackRow:
    """One keyboard feedback entry: the words ``shown`` after ``prefix`` and the one tapped
    (``chosen``, always spelled as in ``shown``), or ``None`` when all were ignored. ``state`` is
    :data:`NEW`, :data:`TRAINED` or :data:`REJECTED`, as a message's ``trained`` marker."""

    id: int
    ts: float
    prefix: str
    shown: list[str]
    chosen: str | None
    state: int


def _word(value: Any, what: str) -> str:
    w = as_text(value, what)
    if not w:
        raise InputTextError(f"{what} is empty: expected a word")
    if any(c.isspace() or ord(c) < 0x20 or c == "\x7f" for c in w):
        raise InputTextError(f"{what} {w[:40]!r} contains whitespace or control characters: expected one word")
    size = len(w.encode("utf-8"))
    if size > MAX_WORD_BYTES:
        raise InputTextError(f"{what} is {size} bytes; at most {MAX_WORD_BYTES} are kept per word")
    return w


class TextStore:
    """The user's messages and keyboard feedback in one SQLite file (WAL journal), together at
    most ``max_bytes``.

    ``path`` is the database file; its directory is created. ``base_sha256`` ties the store to
    one base model. Raises :class:`BaseModelMismatchError` when the file belongs to another base,
    :class:`StoreError` when it can't be created or read, :class:`ConfigError` for bad limits.
    Safe to share between threads (one connection behind a lock).

    Byte cap: a message counts its UTF-8 bytes; a feedback entry counts the UTF-8 bytes of its
    prefix, of its shown words as stored (a JSON list) and of the chosen word. When a write takes
    the sum of both over ``max_bytes``, the oldest entries go first, messages and feedback alike,
    in the order they were added (not by their timestamps, which callers may set).

    A store made before feedback existed (no ``feedback`` table) gains the table when opened.
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
            if row is None or row[0] == self.base_sha256:  # (a foreign store is left as it is)
                # feedback (schema 1; also the migration of a schema-0 store). ``after_text`` is
                # the texts id sequence when the entry was added: the entry is newer than texts
                # rows with id <= after_text and older than the rest, which orders both tables
                # for the byte cap.
                db.execute(
                    "CREATE TABLE IF NOT EXISTS feedback (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                    "ts REAL NOT NULL, prefix TEXT NOT NULL, shown TEXT NOT NULL, chosen TEXT, "
                    "bytes INTEGER NOT NULL, after_text INTEGER NOT NULL, state INTEGER NOT NULL DEFAULT 0)"
                )
                if db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
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
                self._enforce_cap()
                self._db.execute("COMMIT")
            except sqlite3.DatabaseError as e:
                self._rollback()
                raise _store_error(f"cannot write to the text store {self.path}", e) from e
            return ids

    def _enforce_cap(self) -> None:
        """Inside a write transaction: drop the oldest messages and feedback (in the order they
        were added, both tables merged) until their bytes together fit ``max_bytes``."""
        db = self._db
        total = (
            db.execute("SELECT COALESCE(SUM(bytes), 0) FROM texts").fetchone()[0]
            + db.execute("SELECT COALESCE(SUM(bytes), 0) FROM feedback").fetchone()[0]
        )
        if total <= self.max_bytes:
            return
        # a text row's place is (id, 0); a feedback row's is (after_text, 1, id): after the
        # texts it followed, before the next ones. Both cursors are already in that order.
        tc = db.execute("SELECT id, 0, 0, bytes FROM texts ORDER BY id")
        fc = db.execute("SELECT after_text, 1, id, bytes FROM feedback ORDER BY id")
        cut_text = cut_feedback = None
        try:
            for key, kind, fid, b in heapq.merge(tc, fc):
                if total <= self.max_bytes:
                    break
                total -= b
                if kind == 0:
                    cut_text = key
                else:
                    cut_feedback = fid
        finally:
            tc.close()
            fc.close()
        if cut_text is not None:
            db.execute("DELETE FROM texts WHERE id <= ?", (cut_text,))
        if cut_feedback is not None:
            db.execute("DELETE FROM feedback WHERE id <= ?", (cut_feedback,))

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

    # ------------------------------------------------------------------ feedback
    def add_feedback(
        self,
        prefix: "str | bytes",
        shown: "Sequence[str | bytes]",
        chosen: "str | bytes | None",
        timestamp: float | None = None,
    ) -> int:
        """Store one keyboard feedback entry as :data:`NEW`; returns its row id.

        ``prefix`` is the text before the word (may be empty), at most ``max_message_bytes``
        UTF-8 bytes, without NUL. ``shown`` lists the 1 to :data:`MAX_SHOWN` words the keyboard
        offered, in its order: each a non-empty word of at most :data:`MAX_WORD_BYTES` UTF-8 bytes
        with no whitespace or control characters, no two equal ignoring case. ``chosen`` is the
        word tapped, or ``None`` when all were ignored; it must equal one of ``shown`` ignoring
        case, and is stored spelled as in ``shown`` (a keyboard that capitalizes the word it
        inserts still names the suggestion it showed). ``bytes`` must be UTF-8. The oldest
        messages and feedback are dropped past ``max_bytes`` (see the class).

        Raises :class:`InputTextError` for any bad argument (nothing is stored), and
        :class:`StoreError` when the database can't be written.
        """
        p = as_text(prefix, "prefix")
        if "\x00" in p:
            raise InputTextError("prefix contains NUL bytes; expected text, got binary data")
        size = len(p.encode("utf-8"))
        if size > self.max_message_bytes:
            raise InputTextError(f"prefix is {size} bytes; at most {self.max_message_bytes} are kept per prefix")
        if isinstance(shown, (str, bytes, bytearray)) or not isinstance(shown, Iterable):
            raise InputTextError(f"shown is a {type(shown).__name__}: expected a list of words")
        words = [_word(w, f"shown[{i}]") for i, w in enumerate(shown)]
        if not words:
            raise InputTextError("shown is empty: expected the words the keyboard showed")
        if len(words) > MAX_SHOWN:
            raise InputTextError(f"shown has {len(words)} words; at most {MAX_SHOWN} are kept")
        folded: dict[str, str] = {}
        for w in words:
            if w.casefold() in folded:
                raise InputTextError(f"shown lists {folded[w.casefold()]!r} and {w!r}: words must differ ignoring case")
            folded[w.casefold()] = w
        if chosen is not None:
            c = _word(chosen, "chosen")
            if c.casefold() not in folded:
                raise InputTextError(f"chosen {c!r} is not one of the words shown {words!r}")
            chosen = folded[c.casefold()]
        shown_json = json.dumps(words, ensure_ascii=False, separators=(",", ":"))
        nbytes = size + len(shown_json.encode("utf-8")) + (len(chosen.encode("utf-8")) if chosen else 0)
        if nbytes > self.max_bytes:
            raise InputTextError(f"feedback entry is {nbytes} bytes; the store holds at most {self.max_bytes}")
        ts = time.time() if timestamp is None else float(timestamp)
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'texts'").fetchone()
                rid = self._db.execute(
                    "INSERT INTO feedback (ts, prefix, shown, chosen, bytes, after_text) VALUES (?, ?, ?, ?, ?, ?)",
                    (ts, p, shown_json, chosen, nbytes, row[0] if row else 0),
                ).lastrowid
                self._enforce_cap()
                self._db.execute("COMMIT")
            except sqlite3.DatabaseError as e:
                self._rollback()
                raise _store_error(f"cannot write to the text store {self.path}", e) from e
            return int(rid)

    def feedback_rows(self, states: "int | Iterable[int] | None" = None) -> list[FeedbackRow]:
        """Feedback entries oldest first (only those in ``states``, one state or several, if set)."""
        where, args = "", ()
        if states is not None:
            args = (states,) if isinstance(states, int) else tuple(states)
            where = f"WHERE state IN ({','.join('?' * len(args))})" if args else "WHERE 0"
        rows = self._q(f"SELECT id, ts, prefix, shown, chosen, state FROM feedback {where} ORDER BY id", args)
        return [FeedbackRow(i, ts, p, json.loads(s), c, st) for i, ts, p, s, c, st in rows]

    def mark_feedback(self, ids: "Iterable[int]", state: int) -> None:
        """Set the ``state`` (:data:`NEW`, :data:`TRAINED`, :data:`REJECTED`) of feedback rows
        ``ids`` (one transaction; ids no longer stored are skipped). Raises :class:`ConfigError`
        for another state."""
        if isinstance(state, bool) or not isinstance(state, int) or state not in _STATES:
            raise ConfigError(f"feedback state must be NEW (0), TRAINED (1) or REJECTED (2), got {state!r}")
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("UPDATE feedback SET state = ? WHERE id = ?", [(state, int(i)) for i in ids])
                self._db.execute("COMMIT")
            except sqlite3.DatabaseError as e:
                self._rollback()
                raise _store_error(f"cannot write to the text store {self.path}", e) from e

    def feedback_stats(self) -> dict[str, int]:
        """``feedback`` entries, their ``bytes`` (as counted against ``max_bytes``), and counts per
        state (``new``, ``trained``, ``rejected``). :meth:`stats` counts the messages; the cap
        holds for ``stats()["bytes"] + feedback_stats()["bytes"]``."""
        n, b = self._q("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM feedback")[0]
        by = dict(self._q("SELECT state, COUNT(*) FROM feedback GROUP BY state"))
        return {"feedback": n, "bytes": b, **{name: by.get(k, 0) for k, name in _STATES.items()}}

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
        """Delete every stored message and feedback entry: the database file and its WAL/shm
        files are removed, then an empty store is created in their place. Returns what was
        removed: ``messages``, ``bytes`` of text, the ``files`` deleted, and the ``feedback``
        entries with their ``feedback_bytes``."""
        with self._lock:
            st, fb = self.stats(), self.feedback_stats()
            paths = [Path(f"{self.path}{suffix}") for suffix in ("", "-wal", "-shm", "-journal")]
            files = [p.name for p in paths if p.exists()]
            self._db.close()  # (sqlite removes the WAL itself on a clean close)
            for p in paths:
                try:
                    p.unlink(missing_ok=True)
                except OSError as e:
                    raise _store_error(f"cannot delete {p}", e) from e
            self._db = self._connect()
        return {
            "messages": st["messages"],
            "bytes": st["bytes"],
            "files": files,
            "feedback": fb["feedback"],
            "feedback_bytes": fb["bytes"],
        }


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
