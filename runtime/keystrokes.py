"""Keyboard metrics on held-out messages: next-word accuracy and keystroke savings.

Works with any ``suggest(prefix, k) -> list[str]`` (a Session's, a Predictor's, a stub's).
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

from pocketpeft.errors import ConfigError
from pocketpeft.text import validate_texts

from .predictor import is_word_char

Suggest = Callable[[str, int], "list[str]"]


def message_words(message: str) -> list[tuple[int, str, bool]]:
    """The predictable words of a message as (start offset, word, a space follows the word).

    A word is the leading run of word characters (letters, digits, marks, apostrophes) of a
    whitespace-separated chunk that holds a letter or digit; trailing punctuation (``"6!"``) is
    typed by hand, and chunks like ``":)"`` are not words.
    """
    out = []
    for m in re.finditer(r"\S+", message):
        chunk = m.group()
        n = 0
        while n < len(chunk) and is_word_char(chunk[n]):
            n += 1
        word = chunk[:n]
        if any(c.isalnum() for c in word):
            out.append((m.start(), word, n == len(chunk) and m.end() < len(message)))
    return out


def keystroke_metrics(
    suggest: Suggest, texts: "str | Iterable[str]", k: int = 3, max_messages: int | None = None
) -> dict:
    """Simulate typing each message (whitespace runs collapsed to one space).

    - ``next_word_top1`` / ``next_word_top3``: each word predicted from the words before it in
      its message, nothing of it typed; a hit when it is the first / among the first three
      suggestions (compared case-insensitively).
    - ``keystroke_savings``: the message is typed char by char; before each keystroke of a word
      ``k`` suggestions are offered and if the word is among them the user taps it (1 keystroke)
      instead of typing its remaining characters and the space after it. Savings = characters
      saved (net of taps) / all characters.
    - ``words`` (predicted words), ``chars`` (all characters, spaces and punctuation included),
      ``messages``.

    Raises :class:`InputTextError` for bad text and :class:`ConfigError` for bad ``k`` / ``max_messages``.
    """
    return simulate_typing(suggest, texts, k, max_messages)


def simulate_typing(
    suggest: Suggest,
    texts: "str | Iterable[str]",
    k: int = 3,
    max_messages: int | None = None,
    every_key: bool = False,
    on_key: "Callable[[str, list[str]], None] | None" = None,
    on_word: "Callable[[str, list[str], str | None], None] | None" = None,
) -> dict:
    """The user of :func:`keystroke_metrics`, with its metrics: types each message, tapping a
    suggestion as soon as it is the word being typed.

    ``every_key``: ask for suggestions before every keystroke the user makes (spaces and
    punctuation too, as a keyboard does; the metrics are the same, only more calls are made);
    otherwise only before the keystrokes of words. ``on_key(prefix, offered)`` is called after
    each call (a benchmark's clock). ``on_word(prefix, offered, tapped)`` is called once per word
    with what a keyboard records as feedback: the bar the word was tapped from (``tapped``, as
    spelled there), or the bar shown at the word's start (maybe empty) and ``None`` when the word
    never appeared.
    """
    texts = validate_texts(texts)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    if max_messages is not None:
        if isinstance(max_messages, bool) or not isinstance(max_messages, int) or max_messages < 1:
            raise ConfigError(f"max_messages must be a positive integer or None, got {max_messages!r}")
        texts = texts[:max_messages]
    top1 = top3 = words = chars = saved = 0
    for text in texts:
        msg = " ".join(text.split())
        chars += len(msg)
        pos = 0
        for start, word, space_after in message_words(msg):
            if every_key:
                for j in range(pos, start):  # the spaces and punctuation before the word
                    offered = suggest(msg[:j], k)
                    if on_key is not None:
                        on_key(msg[:j], offered)
            words += 1
            target = word.lower()
            pos = start + len(word)
            first: list[str] = []
            for i in range(len(word)):
                shown = list(suggest(msg[: start + i], max(k, 3) if i == 0 else k))
                if on_key is not None:
                    on_key(msg[: start + i], shown)
                offered = [s.lower() for s in shown]
                if i == 0:
                    top1 += offered[:1] == [target]
                    top3 += target in offered[:3]
                    first = shown[:k]
                if target in offered[:k]:
                    saved += len(word) - i + space_after - 1
                    pos += space_after  # the tap inserts the word and its space
                    if on_word is not None:
                        on_word(msg[: start + i], shown[:k], shown[offered.index(target)])
                    break
            else:
                if on_word is not None:
                    on_word(msg[:start], first, None)
    return {
        "next_word_top1": top1 / max(words, 1),
        "next_word_top3": top3 / max(words, 1),
        "keystroke_savings": saved / max(chars, 1),
        "words": words,
        "chars": chars,
        "messages": len(texts),
    }
