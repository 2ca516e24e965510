"""Forward-only LoRA updates: SPSA / MeZO-style zeroth-order steps over an inference graph.

Phone NPUs run inference graphs, not backward passes. When a backend can compute the loss with
the LoRA tensors swapped in per call (``set_adapter`` + ``eval_batch``; ONNX Runtime's
``infer.onnx`` takes them as graph inputs), the adapter can still be trained from forward passes
alone. For each of ``perturbations`` directions ``z`` (standard normal, one entry per LoRA weight)::

    g   = (L(theta + eps*z) - L(theta - eps*z)) / (2*eps)      # the directional derivative along z
    theta <- theta - lr_t * mean_k(g_k * z_k)

``E[g*z]`` is the gradient (up to O(eps^2)), so this is SGD on an unbiased but noisy gradient
estimate: each step costs two forward passes per perturbation and no activations are kept, so
peak memory is the inference graph's plus the LoRA tensors. ``z`` is never stored: it is
regenerated, tensor by tensor, from a counter-based generator (numpy's Philox) keyed by
``(seed, step, perturbation, tensor index)``, so runs are deterministic from the seed.

:class:`ForwardOnlyTrainer` wraps any loaded backend and implements ``train_step`` this way, so
:meth:`Session.train <pocketpeft.runtime.session.Session.train>` works unchanged; every other
verb (eval, logits, decoding) goes to the wrapped backend with the current adapter set.
A backend may offer ``loss_sum(input_ids, labels) -> float`` (summed token cross-entropy, no
top-k: :class:`~.protocol.SupportsLossSum`); the trainer then uses it instead of ``eval_batch``.

The learning rate follows :class:`TrainConfig`'s warmup + cosine schedule, scaled so its peak is
:attr:`ForwardOnlyConfig.lr` (SGD on a zeroth-order estimate wants a far smaller step than
AdamW's ``TrainConfig.lr``). ``TrainConfig.weight_decay`` applies (decoupled); ``grad_clip``,
``betas`` and ``grad_accum`` do not (no backprop gradient, no moments). A step with a
non-finite loss is skipped: the weights stay as they were.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterator, Mapping

import numpy as np

from pocketpeft.errors import ConfigError

from .protocol import Backend, Capabilities, EvalSums, StepResult, SupportsDecoder, SupportsLossSum, TrainConfig

UPDATE_MODES = ("auto", "backprop", "forward-only")


@dataclass(frozen=True)
class ForwardOnlyConfig:
    """Options of the forward-only (SPSA) update.

    ``lr``: peak SGD learning rate (TrainConfig's schedule shape, scaled to this peak); the default
    was tuned on SmolLM2 (LoRA r=8 on q/k/v/o, 0.92M weights, 2-8 rows of 64 tokens a step): 1e-3
    learns slowly, 3e-3 is noisy, 1e-2 diverges;
    ``eps``: perturbation size; ``perturbations``: directions averaged per step (each costs two
    forward passes); ``seed``: seed of the directions (``None``: ``TrainConfig.seed``).
    Raises :class:`ConfigError` for values outside those ranges.
    """

    lr: float = 2e-3
    eps: float = 1e-3
    perturbations: int = 1
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("lr", "eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"ForwardOnlyConfig.{name} must be a positive finite number, got {v!r}")
        if isinstance(self.perturbations, bool) or not isinstance(self.perturbations, int) or self.perturbations < 1:
            raise ConfigError(f"ForwardOnlyConfig.perturbations must be an integer >= 1, got {self.perturbations!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ConfigError(f"ForwardOnlyConfig.seed must be a non-negative integer or None, got {self.seed!r}")


def direction(seed: int, step: int, k: int, shapes: Mapping[str, tuple[int, ...]]) -> Iterator[tuple[str, np.ndarray]]:
    """The perturbation ``z`` of (``seed``, ``step``, perturbation ``k``), one tensor at a time:
    ``(key, float32 standard normal array)`` in ``shapes`` order. Tensor ``i`` comes from its own
    Philox stream keyed by ``(seed, step, k, i)``, so any tensor can be regenerated alone."""
    for i, (key, shape) in enumerate(shapes.items()):
        gen = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, step, k, i])))
        yield key, gen.standard_normal(tuple(shape), dtype=np.float32)


def directional_derivative(loss, theta: Mapping[str, np.ndarray], z: Mapping[str, np.ndarray], eps: float) -> float:
    """The central-difference estimate ``(loss(theta + eps*z) - loss(theta - eps*z)) / (2*eps)``.

    ``loss`` maps a dict of tensors (same keys and dtypes as ``theta``) to a float. Arithmetic
    follows ``theta``'s dtype, so float64 tensors give a float64 estimate."""
    plus = {k: v + np.asarray(eps * z[k], dtype=v.dtype) for k, v in theta.items()}
    minus = {k: v - np.asarray(eps * z[k], dtype=v.dtype) for k, v in theta.items()}
    return (float(loss(plus)) - float(loss(minus))) / (2 * eps)


class ForwardOnlyTrainer:
    """A backend whose ``train_step`` is a forward-only SPSA step over ``inner`` (loaded).

    ``inner`` only needs ``set_adapter``, ``get_adapter`` and ``eval_batch`` (or ``loss_sum``):
    an inference-only backend qualifies. The trainer keeps the float32 master copy of the
    adapter; between steps ``inner`` holds it, so eval, logits and decoding see it.
    """

    update = "forward-only"

    def __init__(self, inner: Backend, config: ForwardOnlyConfig | None = None) -> None:
        self.inner = inner
        self.config = config or ForwardOnlyConfig()
        self.name = f"{inner.name}+forward-only"
        self.device = inner.device
        self.cfg = TrainConfig()
        self.step = 0
        self._theta: dict[str, np.ndarray] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._keep(inner.get_adapter())

    def __repr__(self) -> str:
        return f"ForwardOnlyTrainer({self.inner.name}:{self.device}, {self.config})"

    def capabilities(self) -> Capabilities:
        c = self.inner.capabilities()
        return dataclasses.replace(c, forward_only=True, notes=f"{c.notes}; forward-only (SPSA) updates".lstrip("; "))

    def load(self, bundle) -> None:
        """Load ``bundle`` into the wrapped backend and start from its adapter."""
        self.inner.load(bundle)
        self.set_adapter(self.inner.get_adapter())

    def configure(self, cfg: TrainConfig) -> None:
        """Set the schedule; the step count restarts (the wrapped backend's optimizer is not used)."""
        self.cfg, self.step = cfg, 0

    def lr_at(self, step: int) -> float:
        """SGD learning rate of step ``step``: TrainConfig's schedule with its peak at ``config.lr``."""
        return self.config.lr * self.cfg.lr_at(step) / self.cfg.lr if self.cfg.lr > 0 else 0.0

    @property
    def _seed(self) -> int:
        return self.cfg.seed if self.config.seed is None else self.config.seed

    def _loss(self, tensors: Mapping[str, np.ndarray], ids: np.ndarray, labels: np.ndarray) -> float:
        self.inner.set_adapter(tensors)
        if isinstance(self.inner, SupportsLossSum):
            return float(self.inner.loss_sum(ids, labels))
        return float(self.inner.eval_batch(ids, labels).loss_sum)

    def _shifted(self, k: int, scale: float) -> dict[str, np.ndarray]:
        """theta + scale * z_k, built tensor by tensor (z_k regenerated, never kept whole)."""
        return {
            key: self._theta[key] + np.float32(scale) * z
            for key, z in direction(self._seed, self.step, k, self._shapes)
        }

    def train_step(self, input_ids: np.ndarray, labels: np.ndarray) -> StepResult:
        """One SPSA step on [B, T] inputs and labels (-100 ignored). ``loss`` is the mean of
        L(theta +- eps*z) over the perturbations (L(theta) up to O(eps^2)); ``grad_norm`` is the
        norm of the estimated gradient mean_k(g_k * z_k)."""
        ids, lab = np.asarray(input_ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)
        n_tok = int((lab != -100).sum())
        denom, eps, n = max(n_tok, 1), self.config.eps, self.config.perturbations
        lr = self.lr_at(self.step)
        proj, losses = [], []
        for k in range(n):
            lp = self._loss(self._shifted(k, eps), ids, lab) / denom
            lm = self._loss(self._shifted(k, -eps), ids, lab) / denom
            losses += [lp, lm]
            proj.append((lp - lm) / (2 * eps))
        loss = float(np.mean(losses))
        if not all(math.isfinite(x) for x in losses):
            self.inner.set_adapter(self._theta)  # skip: the weights stay as they were
            return StepResult(loss, True, float("nan"), lr, n_tok)
        sq = 0.0
        decay = np.float32(1 - lr * self.cfg.weight_decay)
        zs = [direction(self._seed, self.step, k, self._shapes) for k in range(n)]
        for key in self._shapes:  # the generators advance in lockstep, one tensor at a time
            u = sum(np.float32(g / n) * next(z)[1] for g, z in zip(proj, zs))
            sq += float(np.dot(u.ravel(), u.ravel()))
            theta = self._theta[key]
            if self.cfg.weight_decay:
                theta *= decay
            theta -= np.float32(lr) * u
        self.inner.set_adapter(self._theta)
        self.step += 1
        return StepResult(loss, False, math.sqrt(sq), lr, n_tok)

    def eval_batch(self, input_ids: np.ndarray, labels: np.ndarray) -> EvalSums:
        return self.inner.eval_batch(input_ids, labels)

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        return self.inner.logits(input_ids)

    def get_adapter(self) -> dict[str, np.ndarray]:
        """Copies of the current LoRA tensors under PEFT keys."""
        return {k: v.copy() for k, v in self._theta.items()}

    def set_adapter(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Replace the adapter (the wrapped backend checks names, shapes and finiteness first)."""
        self.inner.set_adapter(tensors)
        self._keep(self.inner.get_adapter())
        self.step = 0

    def set_global(self, tensors: "Mapping[str, np.ndarray] | None") -> None:
        """The wrapped backend applies the frozen global adapter (raises where it can't)."""
        setter = getattr(self.inner, "set_global", None)
        if setter is None:
            from pocketpeft.errors import BackendUnavailableError

            raise BackendUnavailableError(f"backend {self.inner.name!r} does not apply a global adapter")
        setter(tensors)

    def _keep(self, tensors: Mapping[str, np.ndarray]) -> None:
        # sorted keys: z's tensor index, hence the run, doesn't depend on a backend's key order
        self._theta = {k: np.array(tensors[k], dtype=np.float32, copy=True) for k in sorted(tensors)}
        self._shapes = {k: v.shape for k, v in self._theta.items()}

    def decoder(self):
        """The wrapped backend's decoder; ``NotImplementedError`` where it has none (the predictor
        then recomputes over ``logits``, see :class:`~.predictor.RecomputeDecoder`)."""
        if not isinstance(self.inner, SupportsDecoder):
            raise NotImplementedError(f"backend {self.inner.name} has no incremental decoder")
        return self.inner.decoder()


def check_update(update: str) -> str:
    """``update`` if it is one of :data:`UPDATE_MODES`; else :class:`ConfigError` listing them."""
    if update not in UPDATE_MODES:
        raise ConfigError(f"update must be one of {', '.join(UPDATE_MODES)}; got {update!r}")
    return update
