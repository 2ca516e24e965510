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

Deadlines: ``suggest_scored(prefix, k, deadline_ms=...)`` answers within the deadline from what
is ready (memoized distributions and the part of the search that fits; a forward pass starts only
when it is expected to end in time, and while another thread holds the model the search uses the
memo alone) and says whether the answer is complete. A background thread then finishes that
search and searches the likely next keystrokes ahead (:meth:`Predictor.prefetch`'s order), one
pass at a time, until the next request, which never waits for it: while a pass is in flight
the request answers from the memo.
"""

from __future__ import annotations

import atexit
import heapq
import math
import re
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np

from pocketpeft.errors import ConfigError
from pocketpeft.text import as_text

from ..protocol import SupportsBranchLogits, SupportsDecoder
from .cost import _BATCH_COST, _CostModel
from .decoder import RecomputeDecoder
from .tokens import _PARTIAL, _recase, _vocab_of

#: the largest deadline accepted (ms): beyond it a deadline is a mistake, not a keyboard's frame
MAX_DEADLINE_MS = 10_000.0
#: time kept at the end of a deadline for ranking and returning the answer (seconds)
_FINISH_S = 0.0015
#: the most forward passes the background thread runs for one keystroke (a bound on idle work)
_BACKGROUND_FORWARDS = 48


def check_deadline(deadline_ms) -> float | None:
    """``deadline_ms`` as a float, or ``None``; :class:`ConfigError` naming it unless it is a
    finite number in (0, :data:`MAX_DEADLINE_MS`]."""
    if deadline_ms is None:
        return None
    if (
        isinstance(deadline_ms, bool)
        or not isinstance(deadline_ms, (int, float))
        or not math.isfinite(deadline_ms)
        or not 0 < deadline_ms <= MAX_DEADLINE_MS
    ):
        raise ConfigError(
            f"deadline_ms must be a number of milliseconds in (0, {MAX_DEADLINE_MS:g}], got {deadline_ms!r}"
        )
    return float(deadline_ms)


class _Answer(list):
    """A list answer of the predictor with how it was found:

    - ``complete``: the search finished (no forward pass it needed was cut by the deadline,
      ``max_forwards`` or a busy model), so these are the exact best ``k``; ``False``: the best of
      what was ready;
    - ``elapsed_ms``: the time the call took; ``forwards``: the forward passes it ran.
    """

    def __init__(self, items=(), complete: bool = True, elapsed_ms: float = 0.0, forwards: int = 0) -> None:
        super().__init__(items)
        self.complete, self.elapsed_ms, self.forwards = bool(complete), float(elapsed_ms), int(forwards)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self)!r}, complete={self.complete}, elapsed_ms={self.elapsed_ms:.1f})"


class ScoredSuggestions(_Answer):
    """(word, probability of coming next) pairs, best first; see :class:`_Answer` for the attributes."""

    def words(self) -> "Suggestions":
        """The words alone, with the same attributes."""
        return Suggestions([w for w, _ in self], self.complete, self.elapsed_ms, self.forwards)


class Suggestions(_Answer):
    """The suggested words, best first (a ``list`` of ``str``); ``complete``, ``elapsed_ms`` and
    ``forwards`` say how they were found (see :class:`_Answer`)."""


@dataclass
class _Call:
    """The limits and counts of one search (a foreground call, a prefetch, or background work)."""

    max_forwards: int
    deadline: float | None = None  # perf_counter() time by which forward passes must have ended
    end: float | None = None  # perf_counter() time by which the search stops (memo lookups included)
    model: bool = True  # may run forward passes (False: the memo alone)
    cancel: Callable[[], bool] | None = None  # True: stop starting forward passes
    forwards: int = 0
    tokens: int = 0
    cut: bool = False  # a pass the search needed was not run: the answer is not exact
    background: bool = False  # the background thread's work (counted in background_forwards)
    ahead: Callable[[], list[tuple]] | None = None  # the search's next paths, best first


_LIVE: "weakref.WeakSet[Predictor]" = weakref.WeakSet()  # predictors with a background thread


@atexit.register
def _stop_background() -> None:
    """At exit, let background threads finish their pass and end (a daemon thread killed inside
    a native forward pass aborts the process)."""
    for pred in list(_LIVE):
        pred.close()


def _background_loop(ref: "weakref.ref[Predictor]") -> None:
    """The background thread of a predictor, holding it only while there is work."""
    while True:
        pred = ref()
        if pred is None or pred._closed:
            return
        job = pred._next_job(timeout=1.0)
        if job is not None:
            pred._background(*job)
        del pred


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
    dropped; :attr:`Session.adapter_version <pocketpeft.runtime.session.Session.adapter_version>`);
    ``lock``: held around every use of the backend's model (a :class:`~pocketpeft.runtime.session.Session`
    passes its own, so weight swaps wait for a pass and a pass never sees half-swapped weights);
    ``background``: after a call with a deadline, keep searching in a background thread.

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
        lock: "threading.Lock | threading.RLock | None" = None,
        background: bool = True,
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
        self._memo_lock = threading.Lock()  # the memo's dict operations (short)
        self._start: tuple | None = None  # (seq, entry) of the message start: never evicted
        self._pass_ends = 0.0  # perf_counter() time the pass in flight is expected to end
        self._lock = lock if lock is not None else threading.RLock()  # the model, the decoder
        self._decoder = None
        self._dec_ids: list[int] = []
        self._dec_version = self._version  # the weights the decoder's KV cache was computed with
        self.last_trimmed = False  # the last prefix was longer than max_context
        self.last_forwards = 0  # forward passes (extend calls) of the last suggest
        self.last_forward_tokens = 0  # tokens those passes ran
        self._cost = _CostModel()
        self.background = bool(background)
        self._seq = 0  # requests with a deadline so far: background work for an older one stops
        self._job: tuple | None = None  # (prefix, k, seq) for the background thread
        self._job_cv = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closed = False
        self._last: tuple | None = None  # (context, scored) of the last answer: fills a cut one
        self.background_forwards = 0  # forward passes the background thread has run, in all

    def reset(self) -> None:
        """Forget memoized distributions and the KV cache (after the weights changed)."""
        with self._lock:
            with self._memo_lock:
                self._memo.clear()
                self._start = None
            self._decoder, self._dec_ids = None, []

    def close(self) -> None:
        """Stop the background thread (it is a daemon; this only lets it end now)."""
        with self._job_cv:
            self._closed, self._job = True, None
            self._job_cv.notify_all()
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout=5)

    # ------------------------------------------------------------------ public
    def suggest(self, prefix: str, k: int = 3, deadline_ms: float | None = None) -> "Suggestions":
        """The ``k`` most likely next words after ``prefix``, best first.

        ``prefix`` is the message typed so far. Its text after the last whitespace is the word
        being typed: suggestions complete it (matched case-insensitively, capitalized when it is
        capitalized, upper case when it is all upper case). Empty, or ending in whitespace: the
        next whole word. ``deadline_ms``: answer within this time from what is ready, and keep
        searching in the background (see :meth:`suggest_scored`). Returns :class:`Suggestions`
        (a list of words; ``complete`` says whether the search finished). Raises
        :class:`InputTextError` for non-text / non-UTF-8 input and :class:`ConfigError` for a bad
        ``k`` or ``deadline_ms``.
        """
        return self.suggest_scored(prefix, k, deadline_ms).words()

    def suggest_scored(self, prefix: str, k: int = 3, deadline_ms: float | None = None) -> ScoredSuggestions:
        """Like :meth:`suggest`, as (word, probability) pairs: each word's probability of coming
        next (summed over casings and token paths, including the boundary after it).

        Without a deadline the search runs to its end (up to ``max_forwards`` passes), waiting
        for the model if another thread uses it. With ``deadline_ms`` the answer comes within it:
        forward passes run only while they are expected to end in time; when the model is busy
        (the background thread's pass) the call waits for it only if that pass should end in time
        to be used, at most half the deadline, and otherwise searches the memo alone; words the
        search reached but could not finish count by their probability without the boundary (a
        bound); and when fewer than ``k`` words were found, the last answer's words that still fit
        the typed word fill in. An answer that is not the exact search result has
        ``complete=False``; the background thread (``background``) then finishes its search and
        searches the likely next keystrokes until the next request.
        """
        t0 = time.perf_counter()
        prefix = as_text(prefix, "prefix")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"k must be a positive integer, got {k!r}")
        deadline_ms = check_deadline(deadline_ms)
        with self._job_cv:
            self._seq += 1  # background work for the previous keystroke stops before its next pass
            seq = self._seq
        if deadline_ms is None:
            with self._lock:
                call = _Call(self.max_forwards)
                scored = self._suggest_call(prefix, k, call)
            return self._answer(scored, call, t0)
        end = t0 + deadline_ms / 1000
        finish = min(_FINISH_S, deadline_ms / 4000)  # kept for ranking and returning
        one = self._cost.predict(1)
        left = end - time.perf_counter()
        # wait for the model when a pass of ours would still fit after, or when the background's
        # pass in flight ends in time for its result to be used; half the time at most
        wait = max(0.0, min(max(left - finish - one, self._pass_ends - time.perf_counter() + 0.001), left / 2))
        got = self._lock.acquire(timeout=wait) if wait > 0 else self._lock.acquire(blocking=False)
        try:
            call = _Call(self.max_forwards, deadline=end - finish, end=end - finish / 3, model=got)
            scored = self._suggest_call(prefix, k, call)
        finally:
            if got:
                self._lock.release()
        if self.background:
            self._submit(prefix, k, seq)
        return self._answer(scored, call, t0)

    def _answer(self, scored: list[tuple[str, float]], call: _Call, t0: float) -> ScoredSuggestions:
        self.last_forwards, self.last_forward_tokens = call.forwards, call.tokens
        return ScoredSuggestions(scored, not call.cut, 1000 * (time.perf_counter() - t0), call.forwards)

    def _suggest_call(self, prefix: str, k: int, call: _Call) -> list[tuple[str, float]]:
        """The search for one request, under ``call``'s limits (the model lock held when ``call.model``)."""
        if self._version_of is not None:
            v = self._version_of()
            if v != self._version:  # new weights: the memo is stale
                with self._memo_lock:
                    self._memo.clear()
                    self._start = None
                self._version, self._last = v, None
        if call.model and self._dec_version != self._version:  # and so is the KV cache
            self._decoder, self._dec_ids, self._dec_version = None, [], self._version
        context, required, partial = self._parse(prefix)
        words = self._search(context, required, k, call)
        best = sorted(words.values(), key=lambda w: -w[0])[:k]
        scored = [(_recase(surface, partial), total) for total, _, surface in best]
        last = self._last
        if call.cut and len(scored) < k and last is not None and last[0] == context:
            # the words the last answer for this message had that still fit the typed word
            have = {w.lower() for w, _ in scored}
            low = partial.lower()
            for w, p in last[1]:
                if len(scored) >= k:
                    break
                if w.lower().startswith(low) and w.lower() not in have:
                    scored.append((_recase(w, partial), p))
                    have.add(w.lower())
        if scored:
            self._last = (context, scored)
        return scored

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
        :meth:`suggest` call. (With deadlines, the background thread does this by itself.)
        """
        if not (isinstance(seconds, (int, float)) and seconds >= 0):
            raise ConfigError(f"prefetch seconds must be a number >= 0, got {seconds!r}")
        prefix = as_text(prefix, "prefix")
        with self._lock:
            call = _Call(1 << 30, deadline=time.perf_counter() + seconds)
            saved = self.last_trimmed
            try:
                self._ahead_of(prefix, k, width, call)
            finally:
                self.last_trimmed = saved
        return call.forwards

    def _ahead_of(
        self,
        prefix: str,
        k: int,
        width: int,
        call: _Call,
        stop: Callable[[], bool] = lambda: False,
        roots_first: bool = False,
    ) -> None:
        """Search ``prefix`` and then the likely next keystrokes after it, most probable first,
        within ``call``'s limits (the model lock held): the next character of each of the
        ``width`` likeliest words, and a tap on each of the ``k`` suggested ones (the word and a
        space inserted: a new word's context). ``roots_first``: before searching those, run the
        one pass each new context needs for its first tokens (what a cut answer is made of)."""
        partial = _PARTIAL.search(prefix).group()
        before = prefix[: len(prefix) - len(partial)]
        seen: set[str] = set()
        queue = [(1.0, prefix)]
        while queue and not stop():
            _, text = queue.pop(0)
            if text in seen:
                continue
            seen.add(text)
            scored = self._suggest_call(text, max(k, width) if text is prefix else k, call)
            if text is not prefix:
                continue
            nxt: dict[str, float] = {}
            for i, (word, p) in enumerate(scored):
                c = word[len(partial)] if len(word) > len(partial) else " "
                nxt[prefix + c] = nxt.get(prefix + c, 0.0) + p
                if i < k and len(word) > len(partial):
                    tap = before + word + " "
                    nxt[tap] = nxt.get(tap, 0.0) + p
            queue.extend(sorted(((p, t) for t, p in nxt.items()), key=lambda x: -x[0]))
            if roots_first:
                for _, t in queue:
                    if stop():
                        return
                    self._dist(self._parse(t)[0], call)

    # ------------------------------------------------------------------ background
    def _submit(self, prefix: str, k: int, seq: int) -> None:
        with self._job_cv:
            if self._closed:
                return
            self._job = (prefix, k, seq)
            if self._worker is None or not self._worker.is_alive():
                # the thread holds the predictor weakly: a dropped Session frees its model
                self._worker = threading.Thread(
                    target=_background_loop, args=(weakref.ref(self),), name="pocketpeft-predictor", daemon=True
                )
                self._worker.start()
                _LIVE.add(self)
            self._job_cv.notify_all()

    def _next_job(self, timeout: float) -> tuple | None:
        with self._job_cv:
            if self._job is None and not self._closed:
                self._job_cv.wait(timeout)
            job, self._job = self._job, None
            if job is None:
                return None
            return job

    def _background(self, prefix: str, k: int, seq: int) -> None:
        """One request's background work: finish its search, then search the likely next
        keystrokes (:meth:`_ahead_of`), one pass at a time, until a newer request comes (a pass
        in flight then ends first; the request doesn't wait for it: it uses the memo)."""
        stale = lambda: self._seq != seq or self._closed  # noqa: E731
        call = _Call(_BACKGROUND_FORWARDS, cancel=stale, background=True)
        try:
            with self._lock:
                if stale():
                    return
                saved = (self.last_forwards, self.last_forward_tokens, self.last_trimmed)
                try:
                    self._ahead_of(prefix, k, k, call, stop=stale, roots_first=True)
                finally:
                    self.last_forwards, self.last_forward_tokens, self.last_trimmed = saved
        except Exception:  # noqa: BLE001 - a pass that fails here fails again in the foreground
            return

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
    def _dist(self, seq: tuple, call: _Call) -> tuple[np.ndarray, float] | None:
        """(next-token log-probs, log P(boundary)) after ``seq``; ``None`` when that needs a forward
        pass that ``call`` can't run (budget spent, deadline near, model busy, cancelled)."""
        with self._memo_lock:
            hit = self._memo.get(seq)
            if hit is not None:
                self._memo.move_to_end(seq)
                return hit
            if len(seq) == 1 and self._start is not None and self._start[0] == seq:
                return self._start[1]
        if (
            not call.model
            or call.forwards >= call.max_forwards
            or (call.cancel is not None and call.cancel())
            or (call.deadline is not None and time.perf_counter() + self._cost.predict(1) > call.deadline)
        ):
            call.cut = True
            return None
        if self._decoder is None:
            self._decoder, self._dec_ids = self._new_decoder(), []
        t0 = time.perf_counter()
        self._pass_ends = t0 + self._cost.predict(1)  # refined below once the batch is known
        if isinstance(self._decoder, SupportsBranchLogits):
            seqs = [seq]
            if self.batch > 1 and call.ahead is not None:
                for cand in call.ahead():
                    if len(seqs) >= self.batch:
                        break
                    if cand not in self._memo and cand not in seqs:
                        seqs.append(cand)
            # a batch may cost up to _BATCH_COST single passes: on a weight-bound base (f32 on a
            # CPU) that is 8 paths, on an arithmetic-bound one (q4_0) about 3
            one = self._cost.predict(1)
            limit = _BATCH_COST * one if one > 0 else None
            if call.deadline is not None:
                left = call.deadline - time.perf_counter()
                limit = left if limit is None else min(limit, left)
            while limit is not None and len(seqs) > 1 and self._cost.predict(len(seqs)) > limit:
                seqs.pop()
            self._pass_ends = t0 + self._cost.predict(len(seqs))
            try:
                rows = self._decoder.branch_logits([list(x) for x in seqs])
            except BaseException:
                self._decoder, self._dec_ids = None, []
                raise
            call.tokens += int(getattr(self._decoder, "last_tokens", len(seqs)))
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
            call.tokens += len(seq) - n
            seqs = [seq]
        self._cost.add(len(seqs), time.perf_counter() - t0)
        call.forwards += 1
        if call.background:
            self.background_forwards += 1
        for s, logits in reversed(list(zip(seqs, rows))):  # seq itself last: never evicted here
            self._remember(s, logits)
        with self._memo_lock:
            return self._memo[seq]

    def _remember(self, seq: tuple, logits: np.ndarray) -> None:
        """Memoize (next-token log-probs, log P(boundary)) from the logits after ``seq``."""
        x = logits.astype(np.float32, copy=False)
        mx = x.max()
        lp = x - (mx + np.log(np.exp(x - mx).sum()))
        b = lp[self._vocab.boundary_ids]
        bm = b.max()
        entry = (lp, float(bm + np.log(np.exp(b - bm).sum())))
        with self._memo_lock:
            self._memo[seq] = entry
            self._memo.move_to_end(seq)
            if len(seq) == 1:  # a message's start: asked at every new message, kept out of the LRU
                self._start = (seq, entry)
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
    def _search(self, context: tuple, required: bytes, k: int, call: _Call) -> dict[str, list]:
        """Best-first search; returns {lowercased word: [total prob, best path prob, surface]}."""
        vocab, words = self._vocab, {}
        frontier: dict[str, list] = {}  # words reached whose boundary needed a pass that didn't run
        heap: list = []
        tick = 0

        def visit(path: tuple, low: bytes, raw: bytes, logp: float) -> None:
            nonlocal tick
            complete = bool(path) and len(low) >= len(required)
            if not complete and len(path) >= self.max_word_tokens:
                return
            dist = self._dist(context + path, call)
            if dist is None:
                if complete:  # the word's probability without the boundary after it: a bound
                    text = raw.decode("utf-8", errors="replace").lstrip()
                    if "\ufffd" not in text and any(c.isalnum() for c in text):
                        p = float(np.exp(logp))
                        w = frontier.setdefault(text.lower(), [0.0, 0.0, text])
                        w[0] += p
                        if p > w[1]:
                            w[1], w[2] = p, text
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

        call.ahead = ahead
        try:
            visit((), b"", b"", 0.0)
            while heap:
                if call.end is not None and time.perf_counter() > call.end:
                    call.cut = True  # out of time: what was found so far
                    break
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
            call.ahead = None
        if call.cut:  # the best of what was ready: the words reached, by their bounds
            for key, w in frontier.items():
                words.setdefault(key, w)
        return words
