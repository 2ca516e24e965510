"""Keyboard suggestions (the search): the ``k`` most likely next words for the message typed so far.

A word is a run of tokens: the first one carries the leading space (byte-level BPE), the
others continue the word (letters, digits, marks, apostrophes: ``don't``, ``i'm``), and it ends
where the next token starts with whitespace, is punctuation, a newline or a special token
(``eos`` separates messages). ``P(word) = prod P(token) * P(a boundary token follows)``.

Search is best-first over token paths consistent with the typed characters: a path's
probability only falls as it grows, so once ``k`` words beat the best unexplored path the answer
is exact (up to ``beam_width`` branches per path, ``max_word_tokens`` tokens per word and
``max_forwards`` new forward passes per call). Log-probs are memoized per token sequence and the
decoder's KV cache is moved by common-prefix truncate/extend, so the next keystroke of the same
word, and the next word once the space is typed, cost few or no forward passes.
:meth:`Predictor.prefetch` spends the idle time between keystrokes searching the likely next
keystrokes ahead, so that most keystrokes are answered from the memo with no forward pass.
Where the decoder can evaluate several branches at once (``branch_logits``), a forward pass the
search needs also evaluates the next paths it would explore: a 1-token pass on a CPU is bound by
reading the weights, so a batch of 8 costs about twice one pass (f32 base, 2 cores).
"""

from __future__ import annotations

import heapq
import re
import time
from collections import OrderedDict
from typing import Callable

import numpy as np

from pocketpeft.errors import ConfigError
from pocketpeft.text import as_text

from ..protocol import SupportsBranchLogits, SupportsDecoder
from .cost import _BATCH_COST, _CostModel
from .decoder import RecomputeDecoder
from .tokens import _PARTIAL, _recase, _vocab_of


