"""Next-token evaluation sums in numpy, for backends that hand back logits (no torch on a device)."""

from __future__ import annotations

import numpy as np

from pocketpeft.text import IGNORE

from .protocol import EvalSums


def eval_sums(logits: np.ndarray, labels: np.ndarray) -> EvalSums:
    """Summed cross-entropy, scored tokens and top-1/top-3 hits of ``logits`` [..., vocab] against
    aligned int ``labels`` (-100 ignored), computed in float64 from float32 logits, as the torch
    backend's ``eval_sums`` computes them (a hit: fewer than 1 / 3 logits above the target's)."""
    labels = np.asarray(labels, dtype=np.int64)
    valid = labels != IGNORE
    lg = np.asarray(logits, dtype=np.float32)[valid].astype(np.float64)
    tg = labels[valid]
    if tg.size == 0:
        return EvalSums(0.0, 0, 0, 0)
    m = lg.max(axis=-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(lg - m).sum(axis=-1))
    target = lg[np.arange(tg.size), tg]
    above = (lg > target[:, None]).sum(axis=-1)
    return EvalSums(float((lse - target).sum()), int(tg.size), int((above == 0).sum()), int((above < 3).sum()))
