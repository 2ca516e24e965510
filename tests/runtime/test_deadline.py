"""Deadline-bounded suggestions (runtime/predictor/search.py): answers from what is ready, the
background search that finishes the work, the model lock, and the typed errors.

The model is the tiny random Llama on the torch backend; "a slow device" is the same backend with
each forward pass made to take at least SLOW_S (the numbers stay the real model's). Nothing here
asserts a duration: a deadline shows in which passes run, in ``complete`` and in the words.
"""

import gc
import math
import threading
import time
import weakref

import pytest

import pocketpeft as pp
from pocketpeft.errors import ConfigError
from pocketpeft.runtime.predictor import Predictor, ScoredSuggestions, Suggestions

SLOW_S = 0.05
PREFIXES = ["", "see you at the ", "see you at the g", "i don't know what t", "i don't know what ti"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bundle(keyboard_bundle):
    return keyboard_bundle


@pytest.fixture(scope="module")
def sess(bundle):
    return pp.runtime.open(bundle, backend="torch", need_train=False)


class SlowDecoders:
    """The session's backend whose decoders take at least SLOW_S per forward pass."""

    def __init__(self, backend) -> None:
        self.backend, self.name, self.device = backend, backend.name, backend.device

    def logits(self, ids):
        return self.backend.logits(ids)

    def decoder(self):
        d = self.backend.decoder()
        extend = d.extend

        def slow(ids):
            t = time.perf_counter()
            out = extend(ids)
            time.sleep(max(0.0, SLOW_S - (time.perf_counter() - t)))
            return out

        d.extend = slow
        return d


def exact(sess, prefix, k=3):
    return Predictor(sess.backend, sess.tokenizer, max_forwards=64).suggest_scored(prefix, k)


def wait_complete(pred, prefix, k=3, seconds=60.0):
    """Ask again (a deadline no pass fits in: the memo alone) until the background made it complete;
    slowly: each request is a keystroke, which stops the background work for the last one."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(1.0)
        got = pred.suggest_scored(prefix, k, deadline_ms=1000 * SLOW_S / 2.5)
        if got.complete:
            return got
    raise AssertionError(f"the background search never completed {prefix!r}")


def test_answers_types_and_no_deadline_is_the_exact_search(sess):
    pred = Predictor(sess.backend, sess.tokenizer, max_forwards=64)
    for p in PREFIXES:
        got = pred.suggest_scored(p, 3)
        assert isinstance(got, ScoredSuggestions) and got.complete
        want = exact(sess, p)
        assert [w for w, _ in got] == [w for w, _ in want]
        words = pred.suggest(p, 3)
        assert isinstance(words, Suggestions) and words == [w for w, _ in want] and words.complete


def test_a_pass_that_cannot_end_in_time_is_not_started_and_the_background_finishes(sess):
    pred = Predictor(SlowDecoders(sess.backend), sess.tokenizer, max_forwards=64)
    pred.suggest("see you", 3)  # the cost model learns that a pass takes SLOW_S
    prefix = "i don't know what t"
    got = pred.suggest_scored(prefix, 3, deadline_ms=1000 * SLOW_S / 5)
    assert got.forwards == 0 and not got.complete  # a pass would overrun: what was ready
    done = wait_complete(pred, prefix)
    assert done.forwards == 0  # from the memo the background filled
    want = exact(sess, prefix)
    assert [w for w, _ in done] == [w for w, _ in want]
    for (_, a), (_, b) in zip(done, want):
        assert math.isclose(a, b, rel_tol=1e-4)
    assert pred.background_forwards > 0
    # and it searched the likely next keystrokes: the next character of the best word is ready
    nxt = prefix + want[0][0][len("t") :][:1]
    assert pred.suggest_scored(nxt, 3, deadline_ms=1000 * SLOW_S / 2.5).complete
    pred.close()


def test_a_generous_deadline_runs_the_passes_it_needs(sess):
    pred = Predictor(sess.backend, sess.tokenizer, max_forwards=64, background=False)
    pred.suggest("see you", 3)
    for p in PREFIXES:
        got = pred.suggest_scored(p, 3, deadline_ms=5000)
        assert got.complete
        assert [w for w, _ in got] == [w for w, _ in exact(sess, p)]


class Held:
    """Holds a predictor's model lock from another thread (a background pass, a weight swap)."""

    def __init__(self, pred) -> None:
        self.pred, self.held, self.release = pred, threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._hold)

    def _hold(self) -> None:
        with self.pred._lock:
            self.held.set()
            self.release.wait(30)

    def __enter__(self):
        self.thread.start()
        assert self.held.wait(30)
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.thread.join()


def test_busy_model_means_the_memo_alone(sess):
    pred = Predictor(sess.backend, sess.tokenizer, max_forwards=64, background=False)
    ready = "see you at the g"
    full = pred.suggest_scored(ready, 3)
    with Held(pred):
        again = pred.suggest_scored(ready, 3, deadline_ms=200)
        assert again.complete and again.forwards == 0 and [w for w, _ in again] == [w for w, _ in full]
        new = pred.suggest_scored("i don't know what", 3, deadline_ms=200)
        assert not new.complete and new.forwards == 0


def test_a_cut_answer_keeps_the_last_answers_words_that_still_fit(sess):
    pred = Predictor(sess.backend, sess.tokenizer, max_forwards=64, background=False)
    first = pred.suggest_scored("i don't know what ", 8)
    letter = first[0][0][0]
    fitting = [w.lower() for w, _ in first if w.lower().startswith(letter.lower())]
    pred._memo.clear()  # as if evicted: the search has nothing ready
    with Held(pred):
        cut = pred.suggest_scored("i don't know what " + letter, 3, deadline_ms=200)
    assert not cut.complete and cut.forwards == 0
    assert [w.lower() for w, _ in cut] == fitting[:3]


def test_weight_changes_wait_for_the_lock_and_drop_the_memo(bundle):
    s = pp.runtime.open(bundle, backend="torch", need_train=False)
    before = s.suggest("see you at the ", 3)
    tensors = {k: v + (0.5 if ".lora_B" in k else 0.0) for k, v in s.get_adapter_tensors().items()}
    s.set_adapter_tensors(tensors)
    after = s.suggest("see you at the ", 3, deadline_ms=5000)
    want = Predictor(s.backend, s.tokenizer).suggest_scored("see you at the ", 3)
    assert after == [w for w, _ in want] and after.complete
    assert before.complete


@pytest.mark.parametrize("bad", [0, -5, float("nan"), float("inf"), 1e9, True, "16", None])
def test_bad_deadlines_are_config_errors(sess, bad):
    if bad is None:
        assert sess.suggest("see", 3, deadline_ms=None).complete
        return
    with pytest.raises(ConfigError, match="deadline_ms"):
        sess.suggest("see", 3, deadline_ms=bad)
    with pytest.raises(ConfigError, match="deadline_ms"):
        sess.predictor.suggest_scored("see", 3, deadline_ms=bad)


def test_a_dropped_predictor_is_freed_with_its_background_thread(sess):
    pred = Predictor(SlowDecoders(sess.backend), sess.tokenizer)
    pred.suggest("see", 3)
    pred.suggest("see you", 3, deadline_ms=1000 * SLOW_S / 2.5)  # starts the background thread
    worker = pred._worker
    assert worker is not None and worker.daemon
    ref = weakref.ref(pred)
    del pred
    end = time.monotonic() + 30
    while ref() is not None and time.monotonic() < end:
        gc.collect()
        time.sleep(0.1)
    assert ref() is None  # the thread held it only while working
    worker.join(timeout=5)
    assert not worker.is_alive()
