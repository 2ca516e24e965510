"""User text: validation, reading files, packing into training rows, and the offline
chitchat corpus (PyPI ``chitchat-dataset``) split per sender by time."""

from __future__ import annotations

import importlib.util
import json
import os
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .errors import InputTextError, MissingDependencyError

IGNORE = -100


def as_text(value: "str | bytes", what: str = "text") -> str:
    """``value`` as ``str``: bytes are decoded as UTF-8; lone surrogates are refused.

    Raises :class:`InputTextError` naming ``what`` for non-UTF-8 bytes or a non-text value.
    """
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputTextError(f"{what} is not valid UTF-8 (byte {e.start}: {bytes(value)[e.start:e.start + 4]!r})") from None
    if not isinstance(value, str):
        raise InputTextError(f"{what} is a {type(value).__name__}, expected str")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates, e.g. from surrogateescape decoding
        raise InputTextError(f"{what} is not valid UTF-8 ({e.reason} at {e.start})") from None
    return value


def validate_texts(texts: "str | bytes | Iterable[str | bytes]", what: str = "texts") -> list[str]:
    """Return the non-blank messages of ``texts`` as ``str``.

    Accepts one string or an iterable of strings; ``bytes`` must be UTF-8. Raises
    :class:`InputTextError` naming ``what`` for non-UTF-8 or binary input, non-text items, or
    when nothing but blank text remains.
    """
    items = [texts] if isinstance(texts, (str, bytes, bytearray)) else list(texts)
    out = []
    for i, t in enumerate(items):
        t = as_text(t, f"{what}[{i}]")
        if "\x00" in t:
            raise InputTextError(f"{what}[{i}] contains NUL bytes; expected text, got binary data")
        if t.strip():
            out.append(t)
    if not out:
        raise InputTextError(f"{what} is empty: expected at least one non-blank message")
    return out


def read_text_file(path: "str | os.PathLike", max_bytes: int = 512 << 20) -> list[str]:
    """Read a UTF-8 text file, one message per line, blank lines dropped; ``-`` reads stdin.

    Raises :class:`InputTextError` (non-UTF-8, binary, empty, larger than ``max_bytes``) or
    :class:`ModelFileNotFoundError` naming the file.
    """
    import sys

    from .errors import ModelFileNotFoundError

    if str(path) == "-":
        raw = sys.stdin.buffer.read(max_bytes + 1)
        name = "standard input"
    else:
        p = Path(path)
        if not p.is_file():
            raise ModelFileNotFoundError(f"text file {p} not found")
        if p.stat().st_size > max_bytes:
            raise InputTextError(f"text file {p} is {p.stat().st_size} bytes; at most {max_bytes} are accepted")
        raw, name = p.read_bytes(), str(p)
    if len(raw) > max_bytes:
        raise InputTextError(f"{name} has more than {max_bytes} bytes of text")
    if b"\x00" in raw:
        raise InputTextError(f"{name} contains NUL bytes: expected UTF-8 text, got binary data")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputTextError(f"{name} is not valid UTF-8 (byte offset {e.start})") from None
    return validate_texts(text.splitlines(), what=name)


def pack_rows(tokenizer, texts: Sequence[str], seq_len: int, pad_to_full: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize messages and pack them into rows for next-token training.

    Every message is preceded by the end-of-text token (the model learns where a message
    starts), the stream is cut into rows of ``seq_len + 1`` tokens overlapping by one, and
    returns ``(input_ids, labels)`` int64 arrays [rows, seq_len] with ``labels[t]`` the target
    for position ``t`` (``-100`` on padding). The last partial row is padded.
    """
    sep = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    stream: list[int] = []
    for t in texts:
        stream.append(sep)
        stream.extend(tokenizer.encode(t))
    n = max(1, -(-(len(stream) - 1) // seq_len))
    total = n * seq_len + 1
    ids = np.full(total, sep, dtype=np.int64)
    ids[: len(stream)] = stream
    valid = np.zeros(total, dtype=bool)
    valid[: len(stream)] = True
    inputs = np.lib.stride_tricks.sliding_window_view(ids[:-1], seq_len)[::seq_len].copy()
    targets = np.lib.stride_tricks.sliding_window_view(ids[1:], seq_len)[::seq_len].copy()
    tvalid = np.lib.stride_tricks.sliding_window_view(valid[1:], seq_len)[::seq_len]
    targets[~tvalid] = IGNORE
    if not pad_to_full:
        keep = tvalid.all(axis=1)
        inputs, targets = inputs[keep], targets[keep]
    return inputs, targets


# ---------------------------------------------------------------- chitchat (offline corpus)

@dataclass(frozen=True)
class Message:
    text: str
    timestamp: str
    sender: str


@lru_cache(maxsize=1)
def chitchat_messages() -> dict[str, list[Message]]:
    """All chitchat messages grouped by sender, each list in time order.

    Raises :class:`MissingDependencyError` if ``chitchat-dataset`` isn't installed.
    """
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("chitchat-dataset is not installed; install it with: "
                                     "pip install 'pocketpeft[data]'")
    path = Path(spec.submodule_search_locations[0]) / "dataset.json"
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    by_sender: dict[str, list[Message]] = defaultdict(list)
    for conv in data.values():
        for turn in conv["messages"]:
            for m in turn:
                if m.get("text", "").strip():
                    by_sender[m["sender"]].append(Message(m["text"], m["timestamp"], m["sender"]))
    for msgs in by_sender.values():
        msgs.sort(key=lambda m: m.timestamp)
    return dict(by_sender)


def top_senders(min_words: int = 5000) -> list[str]:
    """Senders with at least ``min_words`` words, most prolific first (ties by id)."""
    counts = {s: sum(len(m.text.split()) for m in msgs) for s, msgs in chitchat_messages().items()}
    return sorted((s for s, c in counts.items() if c >= min_words), key=lambda s: (-counts[s], s))


def sender_split(sender: str, test_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """(train, test) texts of one sender: earlier messages train, the latest ``test_fraction`` test."""
    msgs = chitchat_messages().get(sender)
    if not msgs:
        raise InputTextError(f"unknown chitchat sender {sender!r}")
    cut = int(round(len(msgs) * (1 - test_fraction)))
    return [m.text for m in msgs[:cut]], [m.text for m in msgs[cut:]]


def general_texts(exclude: Iterable[str] = (), n: int = 2000, seed: int = 0) -> list[str]:
    """A fixed sample of other people's messages (for general-text checks), excluding ``exclude`` senders."""
    ex = set(exclude)
    pool = [m.text for s, msgs in sorted(chitchat_messages().items()) if s not in ex for m in msgs]
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
    return [pool[i] for i in sorted(idx)]
