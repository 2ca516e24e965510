"""The host-side optimizer of the backends whose graphs only compute gradients (onnxruntime,
executorch): ``torch.nn.utils.clip_grad_norm_``'s global-norm clipping and ``torch.optim.AdamW``'s
single-tensor update (its CPU default, amsgrad off), in float32 numpy.

Device-safe: numpy only. LoRA tensors are a fraction of a percent of the weights, so these reads
and writes cost milliseconds per step.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from ..protocol import TrainConfig

__all__ = ["HostAdamW", "clip_coef"]


def clip_coef(grads: Iterable[np.ndarray], max_norm: float) -> tuple[np.float32, np.float32]:
    """``(global L2 norm, clipping coefficient)`` of ``grads`` as ``clip_grad_norm_`` computes
    them: the norm of the per-tensor norms, the coefficient ``max_norm / (norm + 1e-6)`` clamped at 1
    (always applied). ``max_norm <= 0`` means no clipping (an infinite bound). The norm may be
    NaN/inf: the caller skips the step then."""
    norms = np.array([np.sqrt(np.dot(g.ravel(), g.ravel())) for g in grads], dtype=np.float32)
    grad_norm = np.float32(np.sqrt(np.dot(norms, norms)))
    bound = np.float32(max_norm if max_norm > 0 else np.inf)
    with np.errstate(all="ignore"):
        coef = np.float32(min(bound / (grad_norm + np.float32(1e-6)), np.float32(1.0)))
    return grad_norm, coef


class HostAdamW:
    """``torch.optim.AdamW`` step for step over float32 arrays updated **in place** (a caller whose
    weights live elsewhere passes a copy and writes it back). Moments are kept per key; the step
    count starts at 0 and counts the steps taken (a skipped step is simply not taken)."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.steps = 0
        self.moments: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray], coef: np.float32, lr: float) -> None:
        """One update of every ``params[k]`` (float32, in place) by ``grads[k] * coef``."""
        cfg = self.cfg
        b1, b2 = cfg.betas
        t = self.steps + 1
        step_size = lr / (1 - b1**t)
        bc2_sqrt = np.float32(math.sqrt(1 - b2**t))
        for k, p in params.items():
            g = grads[k] * coef
            m, v = self.moments.get(k) or (np.zeros_like(p), np.zeros_like(p))
            if cfg.weight_decay:
                p *= np.float32(1 - lr * cfg.weight_decay)
            m += np.float32(1 - b1) * (g - m)  # exp_avg.lerp_(grad, 1 - beta1)
            v *= np.float32(b2)
            v += np.float32(1 - b2) * g * g  # exp_avg_sq.addcmul_(g, g, 1 - beta2)
            p += np.float32(-step_size) * (m / (np.sqrt(v) / bc2_sqrt + np.float32(cfg.eps)))
            self.moments[k] = (m, v)
        self.steps = t
