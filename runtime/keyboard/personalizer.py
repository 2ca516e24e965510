"""The Personalizer: what an app embeds to learn from its user's typing on the device.

``observe(text)`` keeps messages in a :class:`~.store.TextStore`; ``update(...)`` trains the
LoRA adapter on what is new plus a small replay sample of older text, inside a time box, and
passes the result through a quality gate before committing it to the
:class:`~.store.AdapterStore`:

- the newest slice of the user's text is held out (not trained on in this update); the new
  adapter must lower its loss (by more than ``min_heldout_gain``, relative);
- a general-text check (other people's messages) must not get worse by more than
  ``max_general_increase`` (relative loss, default +2%); it is skipped, and the report's reason
  says so, when there is no general text (a bundle exported without ``general.txt``);
- where the user gave keyboard feedback (:meth:`Personalizer.feedback`), the held-out acceptance
  (share of the newest taps whose word the model ranks above every other word on that bar) must
  not fall by more than ``max_acceptance_drop``;
- otherwise the previous adapter is put back and nothing is committed.

With ``preference_weight`` > 0 an update also learns from the feedback: each tapped word is
preferred over the words shown with it but ignored, and where all were ignored, the word the user
typed over those shown (:mod:`.feedback`), by a DPO loss on the LoRA with the last committed
adapter as the reference policy, mixed with the language-model loss
(:meth:`Session.train <..session.Session.train>`).

Suggestions also use the user's own words at once: :class:`~.wordcounts.WordCounts` counts the
stored messages (trigrams), and :meth:`Personalizer.suggest` ranks the serving model's candidate
words mixed with those counts (``word_weight``), so a name or phrase typed a few times is offered
before any training step has run.

Serving while learning: suggestions come from a second *serving* session that holds only whole
committed adapters. Training runs on the training session; after a commit the serving session
loads the new version from the store (hash-checked) under a lock that ``suggest()`` also takes,
so a suggestion is computed entirely with one committed adapter, never a half-trained one.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pocketpeft.errors import ConfigError
from pocketpeft.procinfo import peak_rss_mib
from pocketpeft.text import as_text

from ..keystrokes import keystroke_metrics
from ..predictor import ScoredSuggestions, Suggestions, check_deadline
from ..preference import preference_logps
from ..protocol import SupportsSplit, weighted_loss_blocker
from ..session import Session
from .feedback import preferences_from_feedback
from .store import NEW, REJECTED, TRAINED, AdapterStore, AdapterVersion, TextStore
from .wordcounts import WORD_POOL, WordCounts, mix_scored

Progress = Callable[[dict], None]

#: rows per forward pass of the gate's evaluations: a pass's logits are rows x seq x vocab floats
#: (SmolLM2, 64 tokens: 25 MiB a row), so small passes keep the update's peak memory down
EVAL_ROWS = 2

#: preference pairs one update trains on at most (a sample when the feedback gives more)
MAX_PREFERENCE_PAIRS = 64

#: the prefix-output cache of a split bundle, in the store directory
HIDDEN_CACHE = "hidden.sqlite"

#: time kept at the end of a deadline for mixing in the word counts (seconds)
_MIX_S = 0.001

_NO_GENERAL = "general-text check skipped (no general text: the bundle has no general.txt and none was given)"


@dataclass
class UpdateReport:
    """What one ``update()`` did and why its result was or wasn't committed."""

    accepted: bool
    reason: str
    version: int | None  # the version current after the update
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    train_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    new_messages: int = 0
    replay_messages: int = 0
    heldout_messages: int = 0
    heldout_loss_before: float | None = None
    heldout_loss_after: float | None = None
    general_loss_before: float | None = None
    general_loss_after: float | None = None
    peak_rss_mb: float = 0.0
    #: keyboard feedback: new entries, the preference pairs trained on (0: text only; see
    #: ``preference_note``), the DPO loss per step, and the held-out acceptance (share of held-out
    #: taps whose word the model ranks above every other word shown with it) before and after
    feedback_new: int = 0
    preference_pairs: int = 0
    preference_losses: list[float] = field(default_factory=list)
    preference_note: str = ""
    heldout_feedback: int = 0
    heldout_acceptance_before: float | None = None
    heldout_acceptance_after: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GlobalInstallReport:
    """What :meth:`Personalizer.install_global` did: the global versions, and whether the personal
    adapter was ``kept``, ``retrained`` or ``dropped`` (``none``: there was none), with the held-out
    losses it was judged by and the retraining update's report."""

    version: int
    previous_version: int | None
    decision: str
    reason: str
    heldout_loss_personal: float | None = None
    heldout_loss_global: float | None = None
    update: dict[str, Any] | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Personalizer:
    """Incremental, gated personalization of ``session``'s adapter, stored under ``store_dir``.

    ``store_dir`` gets ``text.sqlite`` (the user's messages) and ``adapters/`` (the versions);
    both are tied to the session's base model. On construction the current committed version (if
    any) is loaded into both the training session and the serving session.

    - ``serve_session``: the session suggestions come from; by default a second session of the
      same bundle on the same backend (inference only).
    - ``general``: other people's messages for the general-text check (default: the bundle's own,
      :meth:`Bundle.general_texts <pocketpeft.manifest.Bundle.general_texts>`; empty: the check
      is skipped and every :class:`UpdateReport` reason says so).
    - ``holdout_fraction`` / ``holdout_max``: size of the newest slice held out for the gate.
    - ``replay_fraction``: replayed older messages per new message (sampled from trained ones).
    - ``max_general_increase``: allowed relative rise of the general-text loss (0.02 = +2%).
    - ``min_heldout_gain``: required relative drop of the held-out loss (0 = any improvement).
    - ``word_weight``: weight of the user's word counts in suggestions (0 = the model alone); the
      counts are built from the text store on construction and grow with every ``observe()``
      (messages the store later drops for space leave them at the next construction).
    - ``preference_weight``: weight of the DPO loss from keyboard feedback in updates (0: the
      text alone); ``preference_beta``: its β; ``max_acceptance_drop``: the gate's allowed fall of
      the held-out acceptance (absolute).
    - ``max_cache_bytes``: cap of ``hidden.sqlite``, the prefix outputs of a split bundle's rows
      (float16; SmolLM2: 72 KiB per 64-token row), kept so later updates, replays and the gate's
      evaluations run only the trained layers; dropped by :meth:`wipe`.

    Raises :class:`ConfigError` for bad settings, and the stores' errors (:class:`StoreError`,
    :class:`BaseModelMismatchError`) for an unusable or foreign ``store_dir``.
    """

    def __init__(
        self,
        session: Session,
        store_dir: "str | os.PathLike",
        serve_session: Session | None = None,
        general: Sequence[str] | None = None,
        holdout_fraction: float = 0.1,
        holdout_max: int = 150,
        replay_fraction: float = 0.25,
        max_general_increase: float = 0.02,
        min_heldout_gain: float = 0.0,
        max_text_bytes: int = 16 << 20,
        seed: int = 0,
        word_weight: float = 0.2,
        max_cache_bytes: int = 64 << 20,
        preference_weight: float = 0.0,
        preference_beta: float = 0.1,
        max_acceptance_drop: float = 0.05,
    ) -> None:
        for name, v, lo, hi in (
            ("preference_weight", preference_weight, 0.0, 100.0),
            ("preference_beta", preference_beta, 1e-6, 100.0),
            ("max_acceptance_drop", max_acceptance_drop, 0.0, 1.0),
            ("holdout_fraction", holdout_fraction, 0.0, 0.9),
            ("word_weight", word_weight, 0.0, 1.0),
            ("replay_fraction", replay_fraction, 0.0, 10.0),
            ("max_general_increase", max_general_increase, 0.0, 10.0),
            ("min_heldout_gain", min_heldout_gain, 0.0, 1.0),
        ):
            if not (isinstance(v, (int, float)) and lo <= v <= hi):
                raise ConfigError(f"{name} must be a number in [{lo}, {hi}], got {v!r}")
        if isinstance(holdout_max, bool) or not isinstance(holdout_max, int) or holdout_max < 1:
            raise ConfigError(f"holdout_max must be a positive integer, got {holdout_max!r}")
        self.session = session
        m = session.manifest
        self.store_dir = Path(store_dir)
        self.texts = TextStore(self.store_dir / "text.sqlite", m.base_sha256, max_bytes=max_text_bytes)
        self.adapters = AdapterStore(
            self.store_dir / "adapters", m.base_sha256, m.lora, base_name=f"pocketpeft:{m.base_source}"
        )
        self.hidden_cache = self._open_hidden_cache(max_cache_bytes)
        if general is None:
            general = session.bundle.general_texts()  # [] for a bundle exported without general.txt
        self.general = list(general)
        self.holdout_fraction, self.holdout_max = holdout_fraction, holdout_max
        self.replay_fraction = replay_fraction
        self.max_general_increase, self.min_heldout_gain = max_general_increase, min_heldout_gain
        self.word_weight = float(word_weight)
        self.preference_weight, self.preference_beta = float(preference_weight), float(preference_beta)
        self.max_acceptance_drop = float(max_acceptance_drop)
        self._rng = np.random.default_rng(seed)
        self._commit_secs = 2.0  # time a commit + serving swap took last (reserved in the time box)
        self._update_lock = threading.Lock()  # one update at a time
        self._serve_lock = threading.RLock()  # suggest() vs swapping the serving adapter
        self._words_lock = threading.Lock()  # the word counts: observe() and wipe() vs suggest()
        self._general_cache: tuple[int | None, float, float] | None = None  # (version, loss, eval seconds)
        if serve_session is None:  # the best serving backend for the bundle (llama.cpp where it runs)
            from .. import open as open_session

            serve_session = open_session(session.bundle, backend="auto", need_train=False)
        self.serve_session = serve_session
        self._serving_version: int | None = None
        # counted once from the store, then grown by observe()
        self.words = WordCounts(r.text for r in self.texts.rows())
        v = self.adapters.current_version()
        if v is not None:
            self.session.load_adapter(self.adapters.versions_dir / str(v))
            self._serve(v)

    def _open_hidden_cache(self, max_bytes: int):
        """The prefix-output cache (``hidden.sqlite``) when the training session runs a split
        bundle, else ``None``. Keyed by the base, the bundle's manifest and the split: a cache
        made for anything else is cleared on open."""
        split = self.session.manifest.split
        be = self.session.backend
        if split is None or not isinstance(be, SupportsSplit) or be.split_layer is None:
            return None
        from pocketpeft.fsutil import sha256_file
        from pocketpeft.manifest import MANIFEST_NAME

        from .hidden_cache import HiddenCache

        m = self.session.manifest
        key = f"{m.base_sha256}:{sha256_file(self.session.bundle.root / MANIFEST_NAME)}:{split.layer}:{m.seq_len}"
        return HiddenCache(self.store_dir / HIDDEN_CACHE, key, split.hidden_size, max_bytes=max_bytes)

    # ------------------------------------------------------------------ text
    def observe(self, text: "str | bytes | Sequence[str | bytes]") -> int:
        """Keep one message (or a list of them, stored all-or-none) for the next update.

        Returns how many messages were stored. Raises :class:`InputTextError` for empty, binary,
        non-UTF-8 or oversized text, :class:`StoreError` when the store can't be written.
        """
        items = [text] if isinstance(text, (str, bytes, bytearray)) else list(text)
        n = len(self.texts.add_many(items))  # validates: every item is now good UTF-8 text
        with self._words_lock:
            self.words.add(as_text(t) for t in items)
        return n

    def feedback(self, prefix: "str | bytes", shown: "Sequence[str | bytes]", chosen: "str | bytes | None") -> int:
        """Record what the keyboard showed after ``prefix`` (the message typed so far) and which
        word the user tapped: ``chosen``, one of ``shown``, or ``None`` when all were ignored.

        Stored with the user's text (same database, same byte cap, removed by :meth:`wipe`); an
        update with ``preference_weight`` learns from it (chosen over each ignored word, DPO).
        Returns the entry's id. Raises :class:`InputTextError` (nothing stored) for an empty
        ``shown``, a ``chosen`` not among ``shown``, non-UTF-8 or malformed words.
        """
        return self.texts.add_feedback(prefix, shown, chosen)

    def wipe(self) -> dict[str, Any]:
        """Delete all stored text and keyboard feedback (the database and its WAL/shm files) and
        the word counts made from it; returns what was removed. Committed adapters are kept (they
        hold no text)."""
        with self._update_lock:
            out = self.texts.wipe()
            if self.hidden_cache is not None:  # derived from the text: it goes with it
                out["hidden_cache"] = self.hidden_cache.wipe()
            with self._words_lock:
                self.words = WordCounts()
            return out

    # ------------------------------------------------------------------ serving
    @property
    def version(self) -> int | None:
        """The committed version suggestions are served from (``None``: the bundle's initial adapter)."""
        return self._serving_version

    def suggest(self, prefix: str, k: int = 3, deadline_ms: float | None = None) -> Suggestions:
        """The ``k`` most likely next words after ``prefix``, from the last committed adapter
        (answers keep coming while an update runs) mixed with the user's word counts, as
        :class:`~..predictor.Suggestions` (a list of words). See :meth:`Session.suggest` for
        ``prefix``, ``k`` and ``deadline_ms``: with a deadline the answer comes within it from what
        is ready (the word counts alone while a new version is being swapped in) and ``complete``
        says whether the model's search finished."""
        return self.suggest_scored(prefix, k, deadline_ms).words()

    def suggest_scored(self, prefix: str, k: int = 3, deadline_ms: float | None = None) -> ScoredSuggestions:
        """Like :meth:`suggest`, with each word's mixed probability of coming next."""
        t0 = time.perf_counter()
        prefix = as_text(prefix, "prefix")
        deadline_ms = check_deadline(deadline_ms)
        wait = -1 if deadline_ms is None else max(0.0, deadline_ms / 1000 - _MIX_S)
        if not self._serve_lock.acquire(timeout=wait):  # a new version is being swapped in
            counts = self._word_probs(prefix)
            scored = mix_scored([], counts, prefix, 1.0, k) if counts else []
            return ScoredSuggestions(scored, False, 1000 * (time.perf_counter() - t0), 0)
        try:
            pred = self.serve_session.predictor
            left = None
            if deadline_ms is not None:
                left = max(deadline_ms - 1000 * (time.perf_counter() - t0 + _MIX_S), 0.5)
            counts = self._word_probs(prefix) if self.word_weight else {}
            if not counts:
                return pred.suggest_scored(prefix, k, left)
            lm = pred.suggest_scored(prefix, max(k, WORD_POOL), left)
            mixed = mix_scored(lm, counts, prefix, self.word_weight, k)
            return ScoredSuggestions(mixed, lm.complete, 1000 * (time.perf_counter() - t0), lm.forwards)
        finally:
            self._serve_lock.release()

    def _word_probs(self, prefix: str) -> dict[str, float]:
        with self._words_lock:
            return self.words.probs(prefix) if len(self.words) else {}

    def eval_keystrokes(self, texts: "str | Sequence[str]", k: int = 3, max_messages: int | None = None) -> dict:
        """Next-word accuracy and keystroke savings of :meth:`suggest` on ``texts`` (see
        :func:`~.keystrokes.keystroke_metrics`)."""
        return keystroke_metrics(self.suggest, texts, k, max_messages)

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """float32 logits [T, vocab] from the last committed adapter (see :meth:`Session.logits`)."""
        with self._serve_lock:
            return self.serve_session.logits(token_ids)

    def serving(self) -> tuple[int | None, dict[str, np.ndarray]]:
        """(version, copy of the tensors) the serving session holds right now, read atomically."""
        with self._serve_lock:
            return self._serving_version, {k: np.array(v) for k, v in self.serve_session.get_adapter_tensors().items()}

    def _serve(self, version: int) -> None:
        ad = self.adapters.load(version)  # read back from disk, hash-checked
        tensors = ad.tensors
        with self._serve_lock:
            self.serve_session.set_adapter_tensors(tensors)
            self._serving_version = version

    def versions(self) -> list[AdapterVersion]:
        """Committed versions, oldest first, with the metrics they were accepted with."""
        return self.adapters.list()

    def restore(self, version: int) -> AdapterVersion:
        """Make ``version`` current again, in training and serving. Raises the store's errors."""
        with self._update_lock:
            v = self.adapters.restore(version)
            self.session.load_adapter(v.path)
            self._serve(version)
            self._general_cache = None
            return v

    # ------------------------------------------------------------------ updating
    def _split(self, rows: list | None = None) -> tuple[list, list, list]:
        """(held-out rows, new rows to train, replay rows) for the next update, of ``rows``
        (default: every stored message)."""
        return self._divide(self.texts.rows() if rows is None else rows, lambda r: r.trained)

    def _feedback_split(self) -> tuple[list, list, list]:
        """(held-out feedback, new feedback to learn from, replayed feedback), as :meth:`_split`
        divides the messages."""
        return self._divide(self.texts.feedback_rows((NEW, TRAINED)), lambda r: r.state)

    def _divide(self, rows: list, state: Callable[[Any], int]) -> tuple[list, list, list]:
        """The newest ``holdout_fraction`` of ``rows`` (oldest first) held out, the other new
        ones, and a ``replay_fraction`` sample of the other trained ones."""
        n_hold = min(self.holdout_max, max(1, int(round(len(rows) * self.holdout_fraction)))) if rows else 0
        hold = rows[len(rows) - n_hold :] if self.holdout_fraction > 0 else []
        held = {r.id for r in hold}
        new = [r for r in rows if state(r) == NEW and r.id not in held]
        old = [r for r in rows if state(r) == TRAINED and r.id not in held]
        n_replay = min(len(old), int(math.ceil(len(new) * self.replay_fraction)))
        replay = [old[i] for i in sorted(self._rng.choice(len(old), n_replay, replace=False))] if n_replay else []
        return hold, new, replay

    def _acceptance(self, prefs: list, ids: list[int]) -> float | None:
        """Share of feedback entries (``ids``, one per pair of ``prefs``) whose preferred word the
        training session's adapter ranks above every other word shown with it."""
        if not prefs:
            return None
        lw, ll = preference_logps(self.session, prefs)
        won: dict[int, bool] = {}
        for i, chosen, rejected in zip(ids, lw, ll):
            won[i] = won.get(i, True) and bool(chosen > rejected)
        return sum(won.values()) / len(won)

    def _eval(self, texts: list[str]) -> tuple[float, float]:
        t0 = time.perf_counter()
        loss = self.session.eval(texts, batch_size=EVAL_ROWS, cache=self.hidden_cache).loss
        return loss, time.perf_counter() - t0

    def update(
        self, max_steps: int | None = None, max_seconds: float | None = None, progress: "Progress | bool | None" = None
    ) -> UpdateReport:
        """Train on new text plus replay, gate the result, and commit it if it passes.

        Stops after ``max_steps`` optimizer steps or when ``max_seconds`` (the whole update: the
        gate's evaluations included) would be exceeded; 20 steps if neither is given.
        ``progress``: a callable receiving ``{"stage": ..., ...}`` dicts (``split``, ``eval-before``,
        ``train``, ``eval-after``, ``done``), or ``True`` for progress bars. Safe to call again
        and again; calls from several threads run one after another.
        Returns an :class:`UpdateReport`. Raises :class:`ConfigError` for bad limits and
        :class:`StoreError` when a commit can't be written (the previous version stays current
        and is put back in the training session).
        """
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
            raise ConfigError(f"max_steps must be a positive integer, got {max_steps!r}")
        if max_seconds is not None and not (
            isinstance(max_seconds, (int, float)) and max_seconds > 0 and math.isfinite(max_seconds)
        ):
            raise ConfigError(f"max_seconds must be a positive number, got {max_seconds!r}")
        if max_steps is None and max_seconds is None:
            max_steps = 20
        tell: Callable[[dict], None] = progress if callable(progress) else (lambda d: None)
        with self._update_lock:
            return self._update(max_steps, max_seconds, tell, progress is True)

    def _update(self, max_steps, max_seconds, tell, bars: bool) -> UpdateReport:
        t0 = time.perf_counter()
        version = self.adapters.current_version()
        rows = self.texts.rows()  # read once: split here, and searched for typed words below
        hold, new, replay = self._split(rows)
        rep = UpdateReport(
            False, "", version, new_messages=len(new), replay_messages=len(replay), heldout_messages=len(hold)
        )
        tell({"stage": "split", "new": len(new), "replay": len(replay), "heldout": len(hold)})
        if not new:
            rep.reason = "no new text to learn from"
            return self._finish(rep, t0, tell)
        hold_texts = [r.text for r in hold]
        prev = {k: np.array(v) for k, v in self.session.get_adapter_tensors().items()}
        ho_before, ho_secs = self._eval(hold_texts) if hold_texts else (None, 0.0)
        fb_hold, fb_new, fb_replay = self._feedback_split()
        messages = [r.text for r in rows]
        hold_prefs, hold_ids = preferences_from_feedback(fb_hold, messages)
        t_acc = time.perf_counter()
        rep.feedback_new, rep.heldout_feedback = len(fb_new), len(set(hold_ids))
        rep.heldout_acceptance_before = self._acceptance(hold_prefs, hold_ids)
        ho_secs += time.perf_counter() - t_acc
        prefs: list = []
        if self.preference_weight > 0 and fb_new:
            prefs = preferences_from_feedback(fb_new + fb_replay, messages)[0]
            if len(prefs) > MAX_PREFERENCE_PAIRS:  # the reference pass costs a row per pair word
                keep = self._rng.choice(len(prefs), MAX_PREFERENCE_PAIRS, replace=False)
                prefs = [prefs[i] for i in sorted(keep)]
            why = weighted_loss_blocker(self.session.backend)
            if why and prefs:
                rep.preference_note = f"preference loss skipped: backend {self.session.backend.name!r}: {why}"
                prefs = []
        if not self.general:
            gen_before, gen_secs = None, 0.0
        else:
            if self._general_cache is None or self._general_cache[0] != version:
                g, g_secs = self._eval(self.general)
                self._general_cache = (version, g, g_secs)
            _, gen_before, gen_secs = self._general_cache
        rep.heldout_loss_before, rep.general_loss_before = ho_before, gen_before
        tell({"stage": "eval-before", "heldout_loss": ho_before, "general_loss": gen_before})
        seconds = None
        if max_seconds is not None:  # leave room for the evaluations and the commit after training
            seconds = max_seconds - (time.perf_counter() - t0) - (ho_secs + gen_secs) * 1.1 - self._commit_secs
            if seconds <= 0:
                rep.reason = f"time box of {max_seconds:g}s too short: the gate's evaluations alone take {ho_secs + gen_secs:.1f}s"
                return self._finish(rep, t0, tell)
        # in store order (train() shuffles the packed rows): the rows of the same messages come out
        # the same next time, so a split bundle's prefix outputs are found in the cache
        texts = [r.text for r in new] + [r.text for r in replay]
        pref_args = (
            {"preferences": prefs, "preference_weight": self.preference_weight, "beta": self.preference_beta}
            if prefs
            else {}
        )
        tr = self.session.train(
            texts,
            steps=max_steps,
            seconds=seconds,
            progress=bars,
            seed=int(self._rng.integers(1 << 31)),
            cache=self.hidden_cache,
            **pref_args,
        )
        rep.steps, rep.tokens, rep.losses, rep.train_seconds = tr.steps, tr.tokens, tr.losses, tr.seconds
        rep.preference_pairs, rep.preference_losses = len(prefs), list(tr.preference_losses)
        tell(
            {
                "stage": "train",
                "steps": tr.steps,
                "tokens": tr.tokens,
                "seconds": tr.seconds,
                "loss_first": tr.losses[0] if tr.losses else None,
                "loss_last": tr.losses[-1] if tr.losses else None,
            }
        )
        applied = tr.steps - len(tr.skipped_steps)
        ho_after = self._eval(hold_texts)[0] if hold_texts else None
        gen_after = self._eval(self.general)[0] if self.general else None
        rep.heldout_loss_after, rep.general_loss_after = ho_after, gen_after
        rep.heldout_acceptance_after = acc_after = self._acceptance(hold_prefs, hold_ids)
        acc_before = rep.heldout_acceptance_before
        tell(
            {
                "stage": "eval-after",
                "heldout_loss": ho_after,
                "general_loss": gen_after,
                "heldout_acceptance": acc_after,
            }
        )
        limit = gen_before * (1 + self.max_general_increase) if gen_before is not None else None
        if applied == 0:
            rep.reason = "no training step was applied (time box too short or every step non-finite)"
        elif ho_before is not None and not ho_after < ho_before * (1 - self.min_heldout_gain):
            rep.reason = f"held-out loss did not improve ({ho_before:.4f} -> {ho_after:.4f})"
        elif limit is not None and not gen_after <= limit:
            rep.reason = (
                f"general-text loss rose {100 * (gen_after / gen_before - 1):+.1f}% "
                f"({gen_before:.4f} -> {gen_after:.4f}), more than the allowed "
                f"+{100 * self.max_general_increase:g}%"
            )
        elif acc_before is not None and not acc_after >= acc_before - self.max_acceptance_drop:
            rep.reason = (
                f"held-out acceptance fell {100 * acc_before:.1f}% -> {100 * acc_after:.1f}% "
                f"(over {rep.heldout_feedback} taps), more than the allowed {100 * self.max_acceptance_drop:g} points"
            )
        else:
            rep.accepted = True
        if not rep.accepted:
            if gen_before is None:
                rep.reason += f"; {_NO_GENERAL}"
            self.session.set_adapter_tensors(prev)
            if applied:
                self.texts.mark([r.id for r in new], REJECTED)
                if prefs:
                    self.texts.mark_feedback([r.id for r in fb_new], REJECTED)
            return self._finish(rep, t0, tell)
        metrics = {
            k: getattr(rep, k)
            for k in (
                "heldout_loss_before",
                "heldout_loss_after",
                "general_loss_before",
                "general_loss_after",
                "steps",
                "tokens",
                "new_messages",
                "replay_messages",
                "heldout_messages",
                "preference_pairs",
                "heldout_feedback",
                "heldout_acceptance_before",
                "heldout_acceptance_after",
            )
        }
        metrics["train_seconds"] = round(tr.seconds, 3)
        g = self.session.global_info
        metrics["global_version"] = g.version if g is not None else None  # what it was trained on top of
        t_commit = time.perf_counter()
        try:
            v = self.adapters.commit(self.session.get_adapter_tensors(), metrics)
        except Exception:
            self.session.set_adapter_tensors(prev)
            raise
        self.texts.mark([r.id for r in new], TRAINED)
        if prefs:
            self.texts.mark_feedback([r.id for r in fb_new], TRAINED)
        self._general_cache = (v.version, gen_after, gen_secs) if gen_after is not None else None
        self._serve(v.version)
        self._commit_secs = 1.2 * (time.perf_counter() - t_commit)
        rep.version = v.version
        rep.reason = f"held-out loss {ho_before:.4f} -> {ho_after:.4f}" if ho_before is not None else "no held-out text"
        if gen_before is not None:
            rep.reason += (
                f", general-text loss {100 * (gen_after / gen_before - 1):+.1f}% "
                f"(limit +{100 * self.max_general_increase:g}%)"
            )
        else:
            rep.reason += f", {_NO_GENERAL}"
        if acc_before is not None:
            rep.reason += f", held-out acceptance {100 * acc_before:.1f}% -> {100 * acc_after:.1f}%"
        if prefs:
            rep.reason += f"; learned from {len(prefs)} preference pairs"
        elif rep.preference_note:
            rep.reason += f"; {rep.preference_note}"
        return self._finish(rep, t0, tell)

    def _finish(self, rep: UpdateReport, t0: float, tell) -> UpdateReport:
        release = getattr(self.session.backend, "release_prefix", None)
        if release is not None:  # the prefix runs again only for rows the cache lacks: free it
            release()
        rep.seconds = time.perf_counter() - t0
        rep.peak_rss_mb = peak_rss_mib()
        tell({"stage": "done", **rep.to_dict()})
        return rep

    # ------------------------------------------------------------------ the global adapter
    def install_global(
        self,
        src: "str | os.PathLike",
        max_steps: int | None = None,
        max_seconds: float | None = None,
        progress: "Progress | bool | None" = None,
    ) -> "GlobalInstallReport":
        """Install a newer global adapter (the fleet's) under the user's personalization.

        The global adapter is checked and put into the bundle's ``global/`` atomically (a corrupt,
        foreign, misshapen or older one raises its typed error and nothing changes), both sessions
        apply it, and the current personal adapter is re-gated against it, by rule:

        - **kept** when, on the user's held-out messages, global + personal still beats the new
          global alone (lower loss);
        - **retrained** otherwise, when an update from a fresh personal adapter on all of the user's
          stored text (``max_steps`` / ``max_seconds``, as :meth:`update`) passes the usual gate;
        - **dropped** when that update fails too: the fresh (identity) personal adapter is committed,
          so suggestions come from the new global adapter alone;
        - **none** when there was no personal adapter yet.
        """
        from pocketpeft.global_adapter import install_global

        t0 = time.perf_counter()
        tell: Callable[[dict], None] = progress if callable(progress) else (lambda d: None)
        with self._update_lock:
            old = self.session.global_info
            for s in (self.session, self.serve_session):  # both can apply it, or nothing is installed
                s.check_global()
            info = install_global(self.session.bundle, src)
            self.session.apply_global()
            with self._serve_lock:
                self.serve_session.apply_global()  # moves its adapter_version: the predictor drops its caches
            self._general_cache = None
            rep = GlobalInstallReport(info.version, old.version if old else None, "none", "no personal adapter yet")
            version = self.adapters.current_version()
            if version is not None:
                self._regate(rep, version, max_steps, max_seconds, tell, progress is True)
            if self._serving_version is not None:
                self._serve(self._serving_version)  # re-read: the serving predictor drops its caches
            rep.seconds = time.perf_counter() - t0
            tell({"stage": "global", **rep.to_dict()})
            return rep

    def _regate(self, rep: "GlobalInstallReport", version: int, max_steps, max_seconds, tell, bars: bool) -> None:
        personal = {k: np.array(v) for k, v in self.session.get_adapter_tensors().items()}
        fresh = self.session.bundle.initial_adapter().tensors
        rows = self.texts.rows()
        hold = self._split()[0] or rows[-self.holdout_max :]
        texts = [r.text for r in hold]
        if not texts:
            rep.decision, rep.reason = "kept", "no stored text to judge it on: the personal adapter is kept"
            return
        rep.heldout_loss_personal = self._eval(texts)[0]
        self.session.set_adapter_tensors(fresh)
        rep.heldout_loss_global = self._eval(texts)[0]
        if rep.heldout_loss_personal < rep.heldout_loss_global:
            self.session.set_adapter_tensors(personal)
            rep.decision = "kept"
            rep.reason = (
                f"held-out loss with the personal adapter {rep.heldout_loss_personal:.4f} < "
                f"{rep.heldout_loss_global:.4f} with the new global adapter alone"
            )
            return
        # relearn on top of the new global: every stored message counts as new again
        marks = {r.id: r.trained for r in rows}
        self.texts.mark([i for i, t in marks.items() if t != NEW], NEW)
        up = self._update(max_steps if max_steps or max_seconds else 20, max_seconds, tell, bars)
        rep.update = up.to_dict()
        if up.accepted:
            rep.decision = "retrained"
            rep.reason = f"the old personal adapter no longer helped; retrained: {up.reason}"
            return
        for state in {t for t in marks.values()}:  # a failed relearning doesn't mark the user's history rejected
            self.texts.mark([i for i, t in marks.items() if t == state], state)
        self.session.set_adapter_tensors(fresh)
        v = self.adapters.commit(fresh, {"dropped_for_global": rep.version, "previous_version": version})
        self._serve(v.version)
        rep.decision = "dropped"
        rep.reason = f"the old personal adapter no longer helped and retraining failed the gate ({up.reason})"

    def close(self) -> None:
        """Close the text store and the prefix-output cache."""
        self.texts.close()
        if self.hidden_cache is not None:
            self.hidden_cache.close()
