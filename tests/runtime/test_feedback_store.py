"""Keyboard feedback in the text store: round trip, validation (nothing stored on error), the
shared byte cap (oldest first across messages and feedback), wipe (no trace left in the files),
migration of a store made before feedback existed, and writes from several threads."""

import json
import sqlite3
import threading

import pytest

from pocketpeft.errors import BaseModelMismatchError, ConfigError, InputTextError
from pocketpeft.runtime.keyboard.store import (
    MAX_SHOWN,
    MAX_WORD_BYTES,
    NEW,
    REJECTED,
    SCHEMA_VERSION,
    TRAINED,
    FeedbackRow,
    TextStore,
)

BASE = "a" * 64


def _fb_bytes(prefix, shown, chosen):
    """The documented size of a feedback entry: prefix + shown as compact JSON + chosen (UTF-8)."""
    js = json.dumps(shown, ensure_ascii=False, separators=(",", ":"))
    return len(prefix.encode()) + len(js.encode()) + len((chosen or "").encode())


def test_feedback_round_trip_states_and_reopen(tmp_path):
    st = TextStore(tmp_path / "t.sqlite", BASE)
    st.add("a message")
    a = st.add_feedback("see you ", ["tomorrow", "later", "soon"], "later", timestamp=10.0)
    b = st.add_feedback(b"caf\xc3\xa9 ", [b"au", "lait", "crème"], None)
    c = st.add_feedback("", ["Hello", "hi"], "hello")  # chosen matches ignoring case
    assert a < b < c
    rows = st.feedback_rows()
    assert rows[0] == FeedbackRow(a, 10.0, "see you ", ["tomorrow", "later", "soon"], "later", NEW)
    assert (rows[1].prefix, rows[1].shown, rows[1].chosen) == ("café ", ["au", "lait", "crème"], None)
    assert rows[2].chosen == "Hello" and rows[2].prefix == ""  # stored as spelled in shown
    assert all(r.chosen is None or r.chosen in r.shown for r in rows)

    st.mark_feedback([a, c], TRAINED)
    st.mark_feedback([b, 12345], REJECTED)  # unknown ids are skipped
    assert [r.id for r in st.feedback_rows(TRAINED)] == [a, c]
    assert [r.id for r in st.feedback_rows([NEW, REJECTED])] == [b]
    assert st.feedback_rows([]) == []
    want_bytes = sum(_fb_bytes(r.prefix, r.shown, r.chosen) for r in rows)
    assert st.feedback_stats() == {"feedback": 3, "bytes": want_bytes, "new": 0, "trained": 2, "rejected": 1}
    # messages are untouched and counted apart
    assert [r.text for r in st.rows()] == ["a message"] and st.stats()["messages"] == 1
    with pytest.raises(ConfigError):
        st.mark_feedback([a], 7)
    st.close()

    st = TextStore(tmp_path / "t.sqlite", BASE)  # survives reopening
    assert [(r.id, r.state) for r in st.feedback_rows()] == [(a, TRAINED), (b, REJECTED), (c, TRAINED)]
    st.close()
    # an independent reader (sqlite3 itself) sees the committed rows
    db = sqlite3.connect(tmp_path / "t.sqlite")
    assert db.execute("SELECT shown, chosen FROM feedback WHERE id = ?", (a,)).fetchone() == (
        '["tomorrow","later","soon"]',
        "later",
    )
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


BAD = {
    "empty shown": ("p", [], None),
    "shown is a str": ("p", "word", None),
    "shown is bytes": ("p", b"word", None),
    "shown is None": ("p", None, None),
    "empty word": ("p", ["ok", ""], None),
    "space in word": ("p", ["two words"], None),
    "tab in word": ("p", ["a\tb"], None),
    "newline in word": ("p", ["a\n"], None),
    "NUL in word": ("p", ["a\x00b"], None),
    "word not UTF-8": ("p", ["ok", b"\xff\xfe"], None),
    "word not text": ("p", ["ok", 3], None),
    "word too long": ("p", ["x" * (MAX_WORD_BYTES + 1)], None),
    "duplicate words": ("p", ["Hi", "there", "hi"], None),
    "too many words": ("p", [f"w{i}" for i in range(MAX_SHOWN + 1)], None),
    "chosen not shown": ("p", ["a", "b"], "c"),
    "chosen empty": ("p", ["a", "b"], ""),
    "chosen not UTF-8": ("p", ["a", "b"], b"\xff"),
    "chosen not text": ("p", ["a", "b"], 1),
    "prefix not UTF-8": (b"\xc3\x28", ["a"], None),
    "prefix binary": ("bin\x00ary", ["a"], None),
    "prefix not text": (42, ["a"], None),
    "prefix too long": ("x" * 5000, ["a"], None),
    "lone surrogate": ("p\udcff", ["a"], None),
}


