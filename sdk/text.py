"""User text: validation, reading files, packing into training rows (device-safe: numpy only)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .errors import InputTextError

IGNORE = -100


def as_text(value: "str | bytes", what: str = "text") -> str:
    """``value`` as ``str``: bytes are decoded as UTF-8; lone surrogates are refused.

    Raises :class:`InputTextError` naming ``what`` for non-UTF-8 bytes or a non-text value.
    """
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputTextError(
                f"{what} is not valid UTF-8 (byte {e.start}: {bytes(value)[e.start : e.start + 4]!r})"
            ) from None
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
