"""Keyboard suggestions: the ``k`` most likely next words for the message typed so far.

- :mod:`.tokens`: the token index (which tokens continue, end or match a typed word);
- :mod:`.cost`: the cost model that keeps batched and prefetch passes inside their time;
- :mod:`.decoder`: the recomputing decoder for backends without ``decoder()``;
- :mod:`.search`: :class:`Predictor`, the best-first search over token paths.
"""

from __future__ import annotations

from .decoder import RecomputeDecoder
from .search import MAX_DEADLINE_MS, Predictor, ScoredSuggestions, Suggestions, check_deadline
from .tokens import _PARTIAL, APOSTROPHES, _recase, is_word_char

__all__ = [
    "Predictor",
    "Suggestions",
    "ScoredSuggestions",
    "check_deadline",
    "MAX_DEADLINE_MS",
    "RecomputeDecoder",
    "is_word_char",
    "APOSTROPHES",
    "_PARTIAL",
    "_recase",
]
