"""The user's own words, counted: a word trigram model that learns from every observed message
at once, mixed into the language model's next-word suggestions.

A phone keyboard's oldest personalization trick, and still a strong one: the LoRA update needs
training steps to shift the model towards a user's names, slang and phrases, while counting them
is instant. :class:`WordCounts` keeps trigram counts of messages (words as the keystroke metrics
define them, lowercased) and gives an interpolated next-word distribution,

    p(w | u, v) = (0.6 f(w | u, v) + 0.3 f(w | v) + 0.1 f(w)) / (the weights of the seen contexts)

where f are relative frequencies; :func:`mix_scored` ranks the language model's candidates and the
counts' together by ``(1 - weight) * p_lm + weight * p_counts``. Both are probabilities of the
whole next word given the same context, so restricting to the words that complete the partial
word being typed keeps the mixture's ranking exact.

The counts are derived from text the :class:`~.store.TextStore` already holds on the device;
nothing new leaves it, and ``wipe()`` clears both.
"""

from __future__ import annotations

import bisect
import heapq
from collections import Counter, defaultdict
from typing import Iterable

from ..keystrokes import keystroke_metrics, message_words
from ..predictor import _PARTIAL, _recase

BOS = "<s>"
WEIGHTS = (0.6, 0.3, 0.1)  # trigram, bigram, unigram interpolation
UNIGRAM_CANDIDATES = 20  # most frequent words with the typed prefix considered from the unigrams
WORD_POOL = 4  # the model's candidate words mixed with the counts (each one more costs search)


def words_of(text: str) -> list[str]:
    """The lowercased words of one message, as the keystroke metrics see them."""
    return [w.lower() for _, w, _ in message_words(" ".join(text.split()))]


class WordCounts:
    """Word trigram counts of messages; ``weight`` multiplies the counts of the texts added."""

    def __init__(self, texts: Iterable[str] = (), weight: float = 1.0) -> None:
        self.uni: Counter = Counter()
        self.bi: dict[str, Counter] = defaultdict(Counter)
        self.tri: dict[tuple[str, str], Counter] = defaultdict(Counter)
        self.total = 0.0
        self._sorted: list[str] | None = None  # the vocabulary in order, for prefix ranges
        self._top: list[str] | None = None  # the most frequent words, for an empty prefix
        self.add(texts, weight)

    def __len__(self) -> int:
        """Distinct words seen."""
        return len(self.uni)

    def add(self, texts: Iterable[str], weight: float = 1.0) -> "WordCounts":
        for text in texts:
            ws = words_of(text)
            ctx = [BOS, BOS] + ws
            for i, w in enumerate(ws):
                self.uni[w] += weight
                self.bi[ctx[i + 1]][w] += weight
                self.tri[(ctx[i], ctx[i + 1])][w] += weight
            self.total += weight * len(ws)
        self._sorted = self._top = None
        return self

    def personalized(self, texts: Iterable[str], weight: float = 3.0) -> "WordCounts":
        """A copy of these counts with ``texts`` added at ``weight``."""
        out = WordCounts()
        out.uni = Counter(self.uni)
        out.bi = defaultdict(Counter, {k: Counter(v) for k, v in self.bi.items()})
        out.tri = defaultdict(Counter, {k: Counter(v) for k, v in self.tri.items()})
        out.total = self.total
        return out.add(texts, weight)

    def _with_prefix(self, p: str) -> list[str]:
        if self._sorted is None:
            self._sorted = sorted(self.uni)
        lo = bisect.bisect_left(self._sorted, p)
        return self._sorted[lo : bisect.bisect_left(self._sorted, p + "\U0010ffff")]

    def probs(self, prefix: str) -> dict[str, float]:
        """``{word: p(word comes next)}`` for the words that complete the partial word of
        ``prefix`` (the text after its last whitespace; all words when it ends in whitespace)."""
        text = " ".join(prefix.split()) + (" " if prefix[-1:].isspace() else "")
        cut = text.rfind(" ") + 1
        partial = text[cut:].lower()
        u, v = ([BOS, BOS] + words_of(text[:cut]))[-2:]
        if not self.total:
            return {}
        tables = [
            (lam, ctr, sum(ctr.values()))
            for lam, ctr in zip(WEIGHTS[:2], (self.tri.get((u, v)), self.bi.get(v)))
            if ctr
        ]
        cands = {w for _, ctr, _ in tables for w in ctr if w.startswith(partial)}
        tables.append((WEIGHTS[2], self.uni, self.total))  # unigrams: always seen, total kept by add()
        z = sum(lam for lam, _, _ in tables)
        if partial:
            cands.update(heapq.nlargest(UNIGRAM_CANDIDATES, self._with_prefix(partial), key=self.uni.__getitem__))
        else:
            if self._top is None:
                self._top = [w for w, _ in self.uni.most_common(UNIGRAM_CANDIDATES)]
            cands.update(self._top)
        return {w: sum(lam * ctr.get(w, 0.0) / n for lam, ctr, n in tables) / z for w in cands}

    def suggest(self, prefix: str, k: int = 3) -> list[str]:
        """The ``k`` most likely next words by the counts alone."""
        p = self.probs(prefix)
        return heapq.nlargest(k, p, key=p.__getitem__)


def mix_scored(
    lm: "list[tuple[str, float]]", counts: dict[str, float], prefix: str, weight: float, k: int
) -> list[tuple[str, float]]:
    """The ``k`` best words by ``(1 - weight) * p_lm + weight * p_counts``.

    ``lm``: the language model's (surface word, probability) pairs (as
    :meth:`Predictor.suggest_scored` gives them); ``counts``: :meth:`WordCounts.probs`. Words are
    matched case-insensitively; the language model's casing wins, the counts' words are cased like
    the typed partial word."""
    partial = _PARTIAL.search(prefix).group()
    surface: dict[str, str] = {}
    score: dict[str, float] = {}
    for w, p in lm:
        key = w.lower()
        surface.setdefault(key, w)
        score[key] = score.get(key, 0.0) + (1 - weight) * p
    for key, p in counts.items():
        surface.setdefault(key, _recase(key, partial))
        score[key] = score.get(key, 0.0) + weight * p
    best = heapq.nlargest(k, score, key=score.__getitem__)
    return [(surface[key], score[key]) for key in best]


def keystrokes_with_words(predictor, words: WordCounts, texts, weight: float, k: int = 3) -> tuple[dict, dict]:
    """Keystroke metrics of ``predictor`` alone and mixed with ``words`` at ``weight``, from one
    pass of the model over ``texts`` (each prefix's candidates are computed once and ranked both
    ways, exactly as :meth:`Personalizer.suggest` ranks them)."""
    memo: dict[str, list[tuple[str, float]]] = {}

    def scored(prefix: str) -> list[tuple[str, float]]:
        if prefix not in memo:
            memo[prefix] = predictor.suggest_scored(prefix, max(k, WORD_POOL))
        return memo[prefix]

    alone = keystroke_metrics(lambda p, n: [w for w, _ in scored(p)[:n]], texts, k)
    mixed = keystroke_metrics(
        lambda p, n: [w for w, _ in mix_scored(scored(p), words.probs(p), p, weight, n)], texts, k
    )
    return alone, mixed
