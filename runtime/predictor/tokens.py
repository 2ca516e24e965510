"""The token index of the predictor: which tokens continue a word, end one, or match typed text.

Built once per tokenizer (:func:`vocab_of`) so per-keystroke filtering is vectorized; also the
small text helpers the keyboard shares (:func:`is_word_char`, :data:`_PARTIAL`, :func:`_recase`).
"""

from __future__ import annotations

import bisect
import re
import unicodedata
import weakref
from collections import OrderedDict

import numpy as np

APOSTROPHES = "'\u2019"
_PARTIAL = re.compile(r"\S*\Z")


def is_word_char(c: str) -> bool:
    """Letters, digits, combining marks and apostrophes make up words."""
    return c.isalnum() or c in APOSTROPHES or unicodedata.category(c).startswith("M")


class _Vocab:
    """Facts about every token, computed once per tokenizer (vectorized filtering per keystroke).

    ``low``: lowercased bytes; a sorted index over them answers "which tokens are consistent with
    these remaining characters"; ``tail`` is where a token's all-word-character suffix starts
    (a token may run past the typed characters only with word characters).
    """

    def __init__(self, tokenizer) -> None:
        n = tokenizer.vocab_size
        special = {i for i, t in tokenizer.hf.get_added_tokens_decoder().items() if t.special}
        self.raw: list[bytes] = _all_token_bytes(tokenizer)
        texts: list[str | None] = []
        for b in self.raw:
            try:
                texts.append(b.decode("utf-8"))
            except UnicodeDecodeError:  # a piece of a multi-byte character
                texts.append(None)
        word = {c for c in set("".join(t.lower() for t in texts if t)) if is_word_char(c)}
        self.low: list[bytes] = []
        tail = np.zeros(n, np.int32)
        cont, boundary = np.zeros(n, bool), np.zeros(n, bool)
        for i, (b, s) in enumerate(zip(self.raw, texts)):
            if s is None:  # matches typed bytes only, never runs past them
                self.low.append(b.lower())
                tail[i] = len(b)
                boundary[i] = bool(b) and b[0] < 0x80 and chr(b[0]) not in word
                continue
            low = s.lower()
            self.low.append(low.encode("utf-8"))
            j = len(low)
            while j > 0 and low[j - 1] in word:
                j -= 1
            tail[i] = len(low[:j].encode("utf-8")) if j else 0
            if i in special or not s:
                boundary[i] = i in special
            elif j == 0:
                cont[i] = True
            elif s[0] not in word and s[0].lower() not in word:
                boundary[i] = True
        self.tail = tail
        self.cont_ids = np.flatnonzero(cont)
        self.boundary_ids = np.flatnonzero(boundary)
        self.space_start = np.array([b[:1] == b" " for b in self.raw])
        # a suggested word starts with a letter or digit unless the user typed something else
        # (" " alone starts numbers: digits are single tokens)
        self.word_start = np.array(
            [b == b" " or (cont[i] or b[:1] == b" ") and _first_alnum(self.low[i]) for i, b in enumerate(self.raw)]
        )
        keep = [i for i in range(n) if i not in special and self.low[i]]
        order = sorted(keep, key=lambda i: self.low[i])
        self.keys = [self.low[i] for i in order]
        self.key_ids = np.array(order, np.int64)
        self.by_low: dict[bytes, list[int]] = {}
        for i in keep:
            self.by_low.setdefault(self.low[i], []).append(i)
        self.max_len = max(map(len, self.keys))
        self._consistent: OrderedDict[bytes, np.ndarray] = OrderedDict()

    def consistent(self, rem: bytes) -> np.ndarray:
        """Ids of tokens that are a prefix of ``rem`` or extend it with word characters only."""
        hit = self._consistent.get(rem)
        if hit is not None:
            self._consistent.move_to_end(rem)
            return hit
        inside = [i for j in range(1, min(len(rem), self.max_len) + 1) for i in self.by_low.get(rem[:j], ())]
        lo, hi = bisect.bisect_right(self.keys, rem), bisect.bisect_left(self.keys, _successor(rem))
        longer = self.key_ids[lo:hi]
        longer = longer[self.tail[longer] <= len(rem)]
        out = np.concatenate([np.array(inside, np.int64), longer])
        self._consistent[rem] = out
        if len(self._consistent) > 512:
            self._consistent.popitem(last=False)
        return out


def _all_token_bytes(tokenizer) -> list[bytes]:
    """``tokenizer.token_bytes(i)`` for every id, in bulk for byte-level BPE (one C-level
    translate per token instead of a Python loop per character)."""
    from tokenizers import decoders

    from pocketpeft.tokenizer import _unicode_to_bytes

    n = tokenizer.vocab_size
    out: list[bytes | None] = [None] * n
    if isinstance(tokenizer.hf.decoder, decoders.ByteLevel):
        u2b = _unicode_to_bytes()
        alphabet, table = set(u2b), {ord(c): b for c, b in u2b.items()}
        for piece, i in tokenizer.hf.get_vocab(with_added_tokens=True).items():
            if 0 <= i < n and set(piece) <= alphabet:
                out[i] = piece.translate(table).encode("latin-1")
    return [b if b is not None else tokenizer.token_bytes(i) for i, b in enumerate(out)]


def _first_alnum(low: bytes) -> bool:
    """The token (after one leading space) starts with a letter or digit."""
    s = low.decode("utf-8", errors="replace")
    s = s[1:] if s.startswith(" ") else s
    return s[:1].isalnum()


def _successor(b: bytes) -> bytes:
    """The smallest byte string greater than every string that starts with ``b``."""
    b = b.rstrip(b"\xff")
    return b[:-1] + bytes([b[-1] + 1]) if b else b"\xff" * 64


_VOCABS: "weakref.WeakKeyDictionary[object, _Vocab]" = weakref.WeakKeyDictionary()


def _vocab_of(tokenizer) -> _Vocab:
    """The (shared, cached) :class:`_Vocab` of ``tokenizer``."""
    v = _VOCABS.get(tokenizer)
    if v is None:
        v = _VOCABS[tokenizer] = _Vocab(tokenizer)
    return v


def _recase(word: str, partial: str) -> str:
    """``word`` cased like the typed ``partial``: all upper case, capitalized, or as it is."""
    if len(partial) > 1 and partial.isupper():
        return word.upper()
    if partial[:1].isupper():
        return word[:1].upper() + word[1:]
    return word
