"""A Session: one bundle running on one backend, with the user-facing verbs
(train, eval, logits, save_adapter, load_adapter)."""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np

from pocketpeft.adapter import Adapter, check_adapter_shapes, load_adapter, save_adapter
from pocketpeft.errors import (
    AdapterShapeError,
    BackendUnavailableError,
    ConfigError,
    InputTextError,
    SequenceTooLongError,
)
from pocketpeft.manifest import Bundle
from pocketpeft.procinfo import peak_rss_mib
from pocketpeft.text import pack_rows, validate_texts

from .preference import PairRows, Preference, PreferenceSteps, pair_rows, validate_preferences
from .protocol import Backend, SupportsGlobal, SupportsSplit, TrainConfig

#: Former name of :func:`pocketpeft.procinfo.peak_rss_mib` (``sdk/apps/demo.py`` imports it from here).
peak_rss_mb = peak_rss_mib


@dataclass
class TrainReport:
    """What an update did: per-step losses, skipped steps (non-finite loss/gradient), speed, memory."""

    backend: str
    device: str
    steps: int
    skipped_steps: list[int]
    losses: list[float]
    seconds: float
    tokens: int
    tokens_per_s: float
    peak_rss_mb: float
    stopped_by: str
    #: split bundles: seconds spent computing prefix outputs, and rows taken from the cache
    prefix_seconds: float = 0.0
    prefix_rows_computed: int = 0
    prefix_rows_cached: int = 0
    #: training on preferences (else empty / None): each step's mean DPO loss over its pairs,
    #: before its update (``losses`` then holds the language-model loss alone), and the share of
    #: all pairs whose margin is positive after the last step (it starts at 0: no pair is above
    #: the reference policy before training)
    preference_losses: list[float] = field(default_factory=list)
    preference_accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalReport:
    """Next-token metrics over scored tokens: mean loss, perplexity, top-1/top-3 accuracy."""

    loss: float
    perplexity: float
    top1: float
    top3: float
    tokens: int
    extra: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d


