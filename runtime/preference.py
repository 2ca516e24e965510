"""Preference (DPO) training of the LoRA from keyboard feedback.

A keyboard shows a few suggested words; the word the user taps (*chosen*) is preferred over
each word shown but ignored (*rejected*). Direct preference optimization (Rafailov et al., 2023)
with the adapter loaded when an update starts as the reference policy trains, for one pair
with context ``x``::

    L = -log σ(β · [(log π(w|x) - log π_ref(w|x)) - (log π(l|x) - log π_ref(l|x))])

where ``log π(word|x)`` sums the log-probs of the word's tokens after the context. With ``m`` the
bracket (the *margin*, 0 while the policy is the reference), ``∇L = c · ∇(CE_w - CE_l)`` with the
constant ``c = β σ(-β m)`` and ``CE = -log π(word|x)``: a training step with per-token loss
weights ``+c`` on the chosen word's tokens and ``-c`` on the rejected word's
(:class:`~.protocol.SupportsWeightedLoss`) follows exactly the DPO gradient, given the current
margins from one extra forward pass per step (:class:`PreferenceSteps`). Reference log-probs are
computed once, before the first step.

Conventions follow the keyboard's (:meth:`~.predictor.Predictor._parse`, :func:`pocketpeft.text.pack_rows`):
the model sees the message-start separator (``eos``), then the context's tokens, then the word's
tokens, those of ``" " + word`` after a context, of ``word`` alone at the start of a message or
after a newline. A context too long for the bundle's rows keeps its last tokens (and loses the
separator, as the predictor's trimmed context does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from pocketpeft.errors import BackendUnavailableError, ConfigError, InputTextError
from pocketpeft.text import IGNORE, as_text

from .protocol import StepResult, SupportsSplit, weighted_loss_blocker

#: prefix outputs of pair rows (split bundles): row indices -> float [len(idx), T, hidden]
HiddenRows = Callable[[Sequence[int]], np.ndarray]


@dataclass(frozen=True)
class Preference:
    """One shown-word preference: after ``context`` (the message text before the word; ``""`` at
    the start of a message) the user took ``chosen`` over ``rejected``, each a whole word (no
    whitespace). Raises :class:`InputTextError` for non-text or non-UTF-8 values, NUL bytes, an
    empty word, a word holding whitespace, or ``chosen == rejected``."""

    context: str
    chosen: str
    rejected: str

    def __post_init__(self) -> None:
        ctx = as_text(self.context, "Preference.context")
        if "\x00" in ctx:
            raise InputTextError("Preference.context contains NUL bytes; expected text")
        words = []
        for field_ in ("chosen", "rejected"):
            w = as_text(getattr(self, field_), f"Preference.{field_}")
            if not w or any(c.isspace() for c in w) or "\x00" in w:
                raise InputTextError(
                    f"Preference.{field_} must be one whole word (non-empty, no whitespace), got {w!r}"
                )
            words.append(w)
        if words[0] == words[1]:
            raise InputTextError(f"Preference: chosen and rejected are the same word {words[0]!r}")
        object.__setattr__(self, "context", ctx)
        object.__setattr__(self, "chosen", words[0])
        object.__setattr__(self, "rejected", words[1])


def validate_preferences(prefs: "Iterable[Preference | tuple[str, str, str]]") -> list[Preference]:
    """``prefs`` as a non-empty list of :class:`Preference` (``(context, chosen, rejected)``
    tuples are accepted). Raises :class:`InputTextError` for an empty collection or an item that
    is neither, and the errors of :class:`Preference` for bad text."""
    if isinstance(prefs, (Preference, str, bytes)):
        raise InputTextError("preferences must be a collection of Preference, not a single value")
    out = []
    for i, p in enumerate(prefs):
        if isinstance(p, Preference):
            out.append(p)
        elif isinstance(p, tuple) and len(p) == 3:
            out.append(Preference(*p))
        else:
            raise InputTextError(f"preferences[{i}] is a {type(p).__name__}; expected a Preference")
    if not out:
        raise InputTextError("preferences is empty: expected at least one Preference")
    return out


def check_dpo_params(beta: float, weight: float = 1.0) -> None:
    """Raise :class:`ConfigError` unless ``beta`` is a finite number > 0 and ``weight`` (the
    preference loss's weight against the language-model loss) a finite number >= 0."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (math.isfinite(beta) and beta > 0):
        raise ConfigError(f"beta must be a finite number > 0, got {beta!r}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (math.isfinite(weight) and weight >= 0):
        raise ConfigError(f"preference_weight must be a finite number >= 0, got {weight!r}")


# ---------------------------------------------------------------------- the formula


def margins(policy_w, policy_l, ref_w, ref_l) -> np.ndarray:
    """The DPO margin ``(log π(w) - log π_ref(w)) - (log π(l) - log π_ref(l))`` per pair (float64)."""
    f = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
    return (f(policy_w) - f(ref_w)) - (f(policy_l) - f(ref_l))


def dpo_loss(policy_w, policy_l, ref_w, ref_l, beta: float) -> np.ndarray:
    """Per-pair DPO loss ``-log σ(β · margin)`` (float64, computed as ``softplus(-β · margin)``,
    stable for any margin) from the chosen/rejected log-probs under the policy and the reference.
    Raises :class:`ConfigError` for ``beta`` that isn't a finite number > 0."""
    check_dpo_params(beta)
    return np.logaddexp(0.0, -beta * margins(policy_w, policy_l, ref_w, ref_l))


def dpo_coefficients(margin, beta: float) -> np.ndarray:
    """``c = β σ(-β · margin)`` per pair: the DPO loss's gradient is ``c · ∇(CE_w - CE_l)``.
    Raises :class:`ConfigError` for bad ``beta``."""
    check_dpo_params(beta)
    return beta * np.exp(-np.logaddexp(0.0, beta * np.asarray(margin, dtype=np.float64)))


# ---------------------------------------------------------------------- rows


@dataclass(frozen=True)
class PairRows:
    """Two training rows per pair, the chosen word's at ``2i`` and the rejected word's at
    ``2i + 1``: ``input_ids`` and ``labels`` int64 [2P, seq_len] (labels mark only the word's
    tokens; padding is the separator with label -100), ``lengths`` [2P] the positions a forward
    pass needs (the row's real tokens)."""

    input_ids: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray

    @property
    def n_pairs(self) -> int:
        return len(self.input_ids) // 2


def _context_ids(tokenizer, context: str, sep: int) -> tuple[list[int], str]:
    """(ids the model sees before the word, what precedes the word's text): as the predictor
    parses a message typed up to the word."""
    text = context.rstrip()
    if not text:
        return [sep], ""
    newline = "\n" in context[len(text) :]
    return [sep, *tokenizer.encode(text + ("\n" if newline else ""))], "" if newline else " "


def pair_rows(tokenizer, prefs: Sequence[Preference], seq_len: int) -> PairRows:
    """The rows of ``prefs`` for rows of ``seq_len`` tokens (see the module docstring for the
    tokens). Raises :class:`InputTextError` when a word alone needs more than ``seq_len`` tokens."""
    sep = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    n = len(prefs)
    ids = np.full((2 * n, seq_len), sep, dtype=np.int64)
    labels = np.full((2 * n, seq_len), IGNORE, dtype=np.int64)
    lengths = np.zeros(2 * n, dtype=np.int64)
    for i, p in enumerate(prefs):
        ctx, lead = _context_ids(tokenizer, p.context, sep)
        words = [tokenizer.encode(lead + p.chosen), tokenizer.encode(lead + p.rejected)]
        longest = max(len(w) for w in words)
        if longest > seq_len:
            raise InputTextError(
                f"preferences[{i}]: a word of {longest} tokens does not fit the bundle's rows of {seq_len} tokens"
            )
        ctx = ctx[max(0, len(ctx) + longest - 1 - seq_len) :]  # the same context for both words
        for j, w in enumerate(words):
            seq = ctx + w
            r, t = 2 * i + j, len(seq) - 1
            ids[r, :t] = seq[:-1]
            labels[r, len(ctx) - 1 : t] = w
            lengths[r] = t
    return PairRows(ids, labels, lengths)


def lm_weights(labels: np.ndarray) -> np.ndarray:
    """Per-token weights giving the language-model rows ``labels`` their mean cross-entropy:
    ``1 / n_scored`` on every scored token, 0 elsewhere (float32)."""
    scored = np.asarray(labels) != IGNORE
    return scored.astype(np.float32) / np.float32(max(int(scored.sum()), 1))


def pair_weights(labels: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """Per-token weights of pair rows ``labels`` [2n, T] (chosen, rejected, ...): ``+coef[i]`` on
    the chosen word's tokens of pair ``i``, ``-coef[i]`` on the rejected word's (float32)."""
    scored = (np.asarray(labels) != IGNORE).astype(np.float32)
    sign = np.tile(np.array([1.0, -1.0], np.float32), len(coef))
    return scored * (sign * np.repeat(np.asarray(coef, np.float32), 2))[:, None]


# ---------------------------------------------------------------------- forward passes


def _is_split(backend) -> bool:
    return isinstance(backend, SupportsSplit) and backend.split_layer is not None


#: pair rows per forward pass of :func:`row_logps` (padded to the longest of them)
LOGP_ROWS = 16


def row_logps(backend, rows: PairRows, idx: "Sequence[int] | None" = None, hidden: HiddenRows | None = None):
    """``log π(word | context)`` of pair rows ``idx`` (default all) under the backend's current
    adapter: minus the summed cross-entropy of each row's word tokens (float64 [len(idx)]).
    Backends with ``row_losses`` run :data:`LOGP_ROWS` rows per pass, each padded to the longest;
    others one evaluation per row. ``hidden``: on a split bundle, the rows' prefix outputs (the
    suffix then runs alone); without it a split backend runs its prefix here."""
    idx = list(range(len(rows.input_ids))) if idx is None else [int(i) for i in idx]
    if hidden is None and _is_split(backend):
        hidden = lambda sel: backend.prefix(rows.input_ids[list(sel)])  # noqa: E731
    out = np.empty(len(idx), dtype=np.float64)
    batched = hasattr(backend, "row_losses_hidden" if hidden is not None else "row_losses")
    step = LOGP_ROWS if batched else 1
    for s in range(0, len(idx), step):
        sel = idx[s : s + step]
        n = int(rows.lengths[sel].max())
        lab = rows.labels[sel, :n]
        h = hidden(sel)[:, :n] if hidden is not None else None
        if batched:
            losses = (
                backend.row_losses_hidden(h, lab) if h is not None else backend.row_losses(rows.input_ids[sel, :n], lab)
            )
        elif h is not None:
            losses = [backend.eval_hidden(h, lab).loss_sum]
        else:
            losses = [backend.eval_batch(rows.input_ids[sel, :n], lab).loss_sum]
        out[s : s + len(sel)] = -np.asarray(losses, dtype=np.float64)
    return out


def preference_logps(session, prefs: "Iterable[Preference]") -> tuple[np.ndarray, np.ndarray]:
    """``(log π(chosen|context), log π(rejected|context))`` per pair (float64 [P] each) under
    ``session``'s current adapter. Raises the errors of :func:`validate_preferences` and
    :func:`pair_rows`."""
    rows = pair_rows(session.tokenizer, validate_preferences(prefs), session.manifest.seq_len)
    lp = row_logps(session.backend, rows).reshape(-1, 2)
    return lp[:, 0], lp[:, 1]


def reference_logps(session, prefs: "Iterable[Preference]") -> tuple[np.ndarray, np.ndarray]:
    """The reference policy's log-probs: :func:`preference_logps` with the adapter ``session``
    holds now (call it with the last committed adapter loaded)."""
    return preference_logps(session, prefs)


# ---------------------------------------------------------------------- training steps


@dataclass(frozen=True)
class PreferenceStep:
    """One weighted step: the backend's result (its ``loss`` is the weighted surrogate, not a
    loss to report), the language-model rows' mean cross-entropy (the surrogate minus the pairs'
    part, taken from the margin pass: exact when the bundle has no LoRA dropout), the mean DPO
    loss of the step's pairs and the share of them with a positive margin, both before the update."""

    result: StepResult
    lm_loss: float
    dpo_loss: float
    accuracy: float


class PreferenceSteps:
    """The preference half of :meth:`Session.train <pocketpeft.runtime.session.Session.train>`.

    Built before the first step: it computes the reference log-probs of every pair with the
    adapter ``backend`` holds then. Each :meth:`step` takes the next ``batch`` pairs (cycling
    through them in an order shuffled with ``seed``), computes their current margins with one
    forward pass per row, and runs one weighted training step over the language-model rows
    (weight ``1 / n_scored_tokens``) and the pair rows (``± weight · c_i / batch``), whose gradient
    is that of ``LM loss + weight · mean DPO loss``. ``hidden``: the pair rows' prefix outputs on
    a split bundle (steps then take prefix outputs for the LM rows too).

    Raises :class:`BackendUnavailableError` naming the backend when it can't take a weighted
    step, :class:`ConfigError` for bad ``beta`` / ``weight`` / ``batch``.
    """

    def __init__(
        self,
        backend,
        rows: PairRows,
        beta: float,
        weight: float,
        batch: int,
        seed: int,
        hidden: HiddenRows | None = None,
    ) -> None:
        check_dpo_params(beta, weight)
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ConfigError(f"preference_batch must be a positive integer, got {batch!r}")
        why = weighted_loss_blocker(backend)
        if why:
            name = getattr(backend, "name", type(backend).__name__)
            raise BackendUnavailableError(f"backend {name!r} can't train on preferences: {why}")
        self.backend, self.rows, self.hidden = backend, rows, hidden
        self.beta, self.weight, self.batch = float(beta), float(weight), min(batch, rows.n_pairs)
        self.ref = row_logps(backend, rows, hidden=hidden).reshape(-1, 2)
        self._rng = np.random.default_rng(seed)
        self._order, self._pos = self._rng.permutation(rows.n_pairs), 0

    def _next_pairs(self) -> list[int]:
        out = []
        while len(out) < self.batch:
            out.append(int(self._order[self._pos]))
            self._pos += 1
            if self._pos == len(self._order):
                self._order, self._pos = self._rng.permutation(len(self._order)), 0
        return out

    def step(self, x: np.ndarray, labels: np.ndarray) -> PreferenceStep:
        """One weighted step over language-model rows ``x`` (token ids [B, T], or prefix outputs
        [B, T, hidden] when built with ``hidden``) with ``labels``, plus the next pairs."""
        pairs = self._next_pairs()
        idx = [r for p in pairs for r in (2 * p, 2 * p + 1)]
        pol = row_logps(self.backend, self.rows, idx, self.hidden).reshape(-1, 2)
        ref = self.ref[pairs]
        m = margins(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1])
        coef = self.weight * dpo_coefficients(m, self.beta) / len(pairs)
        pair_x = self.hidden(idx) if self.hidden is not None else self.rows.input_ids[idx]
        labels = np.asarray(labels, dtype=np.int64)
        all_labels = np.concatenate([labels, self.rows.labels[idx]])
        weights = np.concatenate([lm_weights(labels), pair_weights(self.rows.labels[idx], coef)])
        if self.hidden is not None:
            r = self.backend.train_step_hidden(np.concatenate([x, pair_x]), all_labels, weights)
        else:
            r = self.backend.train_step(np.concatenate([x, pair_x]), all_labels, weights)
        # the pairs' part of the surrogate, from the same forward values: sum_i coef_i (CE_w - CE_l)
        pair_term = float(np.sum(coef * (pol[:, 1] - pol[:, 0])))
        losses = dpo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], self.beta)
        return PreferenceStep(r, r.loss - pair_term, float(losses.mean()), float((m > 0).mean()))

    def accuracy(self) -> float:
        """Share of all pairs whose margin is positive under the current adapter (one forward
        pass per row)."""
        pol = row_logps(self.backend, self.rows, hidden=self.hidden).reshape(-1, 2)
        return float((margins(pol[:, 0], pol[:, 1], self.ref[:, 0], self.ref[:, 1]) > 0).mean())
