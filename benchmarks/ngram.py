"""A simple word n-gram keyboard model: the scale the quality benchmark sets LoRA against.

A word trigram with stupid backoff (Brants et al. 2007: backoff factor 0.4, no smoothing), the
model classic phone keyboards personalize by counting the user's own words. It offers the same
``suggest(prefix, k)`` as a Session, so :func:`pocketpeft.runtime.keystrokes.keystroke_metrics`
scores it with exactly the protocol the language model is scored with: words as
``message_words`` defines them, compared case-insensitively, completing the partial word.

    base = NGram(general_texts)              # other people's messages
    mine = base.personalized(train_texts)    # the same counts plus the user's own text
"""

from __future__ import annotations

import bisect
import heapq
from collections import Counter, defaultdict
from typing import Iterable

from pocketpeft.runtime.keystrokes import message_words

BOS = "<s>"
BACKOFF = 0.4


def words_of(text: str) -> list[str]:
    """The lowercased words of one message, as the keystroke metrics see them."""
    return [w.lower() for _, w, _ in message_words(" ".join(text.split()))]


class NGram:
    """Word trigram counts with stupid-backoff scoring; ``weight`` multiplies the counts of
    texts added through :meth:`personalized` (the user's text counts more than the crowd's)."""

    def __init__(self, texts: Iterable[str] = (), weight: float = 1.0) -> None:
        self.uni: Counter = Counter()
        self.bi: dict[str, Counter] = defaultdict(Counter)
        self.tri: dict[tuple[str, str], Counter] = defaultdict(Counter)
        self._sorted: list[str] | None = None
        self.add(texts, weight)

    def add(self, texts: Iterable[str], weight: float = 1.0) -> "NGram":
        for text in texts:
            ws = words_of(text)
            ctx = [BOS, BOS] + ws
            for i, w in enumerate(ws):
                u, v = ctx[i], ctx[i + 1]
                self.uni[w] += weight
                self.bi[v][w] += weight
                self.tri[(u, v)][w] += weight
        self._sorted = None
        return self

    def personalized(self, texts: Iterable[str], weight: float = 3.0) -> "NGram":
        """A copy of this model with ``texts`` added at ``weight``."""
        out = NGram()
        out.uni = Counter(self.uni)
        out.bi = defaultdict(Counter, {k: Counter(v) for k, v in self.bi.items()})
        out.tri = defaultdict(Counter, {k: Counter(v) for k, v in self.tri.items()})
        return out.add(texts, weight)

    def _vocab(self) -> list[str]:
        if self._sorted is None:
            self._sorted = sorted(self.uni)
        return self._sorted

    def _with_prefix(self, p: str) -> list[str]:
        vocab = self._vocab()
        lo = bisect.bisect_left(vocab, p)
        hi = bisect.bisect_left(vocab, p + "\U0010ffff")
        return vocab[lo:hi]

    def suggest(self, prefix: str, k: int = 3) -> list[str]:
        """The ``k`` most likely next words given the message typed so far (``prefix``): the
        partial last word, if any, is completed; words before it are the context."""
        text = " ".join(prefix.split()) + (" " if prefix[-1:].isspace() else "")
        cut = text.rfind(" ") + 1
        partial = text[cut:].lower()
        ws = words_of(text[:cut])
        u, v = ([BOS, BOS] + ws)[-2:]
        total = sum(self.uni.values()) or 1
        scores: dict[str, float] = {}
        for ctr, factor in ((self.tri.get((u, v)), 1.0), (self.bi.get(v), BACKOFF)):
            if not ctr:
                continue
            n = sum(ctr.values())
            for w, c in ctr.items():
                if w.startswith(partial) and w not in scores:
                    scores[w] = factor * c / n
        # unigram backoff: the most frequent words with this prefix (enough to fill k)
        cands = heapq.nlargest(k, self._with_prefix(partial), key=self.uni.__getitem__) if partial else \
            [w for w, _ in self.uni.most_common(k)]
        for w in cands:
            scores.setdefault(w, BACKOFF * BACKOFF * self.uni[w] / total)
        return [w for w, _ in sorted(scores.items(), key=lambda kv: -kv[1])[:k]]
