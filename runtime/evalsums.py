"""Next-token evaluation sums in numpy, for backends that hand back logits (no torch on a device)."""

from __future__ import annotations

import numpy as np

from pocketpeft.text import IGNORE

from .protocol import EvalSums

_ROWS = 256  # scored tokens per chunk: bounds the float32 temporaries to _ROWS x vocab


def eval_sums(logits: np.ndarray, labels: np.ndarray) -> EvalSums:
    """Summed cross-entropy, scored tokens and top-1/top-3 hits of ``logits`` [..., vocab] against
    aligned int ``labels`` [...] (-100 ignored), as the torch backend's ``eval_sums`` computes them.

    Cross-entropy is ``logsumexp(row) - row[target]`` with the row maximum subtracted first (a
    stable log-softmax) on the float32 logits, each token's terms summed in float64. A top-k hit
    is a target with fewer than k logits strictly above its own (torch's ``topk`` breaks exact
    ties arbitrarily; real logits have none)."""
    labels = np.asarray(labels, dtype=np.int64)
    logits = np.asarray(logits)
    valid = labels != IGNORE
    tg = labels[valid]
    if tg.size == 0:
        return EvalSums(0.0, 0, 0, 0)
    lg = logits[valid]  # [N, vocab]; a copy of the scored rows only
    loss, top1, top3 = 0.0, 0, 0
    for s in range(0, tg.size, _ROWS):
        x, t = lg[s : s + _ROWS].astype(np.float32, copy=False), tg[s : s + _ROWS]
        m = x.max(axis=-1, keepdims=True)
        lse = m[:, 0].astype(np.float64) + np.log(np.exp(x - m).sum(axis=-1, dtype=np.float64))
        target = x[np.arange(t.size), t]
        above = (x > target[:, None]).sum(axis=-1)
        loss += float((lse - target.astype(np.float64)).sum())
        top1 += int((above == 0).sum())
        top3 += int((above < 3).sum())
    return EvalSums(loss, int(tg.size), top1, top3)


def row_losses(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Summed cross-entropy of each row of ``logits`` [B, T, vocab] against ``labels`` [B, T]
    (-100 ignored), float64 [B]: what :func:`eval_sums` adds up, row by row."""
    labels = np.asarray(labels, dtype=np.int64)
    return np.array([eval_sums(logits[i : i + 1], labels[i : i + 1]).loss_sum for i in range(len(labels))])