@pytest.mark.parametrize("prefix,shown,chosen", list(BAD.values()), ids=list(BAD))
def test_bad_feedback_is_typed_and_stores_nothing(tmp_path, prefix, shown, chosen):
    st = TextStore(tmp_path / "t.sqlite", BASE, max_message_bytes=4096)
    st.add("kept")
    keep = st.add_feedback("kept ", ["one"], "one")
    before = st.feedback_stats()
    with pytest.raises(InputTextError):
        st.add_feedback(prefix, shown, chosen)
    assert [r.id for r in st.feedback_rows()] == [keep] and st.feedback_stats() == before
    assert [r.text for r in st.rows()] == ["kept"]


def test_feedback_bigger_than_the_cap_is_refused(tmp_path):
    st = TextStore(tmp_path / "t.sqlite", BASE, max_bytes=60, max_message_bytes=40)
    st.add("old message")
    with pytest.raises(InputTextError, match="at most 60"):
        st.add_feedback("x" * 40, ["word1", "word2", "word3"], None)  # 40 + 25 bytes > 60
    assert st.feedback_rows() == [] and [r.text for r in st.rows()] == ["old message"]


def test_byte_cap_drops_oldest_across_messages_and_feedback(tmp_path):
    cap = 200
    st = TextStore(tmp_path / "t.sqlite", BASE, max_bytes=cap, max_message_bytes=60)
    model = []  # (kind, what, bytes) in insertion order: what the store must keep

    def check():
        while sum(b for _, _, b in model) > cap:
            model.pop(0)
        assert [r.text for r in st.rows()] == [w for k, w, _ in model if k == "m"]
        assert [r.prefix for r in st.feedback_rows()] == [w for k, w, _ in model if k == "f"]
        total = st.stats()["bytes"] + st.feedback_stats()["bytes"]
        assert total == sum(b for _, _, b in model) and total <= cap

    for i in range(30):
        if i % 3 == 2:
            prefix, shown, chosen = f"prefix {i:02d} ", ["alpha", "beta", f"w{i}"], ("beta" if i % 2 else None)
            # an old timestamp does not make it go first: the order is the order of adding
            st.add_feedback(prefix, shown, chosen, timestamp=0.0)
            model.append(("f", prefix, _fb_bytes(prefix, shown, chosen)))
        else:
            text = f"message number {i:02d}"
            st.add(text)
            model.append(("m", text, len(text)))
        check()
    assert st.feedback_rows() and st.rows()  # both kinds are still there
    # a large feedback entry pushes out several messages; a large message pushes out feedback
    big = "y" * 60
    st.add_feedback(big, ["z"], "z")
    model.append(("f", big, _fb_bytes(big, ["z"], "z")))
    check()
    st.add_many(["m" * 60, "n" * 60])
    model += [("m", "m" * 60, 60), ("m", "n" * 60, 60)]
    check()
    st.close()
    st = TextStore(tmp_path / "t.sqlite", BASE, max_bytes=cap, max_message_bytes=60)
    check()  # the order survives reopening


def test_wipe_removes_feedback_and_leaves_no_trace(tmp_path):
    d = tmp_path / "store"
    st = TextStore(d / "t.sqlite", BASE)
    st.add_many(["private one", "private two"])
    for i in range(50):
        st.add_feedback(f"zebrasecret prefix {i} ", ["quokkaword", "otherword"], "quokkaword")
    assert (d / "t.sqlite-wal").exists()
    out = st.wipe()
    assert out["messages"] == 2 and out["feedback"] == 50 and out["feedback_bytes"] > 0
    assert "t.sqlite" in out["files"] and "t.sqlite-wal" in out["files"]
    assert st.feedback_rows() == [] and st.feedback_stats()["feedback"] == 0 and st.rows() == []
    for p in d.iterdir():  # whatever is there now (the new empty store) holds none of it
        raw = p.read_bytes()
        assert b"zebrasecret" not in raw and b"quokka" not in raw and b"private" not in raw, p.name
    assert st.add_feedback("after ", ["wipe"], "wipe") > 0  # the new store works
    st.close()
    for p in d.iterdir():
        assert b"zebrasecret" not in p.read_bytes(), p.name