class Predictor:
    """Next-word suggestions from a backend's incremental decoder and the bundle's tokenizer.

    Options: ``beam_width`` tokens considered after each path; ``max_word_tokens`` tokens per
    word; ``max_forwards`` new forward passes per :meth:`suggest` call (caps latency; fewer than
    ``k`` words may come back when it runs out); ``min_ratio``: paths less likely than this
    fraction of the best word found are not explored; ``cache_size`` memoized next-token
    distributions; ``batch``: where the decoder has ``branch_logits`` (llamacpp), a forward pass
    that the search needs also evaluates up to ``batch - 1`` of the paths it would explore next,
    all in one pass (each a separate branch of the K/V cache), as many as fit in 2.5x the time
    of a single pass (fitted to the passes so far); ``adapter_version`` a callable whose value
    changes with the weights, e.g. ``lambda: session.adapter_version`` (the caches are then
    dropped; :attr:`Session.adapter_version <pocketpeft.runtime.session.Session.adapter_version>`).

    ``max_context`` bounds the tokens the model sees: a longer message keeps only its last whole
    words that fit (``max_context - max_word_tokens - 1`` tokens, without the message-start
    separator, since the start is no longer in view) and :attr:`last_trimmed` says so.
    Backends without ``decoder()`` (:class:`~..protocol.SupportsDecoder`) get a
    :class:`~.decoder.RecomputeDecoder`, which recomputes the sequence on every forward pass.
    """

    def __init__(
        self,
        backend,
        tokenizer,
        *,
        beam_width: int = 8,
        max_word_tokens: int = 4,
        max_forwards: int = 16,
        min_ratio: float = 1e-3,
        max_context: int = 1024,
        cache_size: int = 256,
        batch: int = 8,
        adapter_version: Callable[[], object] | None = None,
    ) -> None:
        for name, v, least in (
            ("beam_width", beam_width, 1),
            ("max_word_tokens", max_word_tokens, 1),
            ("max_forwards", max_forwards, 1),
            ("cache_size", cache_size, 1),
            ("batch", batch, 1),
            ("max_context", max_context, max_word_tokens + 2),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ConfigError(f"Predictor {name} must be an integer >= {least}, got {v!r}")
        if not (isinstance(min_ratio, (int, float)) and 0 <= min_ratio < 1):
            raise ConfigError(f"Predictor min_ratio must be a number in [0, 1), got {min_ratio!r}")
        self.backend, self.tokenizer = backend, tokenizer
        self.beam_width, self.max_word_tokens, self.max_forwards = beam_width, max_word_tokens, max_forwards
        self.max_context, self.cache_size, self.min_ratio = max_context, cache_size, float(min_ratio)
        self.batch = batch
        self._version_of = adapter_version
        self._version = adapter_version() if adapter_version else None
        self._vocab = _vocab_of(tokenizer)
        self._sep = tokenizer.eos_id if tokenizer.eos_id is not None else 0
        self._memo: OrderedDict[tuple, tuple[np.ndarray, float]] = OrderedDict()
        self._decoder = None
        self._dec_ids: list[int] = []
        self.last_trimmed = False  # the last prefix was longer than max_context
        self.last_forwards = 0  # forward passes (extend calls) of the last suggest
        self.last_forward_tokens = 0  # tokens those passes ran
        self._deadline: float | None = None  # perf_counter() time by which forwards must have ended
        self._ahead: Callable[[], list[tuple]] | None = None  # the search's next paths, best first
        self._cost = _CostModel()

    def reset(self) -> None:
        """Forget memoized distributions and the KV cache (after the weights changed)."""
        self._memo.clear()
        self._decoder, self._dec_ids = None, []

    # ------------------------------------------------------------------ public
    def suggest(self, prefix: str, k: int = 3) -> list[str]:
        """The ``k`` most likely next words after ``prefix``, best first.

        ``prefix`` is the message typed so far. Its text after the last whitespace is the word
        being typed: suggestions complete it (matched case-insensitively, capitalized when it is
        capitalized, upper case when it is all upper case). Empty, or ending in whitespace: the
        next whole word. Raises :class:`InputTextError` for non-text / non-UTF-8 input and
        :class:`ConfigError` for a bad ``k``.
        """
        return [w for w, _ in self.suggest_scored(prefix, k)]

    def suggest_scored(self, prefix: str, k: int = 3) -> list[tuple[str, float]]:
        """Like :meth:`suggest`, with each word's probability of coming next (summed over casings
        and token paths, including the boundary after it)."""
        prefix = as_text(prefix, "prefix")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"k must be a positive integer, got {k!r}")
        if self._version_of is not None:
            v = self._version_of()
            if v != self._version:
                self.reset()
                self._version = v
        context, required, partial = self._parse(prefix)
        self.last_forwards = self.last_forward_tokens = 0
        words = self._search(context, required, k)
        best = sorted(words.values(), key=lambda w: -w[0])[:k]
        return [(_recase(surface, partial), total) for total, _, surface in best]

    def prefetch(self, prefix: str, k: int = 3, seconds: float = 0.2, width: int = 6) -> int:
        """Use idle time between keystrokes to precompute what the next keystrokes will ask.

        The likely next keystrokes are the next character of each of the ``width`` most likely
        words after ``prefix`` (a space where the word is already complete), most probable
        first; each is searched as :meth:`suggest` would, filling the memo and the KV cache, so
        when that keystroke comes its suggestions need few or no forward passes. No forward pass
        starts unless it is expected to end within ``seconds`` (from the timings of recent passes;
        batches shrink to fit), so a keyboard calling this from its idle loop rarely delays the
        next keystroke, and by at most one pass when a pass runs longer than expected. The memo holds
        exact distributions, so suggestions don't depend on prefetching, except that a search
        that would have stopped at ``max_forwards`` can now go further. Returns the number of
        forward passes run. :attr:`last_forwards` and friends still describe the last
        :meth:`suggest` call.
        """
        if not (isinstance(seconds, (int, float)) and seconds >= 0):
            raise ConfigError(f"prefetch seconds must be a number >= 0, got {seconds!r}")
        saved = self.last_forwards, self.last_forward_tokens, self.last_trimmed
        saved_budget, self.max_forwards = self.max_forwards, 1 << 30
        self._deadline = time.perf_counter() + seconds
        spent = 0
        try:
            partial = _PARTIAL.search(as_text(prefix, "prefix")).group()
            seen: set[str] = set()
            queue = [(1.0, prefix)]
            while queue and time.perf_counter() < self._deadline:
                _, text = queue.pop(0)
                if text in seen:
                    continue
                seen.add(text)
                scored = self.suggest_scored(text, max(k, width) if text is prefix else k)
                spent += self.last_forwards
                if text is not prefix:
                    continue
                nxt: dict[str, float] = {}
                for word, p in scored:
                    c = word[len(partial)] if len(word) > len(partial) else " "
                    nxt[prefix + c] = nxt.get(prefix + c, 0.0) + p
                queue.extend(sorted(((p, t) for t, p in nxt.items()), key=lambda x: -x[0]))
        finally:
            self._deadline, self.max_forwards = None, saved_budget
            self.last_forwards, self.last_forward_tokens, self.last_trimmed = saved
        return spent

    # ------------------------------------------------------------------ context
    def _parse(self, prefix: str) -> tuple[tuple[int, ...], bytes, str]:
        """(context ids, lowercased bytes the word must start with, the typed partial word)."""
        m = _PARTIAL.search(prefix)
        partial, before = m.group(), prefix[: m.start()]
        text = before.rstrip()
        self.last_trimmed = False
        if not text:
            return (self._sep,), partial.lower().encode("utf-8"), partial
        newline = "\n" in before[len(text) :]
        required = (partial if newline else " " + partial).lower().encode("utf-8")
        text += "\n" if newline else ""
        budget = self.max_context - self.max_word_tokens - 1  # room for the separator and the word
        if len(text) > budget * 16:  # don't tokenize megabytes per keystroke
            cut = text[-budget * 16 :]
            text, self.last_trimmed = cut[re.search(r"\s|$", cut).start() :], True
        ids = self.tokenizer.encode(text)
        if len(ids) > budget or self.last_trimmed:
            self.last_trimmed = True
            start = max(0, len(ids) - budget)
            words = np.flatnonzero(self._vocab.space_start[ids[start:]])  # keep whole words
            start += int(words[0]) if words.size else 0
            return tuple(ids[start:]), required, partial
        return (self._sep, *ids), required, partial

    # ------------------------------------------------------------------ model
    def _dist(self, seq: tuple) -> tuple[np.ndarray, float] | None:
        """(next-token log-probs, log P(boundary)) after ``seq``; ``None`` when that needs a forward
        pass and the call's budget is spent."""
        hit = self._memo.get(seq)
        if hit is not None:
            self._memo.move_to_end(seq)
            return hit
        if self.last_forwards >= self.max_forwards:
            return None
        if self._deadline is not None and time.perf_counter() + self._cost.predict(1) > self._deadline:
            return None
        if self._decoder is None:
            self._decoder, self._dec_ids = self._new_decoder(), []
        t0 = time.perf_counter()
        if isinstance(self._decoder, SupportsBranchLogits):
            seqs = [seq]
            if self.batch > 1 and self._ahead is not None:
                for cand in self._ahead():
                    if len(seqs) >= self.batch:
                        break
                    if cand not in self._memo and cand not in seqs:
                        seqs.append(cand)
            # a batch may cost up to _BATCH_COST single passes: on a weight-bound base (f32 on a
            # CPU) that is 8 paths, on an arithmetic-bound one (q4_0) about 3
            one = self._cost.predict(1)
            limit = _BATCH_COST * one if one > 0 else None
            if self._deadline is not None:
                left = self._deadline - time.perf_counter()
                limit = left if limit is None else min(limit, left)
            while limit is not None and len(seqs) > 1 and self._cost.predict(len(seqs)) > limit:
                seqs.pop()
            try:
                rows = self._decoder.branch_logits([list(x) for x in seqs])
            except BaseException:
                self._decoder, self._dec_ids = None, []
                raise
            self.last_forward_tokens += int(getattr(self._decoder, "last_tokens", len(seqs)))
        else:
            n = 0
            limit = min(len(self._dec_ids), len(seq) - 1)
            while n < limit and self._dec_ids[n] == seq[n]:
                n += 1
            try:
                self._decoder.truncate(n)
                del self._dec_ids[n:]
                rows = self._decoder.extend(list(seq[n:]))[-1:]
            except BaseException:
                self._decoder, self._dec_ids = None, []
                raise
            self._dec_ids.extend(seq[n:])
            self.last_forward_tokens += len(seq) - n
            seqs = [seq]
        self._cost.add(len(seqs), time.perf_counter() - t0)
        self.last_forwards += 1
        for s, logits in reversed(list(zip(seqs, rows))):  # seq itself last: never evicted here
            self._remember(s, logits)
        return self._memo[seq]

    def _remember(self, seq: tuple, logits: np.ndarray) -> None:
        """Memoize (next-token log-probs, log P(boundary)) from the logits after ``seq``."""
        x = logits.astype(np.float32, copy=False)
        mx = x.max()
        lp = x - (mx + np.log(np.exp(x - mx).sum()))
        b = lp[self._vocab.boundary_ids]
        bm = b.max()
        self._memo[seq] = (lp, float(bm + np.log(np.exp(b - bm).sum())))
        self._memo.move_to_end(seq)
        while len(self._memo) > self.cache_size:
            self._memo.popitem(last=False)

    def _new_decoder(self):
        if isinstance(self.backend, SupportsDecoder):
            try:
                return self.backend.decoder()
            except NotImplementedError:
                pass
        return RecomputeDecoder(self.backend)

    # ------------------------------------------------------------------ search
    def _search(self, context: tuple, required: bytes, k: int) -> dict[str, list]:
        """Best-first search; returns {lowercased word: [total prob, best path prob, surface]}."""
        vocab, words = self._vocab, {}
        heap: list = []
        tick = 0

        def visit(path: tuple, low: bytes, raw: bytes, logp: float) -> None:
            nonlocal tick
            complete = bool(path) and len(low) >= len(required)
            if not complete and len(path) >= self.max_word_tokens:
                return
            dist = self._dist(context + path)
            if dist is None:
                return
            lp, boundary = dist
            if complete:
                text = raw.decode("utf-8", errors="replace").lstrip()
                if "\ufffd" not in text and any(c.isalnum() for c in text):
                    p = float(np.exp(logp + boundary))
                    w = words.setdefault(text.lower(), [0.0, 0.0, text])
                    w[0] += p
                    if p > w[1]:
                        w[1], w[2] = p, text
            if len(path) >= self.max_word_tokens:
                return
            rem = required[len(low) :]
            ids = vocab.consistent(rem) if rem else vocab.cont_ids
            if not path and not required.strip():
                ids = ids[vocab.word_start[ids]]
            if ids.size == 0:
                return
            scores = lp[ids]
            if ids.size > self.beam_width:
                top = np.argpartition(-scores, self.beam_width - 1)[: self.beam_width]
                ids, scores = ids[top], scores[top]
            order = np.argsort(-scores, kind="stable")
            children = [(logp + float(scores[i]), int(ids[i])) for i in order]
            tick += 1
            heapq.heappush(heap, (-children[0][0], tick, path, low, raw, children, 0))

        def ahead() -> list[tuple]:
            """Sequences of the paths the search would visit next, best first, that can still
            matter (the same cut-offs as the loop below)."""
            totals = sorted(w[0] for w in words.values())
            floor = max(totals[-1] * self.min_ratio if totals else 0.0, totals[-k] if len(totals) >= k else 0.0)
            found = []
            for _, _, path, low, _, children, i in heap:
                for logp, tok in children[i : i + self.batch]:
                    if np.exp(logp) <= floor:
                        break
                    child = path + (tok,)
                    if len(child) < self.max_word_tokens or len(low) + len(vocab.low[tok]) >= len(required):
                        found.append((-logp, context + child))
            found.sort()
            return [seq for _, seq in found]

        self._ahead = ahead
        try:
            visit((), b"", b"", 0.0)
            while heap:
                neg, _, path, low, raw, children, i = heapq.heappop(heap)
                bound, totals = float(np.exp(-neg)), sorted(w[0] for w in words.values())
                if totals and (bound < totals[-1] * self.min_ratio or len(totals) >= k and bound <= totals[-k]):
                    break  # no unexplored path can beat the k-th word (or matter)
                if i + 1 < len(children):
                    tick += 1
                    heapq.heappush(heap, (-children[i + 1][0], tick, path, low, raw, children, i + 1))
                logp, tok = children[i]
                visit(path + (tok,), low + vocab.low[tok], raw + vocab.raw[tok], logp)
        finally:
            self._ahead = None
        return words