class Session:
    """A bundle loaded on a backend. Create with :func:`pocketpeft.runtime.open`."""

    def __init__(self, bundle: Bundle, backend: Backend, train_config: TrainConfig | None = None) -> None:
        self.bundle = bundle
        self.backend = backend
        self.manifest = bundle.manifest
        self.tokenizer = bundle.tokenizer()
        self.train_config = train_config or TrainConfig()
        #: Moves whenever this session changes the adapter's weights (each train step,
        #: ``load_adapter``, ``reset_adapter``, ``set_adapter_tensors``); the predictor drops its
        #: caches when it moves. Weights changed on ``backend`` directly go unnoticed.
        self.adapter_version = 0
        #: held around every use of the backend's weights that may race a suggestion (weight swaps,
        #: logits, evaluations, the predictor's forward passes, including its background thread's)
        self.lock = threading.RLock()
        #: the installed global adapter's info (``None``: the bundle has none); see :meth:`apply_global`
        self.global_info = None
        self.apply_global()

    def apply_global(self) -> None:
        """Apply the bundle's global adapter (``global/``, frozen under the personal one) on the
        backend, or remove it when the bundle has none. Raises the typed errors of
        :func:`~pocketpeft.global_adapter.load_global` for a corrupt or foreign one and
        :class:`BackendUnavailableError` for a backend that can't apply one."""
        g = self.bundle.global_adapter()
        if g is None:
            if self.global_info is not None:
                self.set_global_tensors(None)
            return
        self.set_global_tensors(g[0].tensors, g[1])

    def set_global_tensors(self, tensors: "dict[str, np.ndarray] | None", info=None) -> None:
        """Apply ``tensors`` (PEFT names, the bundle's LoRA shapes) as this session's frozen global
        adapter, or none (``None``), whatever the bundle holds; ``info`` becomes :attr:`global_info`.
        Moves :attr:`adapter_version`. Raises :class:`BackendUnavailableError` for a backend that
        can't apply one and :class:`AdapterShapeError` (nothing changed) for tensors that don't fit."""
        if not isinstance(self.backend, SupportsGlobal):
            raise BackendUnavailableError(
                f"backend {self.backend.name!r} does not apply a global adapter; use a backend that does "
                "(torch, peft, llamacpp, onnxruntime, onnxruntime-infer, executorch)"
            )
        with self.lock:
            self.backend.set_global(tensors)
            self.global_info = info if tensors is not None else None
            self.adapter_version += 1

    def check_global(self, bundle: Bundle | None = None) -> None:
        """Raise :class:`BackendUnavailableError` unless this session's backend can apply a global
        adapter of ``bundle`` (default: its own) — checked before one is installed."""
        from .selection import global_blocker

        b = bundle or self.bundle
        why = "" if isinstance(self.backend, SupportsGlobal) else "does not apply a global adapter"
        why = why or global_blocker(self.backend.name, b, installed=True)
        if why:
            raise BackendUnavailableError(f"backend {self.backend.name!r}: {why}")

    def __repr__(self) -> str:
        return f"Session({self.bundle!r}, backend={self.backend.name}:{self.backend.device})"

    # ------------------------------------------------------------------ training
    def train(
        self,
        texts: "str | Iterable[str]",
        steps: int | None = None,
        seconds: float | None = None,
        batch_size: int | None = None,
        progress: bool = False,
        seed: int | None = None,
        cache: "HiddenCacheLike | None" = None,
        preferences: "Iterable[Preference] | None" = None,
        preference_weight: float = 1.0,
        beta: float = 0.1,
        preference_batch: int | None = None,
    ) -> TrainReport:
        """Update the adapter on ``texts`` for ``steps`` optimizer steps or until ``seconds`` pass
        (whichever comes first; 20 steps when neither is given).

        Rows are the bundle's sequence length; batches cycle through shuffled rows. A step whose
        loss or gradient is NaN/inf is skipped (weights unchanged) and listed in the report.

        On a split bundle (``manifest.split``, a backend with ``SupportsSplit``) each row's prefix
        output is computed once, when the row is first drawn, and every later step over it runs
        the suffix alone; ``cache`` (a :class:`~.keyboard.hidden_cache.HiddenCache`) keeps those
        outputs across calls, in float16 (without one they are kept for this call, float32).

        ``preferences`` (:class:`~.preference.Preference`: a word the user took over one shown
        but ignored) add a DPO loss with the adapter loaded at the call's start as the reference
        policy: the reference log-probs are computed once, then every step takes the next
        ``preference_batch`` pairs (default: half the batch size, so the step runs about twice the
        rows), computes their margins with one forward pass, and trains on
        ``LM loss + preference_weight * mean DPO loss(beta)`` in one weighted step (see
        :mod:`~.preference`). The report then adds ``preference_losses`` and
        ``preference_accuracy`` (one more forward pass over all pairs after the last step; the
        reference pass counts in ``seconds``). ``None`` trains exactly as without the arguments.
        Raises :class:`InputTextError` for empty/non-UTF-8 text or bad preferences,
        :class:`ConfigError` for bad limits, ``beta``, ``preference_weight`` or
        ``preference_batch``, and :class:`BackendUnavailableError` when preferences are given to a
        backend whose training step takes no per-token loss weights.
        """
        texts = validate_texts(texts)
        if steps is not None and (not isinstance(steps, int) or steps <= 0):
            raise ConfigError(f"steps must be a positive integer, got {steps!r}")
        if seconds is not None and not (seconds > 0 and math.isfinite(seconds)):
            raise ConfigError(f"seconds must be a positive number, got {seconds!r}")
        if steps is None and seconds is None:
            steps = 20
        bs = batch_size or self.manifest.batch_size
        inputs, labels = pack_rows(self.tokenizer, texts, self.manifest.seq_len)
        cfg = TrainConfig(
            **{
                **asdict(self.train_config),
                "total_steps": steps or 1000,
                "seed": self.train_config.seed if seed is None else seed,
            }
        )
        self.backend.configure(cfg)
        rng = np.random.default_rng(cfg.seed)
        order = rng.permutation(len(inputs))
        pos = 0
        losses, skipped, tokens = [], [], 0
        hidden = PrefixOutputs(self.backend, inputs, cache)
        pref_rows = self._preference_rows(preferences) if preferences is not None else None
        pref = pair_prefix = None
        bar = _bar(steps, "train", progress)
        t0 = time.perf_counter()
        if pref_rows is not None:  # the reference pass runs here, with the adapter loaded now
            pair_prefix = PrefixOutputs(self.backend, pref_rows.input_ids, None)  # kept for the call
            pref = PreferenceSteps(
                self.backend,
                pref_rows,
                beta,
                preference_weight,
                max(1, bs // 2) if preference_batch is None else preference_batch,
                cfg.seed,
                hidden=pair_prefix.rows if pair_prefix.split else None,
            )
        pref_losses: list[float] = []
        step_times: list[float] = []
        stopped_by = "steps"
        i = 0
        while steps is None or i < steps:
            elapsed = time.perf_counter() - t0
            if seconds is not None and step_times and elapsed + float(np.median(step_times)) > seconds:
                stopped_by = "seconds"
                break
            idx = [order[(pos + j) % len(order)] for j in range(min(bs, len(order)))]
            pos += len(idx)
            if pos >= len(order):
                order, pos = rng.permutation(len(inputs)), 0
            ts = time.perf_counter()
            try:
                if pref is not None:
                    ps = pref.step(hidden.rows(idx) if hidden.split else inputs[idx], labels[idx])
                    r = ps.result
                    pref_losses.append(ps.dpo_loss)
                elif hidden.split:
                    r = self.backend.train_step_hidden(hidden.rows(idx), labels[idx])
                else:
                    r = self.backend.train_step(inputs[idx], labels[idx])
            finally:
                self.adapter_version += 1
            step_times.append(time.perf_counter() - ts)
            losses.append(r.loss if pref is None else ps.lm_loss)
            tokens += r.tokens
            if r.skipped:
                skipped.append(i)
            i += 1
            if bar is not None:
                bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.3f}", skipped=len(skipped))
        if bar is not None:
            bar.close()
        secs = time.perf_counter() - t0
        return TrainReport(
            self.backend.name,
            self.backend.device,
            i,
            skipped,
            losses,
            secs,
            tokens,
            tokens / secs if secs > 0 else 0.0,
            peak_rss_mib(),
            stopped_by,
            round(hidden.seconds + (pair_prefix.seconds if pair_prefix else 0.0), 3),
            hidden.computed + (pair_prefix.computed if pair_prefix else 0),
            hidden.cached,
            pref_losses,
            pref.accuracy() if pref is not None else None,
        )

    def _preference_rows(self, preferences) -> PairRows:
        """The pair rows of ``preferences`` (validated) for this bundle's rows."""
        return pair_rows(self.tokenizer, validate_preferences(preferences), self.manifest.seq_len)

    # ------------------------------------------------------------------ evaluation
    def eval(
        self,
        texts: "str | Iterable[str]",
        batch_size: int | None = None,
        progress: bool = False,
        cache: "HiddenCacheLike | None" = None,
    ) -> EvalReport:
        """Loss, perplexity and top-1/top-3 next-token accuracy of the current adapter on ``texts``.

        ``cache``: on a split bundle, prefix outputs are taken from / kept in it (see :meth:`train`)."""
        texts = validate_texts(texts)
        inputs, labels = pack_rows(self.tokenizer, texts, self.manifest.seq_len)
        bs = batch_size or self.manifest.batch_size
        loss = tok = top1 = top3 = 0
        hidden = PrefixOutputs(self.backend, inputs, cache)
        if hidden.split:  # every row's prefix output up front, PREFIX_ROWS at a time
            hidden.rows(range(len(inputs)))
        bar = _bar(math.ceil(len(inputs) / bs), "eval", progress)
        for s in range(0, len(inputs), bs):
            if hidden.split:
                e = self.backend.eval_hidden(hidden.rows(range(s, min(s + bs, len(inputs)))), labels[s : s + bs])
            else:
                e = self.backend.eval_batch(inputs[s : s + bs], labels[s : s + bs])
            loss, tok, top1, top3 = loss + e.loss_sum, tok + e.tokens, top1 + e.top1, top3 + e.top3
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()
        mean = loss / max(tok, 1)
        return EvalReport(mean, float(math.exp(min(mean, 50))), top1 / max(tok, 1), top3 / max(tok, 1), tok)

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """float32 logits [T, vocab] for one sequence of token ids, adapter applied.

        Raises :class:`InputTextError` for an empty sequence or ids outside the vocabulary and
        :class:`SequenceTooLongError` beyond the model's context.
        """
        ids = np.asarray(list(token_ids), dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise InputTextError("token_ids must be a non-empty 1-D sequence of ints")
        vocab = self.manifest.arch.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            raise InputTextError(
                f"token id {int(ids.max() if ids.max() >= vocab else ids.min())} outside the vocabulary [0, {vocab})"
            )
        ctx = self.manifest.arch.max_position_embeddings
        if ids.size > ctx:
            raise SequenceTooLongError(f"{ids.size} tokens exceed the model's context of {ctx}")
        with self.lock:
            return self.backend.logits(ids[None])[0]

    # ------------------------------------------------------------------ adapters
    def save_adapter(self, path: "str | os.PathLike") -> Path:
        """Write the current adapter in PEFT format (atomic: an existing adapter is replaced only
        once the new one is complete)."""
        adapter = Adapter(
            self.manifest.lora,
            self.backend.get_adapter(),
            self.manifest.base_sha256,
            {
                "pocketpeft.backend": self.backend.name,
                # what it was trained on top of: the Personalizer re-gates it when the global changes
                **({"pocketpeft.global_sha256": self.global_info.sha256} if self.global_info else {}),
            },
        )
        return save_adapter(adapter, path, base_name=f"pocketpeft:{self.manifest.base_source}")

    def load_adapter(self, path: "str | os.PathLike") -> None:
        """Load a PEFT adapter (ours or peft's) for this bundle's base.

        Raises :class:`BaseModelMismatchError` (another base), :class:`AdapterShapeError`
        (other layers, rank or scaling), or the file errors of :func:`load_adapter`.
        The current adapter is kept if anything fails.
        """
        ad = load_adapter(path, expect_base_sha256=self.manifest.base_sha256)
        mine = self.manifest.lora
        if not math.isclose(ad.config.scaling, mine.scaling):
            raise AdapterShapeError(
                f"adapter {path} has LoRA scaling {ad.config.scaling:g} "
                f"(r={ad.config.r}, alpha={ad.config.lora_alpha}), this bundle uses {mine.scaling:g}"
            )
        check_adapter_shapes(ad, self.manifest.trainable, str(path))
        self.set_adapter_tensors(ad.tensors)

    def reset_adapter(self) -> None:
        """Go back to the bundle's initial adapter."""
        self.set_adapter_tensors(self.bundle.initial_adapter().tensors)

    def get_adapter_tensors(self) -> dict[str, np.ndarray]:
        """The current LoRA tensors under PEFT key names."""
        return self.backend.get_adapter()

    def set_adapter_tensors(self, tensors: "dict[str, np.ndarray]") -> None:
        """Replace the LoRA tensors (PEFT key names; the backend checks names, shapes and
        finiteness and keeps the current adapter if they are wrong). Moves :attr:`adapter_version`."""
        with self.lock:
            try:
                self.backend.set_adapter(tensors)
            finally:
                self.adapter_version += 1

    # ------------------------------------------------------------------ suggestions
    def suggest(self, prefix: str, k: int = 3, deadline_ms: float | None = None):
        """The ``k`` most likely next words after ``prefix`` (the message typed so far; the text
        after its last whitespace is completed), best first, as
        :class:`~.predictor.Suggestions` (a list of words). See :class:`~.predictor.Predictor`.

        ``deadline_ms``: answer within this many milliseconds from what is ready (``complete``
        says whether the search finished) and keep searching in a background thread so the next
        keystroke finds more ready (:meth:`.predictor.Predictor.suggest_scored`).
        One Predictor is built on first use and kept, so its KV cache and memoized distributions
        carry over between keystrokes; when :attr:`adapter_version` moves (this session changed
        the weights), the caches are dropped.
        Raises :class:`InputTextError` for non-text / non-UTF-8 input, :class:`ConfigError` for a
        bad ``k`` or ``deadline_ms``.
        """
        return self.predictor.suggest(prefix, k, deadline_ms)

    def prefetch(self, prefix: str, k: int = 3, seconds: float = 0.2) -> int:
        """Idle-time work between keystrokes: precompute the likely next keystrokes' suggestions
        after ``prefix`` for at most ``seconds`` (see :meth:`.predictor.Predictor.prefetch`);
        returns the forward passes run. Suggestions are the same with or without it."""
        return self.predictor.prefetch(prefix, k, seconds)

    @property
    def predictor(self):
        """The session's :class:`~.predictor.Predictor`, built on first use and kept."""
        from .predictor import Predictor

        if getattr(self, "_predictor", None) is None:
            self._predictor = Predictor(
                self.backend,
                self.tokenizer,
                adapter_version=lambda: self.adapter_version,
                max_context=min(1024, self.manifest.arch.max_position_embeddings),
                lock=self.lock,
            )
        return self._predictor

    def eval_keystrokes(self, texts: "str | Iterable[str]", k: int = 3, max_messages: int | None = None) -> dict:
        """Keyboard metrics of the current adapter on held-out messages (see
        :func:`~.keystrokes.keystroke_metrics`): ``next_word_top1``, ``next_word_top3``,
        ``keystroke_savings``, ``words``, ``chars``, ``messages``."""
        from .keystrokes import keystroke_metrics

        return keystroke_metrics(self.suggest, texts, k=k, max_messages=max_messages)


class HiddenCacheLike(Protocol):
    """What :meth:`Session.train` needs of a prefix-output cache (``HiddenCache`` is one)."""

    def hidden_for(
        self, rows: np.ndarray, compute: Callable[[np.ndarray], np.ndarray], batch: int = 8
    ) -> np.ndarray: ...


#: rows per prefix run: a run of a quantized prefix dequantizes every frozen weight once, so
#: bigger runs spread that cost (activations of 16 rows x 64 tokens are a few MiB)
PREFIX_ROWS = 16


class PrefixOutputs:
    """A split bundle's prefix outputs for packed rows ``inputs`` [R, T] (what one ``train`` /
    ``eval`` call uses): each row's computed on first use (through ``cache`` when given) and kept.
    ``split`` is False when ``backend`` doesn't run a split bundle (then nothing is computed).
    ``seconds``, ``computed`` and ``cached`` count the work and the cache hits."""

    def __init__(self, backend: Backend, inputs: np.ndarray, cache: "HiddenCacheLike | None") -> None:
        self.split = isinstance(backend, SupportsSplit) and backend.split_layer is not None
        self.backend, self.inputs, self.cache = backend, inputs, cache
        self.kept: dict[int, np.ndarray] = {}
        self.seconds, self.computed, self.cached = 0.0, 0, 0

    def _compute(self, ids: np.ndarray) -> np.ndarray:
        self.computed += len(ids)
        return self.backend.prefix(ids)

    def rows(self, idx: Iterable[int]) -> np.ndarray:
        """The prefix outputs of rows ``idx``, stacked [len(idx), T, hidden]."""
        idx = [int(i) for i in idx]
        todo = sorted({i for i in idx if i not in self.kept})
        if todo:
            t0, before = time.perf_counter(), self.computed
            if self.cache is not None:
                got = self.cache.hidden_for(self.inputs[todo], self._compute, batch=PREFIX_ROWS)
                self.cached += len(todo) - (self.computed - before)
            else:
                got = np.concatenate(
                    [self._compute(self.inputs[todo[s : s + PREFIX_ROWS]]) for s in range(0, len(todo), PREFIX_ROWS)]
                )
            self.kept.update(zip(todo, got))
            self.seconds += time.perf_counter() - t0
        return np.stack([self.kept[i] for i in idx])


def _bar(total: int | None, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False)