def _old_store(path):
    """A store as written before feedback existed: meta + texts only, WAL, user_version 0."""
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute(
        "CREATE TABLE texts (id INTEGER PRIMARY KEY AUTOINCREMENT, text TEXT NOT NULL, "
        "bytes INTEGER NOT NULL, ts REAL NOT NULL, trained INTEGER NOT NULL DEFAULT 0)"
    )
    db.execute("INSERT INTO meta VALUES ('base_sha256', ?)", (BASE,))
    db.executemany(
        "INSERT INTO texts (text, bytes, ts, trained) VALUES (?, ?, ?, ?)",
        [("old one", 7, 1.0, TRAINED), ("old two", 7, 2.0, NEW)],
    )
    db.close()


def test_old_store_is_migrated(tmp_path):
    path = tmp_path / "t.sqlite"
    _old_store(path)
    st = TextStore(path, BASE, max_bytes=60, max_message_bytes=40)
    assert [(r.text, r.trained) for r in st.rows()] == [("old one", TRAINED), ("old two", NEW)]
    assert st.feedback_rows() == [] and st.feedback_stats()["feedback"] == 0
    fid = st.add_feedback("old ", ["two", "three"], "two")  # 4 + 15 + 3 = 22 bytes: 36 in all
    st.add("a newer message")  # 15 bytes: 51
    # the cap counts both, and the pre-migration messages are the oldest
    st.add_feedback("more ", ["words"], None)  # 5 + 9 = 14 bytes -> 65: "old one" (7) goes
    assert [r.text for r in st.rows()] == ["old two", "a newer message"]
    assert [r.id for r in st.feedback_rows()][0] == fid
    st.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")} >= {"feedback", "texts"}
    db.close()


def test_old_store_of_another_base_is_refused_untouched(tmp_path):
    path = tmp_path / "t.sqlite"
    _old_store(path)
    with pytest.raises(BaseModelMismatchError, match="belongs to base"):
        TextStore(path, "b" * 64)
    db = sqlite3.connect(path)
    assert "feedback" not in {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    db.close()


def test_store_whose_feedback_table_was_dropped_gains_it_again(tmp_path):
    path = tmp_path / "t.sqlite"
    st = TextStore(path, BASE)
    st.add("hello")
    st.close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("DROP TABLE feedback")
    db.execute("PRAGMA user_version = 0")
    db.close()
    st = TextStore(path, BASE)
    assert [r.text for r in st.rows()] == ["hello"]
    st.add_feedback("hello ", ["world"], "world")
    assert [r.shown for r in st.feedback_rows()] == [["world"]]
    st.close()


@pytest.mark.parametrize("cap", [16 << 20, 600])
def test_feedback_from_two_threads(tmp_path, cap):
    st = TextStore(tmp_path / "t.sqlite", BASE, max_bytes=cap, max_message_bytes=100)
    n = 100
    ids: dict[int, list[int]] = {0: [], 1: []}
    errors = []
    start = threading.Barrier(2)

    def work(k):
        try:
            start.wait()
            for i in range(n):
                ids[k].append(st.add_feedback(f"thread {k} item {i} ", [f"t{k}", f"i{i}"], f"t{k}" if i % 2 else None))
                if i % 10 == 0:
                    st.add(f"message from thread {k} number {i}")
        except Exception as e:  # reported below
            errors.append(e)

    ts = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    assert len(set(ids[0]) | set(ids[1])) == 2 * n  # every add got its own row
    rows = st.feedback_rows()
    assert [r.id for r in rows] == sorted(r.id for r in rows)
    for k in (0, 1):  # each thread's surviving entries are a tail of what it added, in order
        mine = [r.id for r in rows if r.prefix.startswith(f"thread {k} ")]
        assert mine == ids[k][len(ids[k]) - len(mine) :]
    total = st.stats()["bytes"] + st.feedback_stats()["bytes"]
    assert total <= cap
    if cap > 1 << 20:
        assert len(rows) == 2 * n and st.stats()["messages"] == 2 * (n // 10)
    st.close()
