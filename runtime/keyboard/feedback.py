"""From keyboard feedback to preference pairs: what an update's DPO loss learns from.

Each feedback entry (:meth:`TextStore.add_feedback <.store.TextStore.add_feedback>`) is a bar of
words shown after a prefix and the one tapped, or none:

- **tapped**: the tapped word is preferred over each other word on the bar;
- **all ignored**: the word the user went on to type (read from the stored message that starts
  with the prefix) is preferred over each word on the bar; when no stored message has the prefix
  (it was dropped, wiped, or never sent) the entry gives no pair.

The pair's context is the prefix without the partially typed word: the words are whole words
(:class:`~..preference.Preference`).
"""

from __future__ import annotations

from typing import Iterable, Sequence

from ..keystrokes import message_words
from ..predictor import _PARTIAL
from ..preference import Preference
from .store import FeedbackRow


def _norm(text: str) -> str:
    """Whitespace runs collapsed to one space (as the keystroke metrics type a message), a
    trailing one kept."""
    out = " ".join(text.split())
    return out + " " if text[-1:].isspace() and out else out


def typed_word(prefix: str, messages: Iterable[str]) -> str | None:
    """The word the user typed at the end of ``prefix``: from the newest of ``messages`` that
    starts with ``prefix`` (whitespace collapsed), the word being typed there; ``None`` if none."""
    p = _norm(prefix)
    start = len(p) - len(_PARTIAL.search(p).group())
    for msg in reversed(list(messages)):
        m = " ".join(msg.split())
        if not m.startswith(p):
            continue
        for s, word, _ in message_words(m):
            if s == start:
                return word
        return None
    return None


def preferences_from_feedback(
    rows: Sequence[FeedbackRow], messages: Sequence[str]
) -> tuple[list[Preference], list[int]]:
    """The preference pairs of feedback ``rows`` (see the module docstring) and, per pair, the id
    of the entry it came from. ``messages``: the stored messages, oldest first."""
    prefs: list[Preference] = []
    ids: list[int] = []
    for r in rows:
        partial = _PARTIAL.search(r.prefix).group()
        context = r.prefix[: len(r.prefix) - len(partial)]
        chosen = r.chosen if r.chosen is not None else typed_word(r.prefix, messages)
        if chosen is None or not any(c.isalnum() for c in chosen):
            continue
        for w in r.shown:
            if w.lower() != chosen.lower():
                prefs.append(Preference(context, chosen, w))
                ids.append(r.id)
    return prefs, ids
