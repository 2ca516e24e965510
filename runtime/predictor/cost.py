"""The predictor's cost model: how long a forward pass of ``n`` paths takes, from recent passes."""

from __future__ import annotations

import numpy as np

_BATCH_COST = 2.5  # the most single passes' time one batched pass may take (see Predictor._dist)


class _CostModel:
    """Seconds a forward pass of ``n`` paths takes, fitted (least squares, ``a + b n``) to the
    recent passes; used to keep prefetch passes inside the idle time they were given."""

    def __init__(self, keep: int = 32) -> None:
        self._obs: list[tuple[int, float]] = []
        self._keep = keep
        self._fit: tuple[float, float, float] | None = None  # (a, b, floor), refitted on add

    def add(self, n: int, seconds: float) -> None:
        self._obs.append((n, seconds))
        del self._obs[: -self._keep]
        ns, ts = np.array(self._obs, float).T
        if np.ptp(ns) == 0:  # one batch size seen: scale it, pessimistically
            self._fit = (0.0, float(ts.mean() / ns[0]), float(ts.mean()))
        else:
            b, a = np.polyfit(ns, ts, 1)
            self._fit = (float(a), float(b), float(ts.min()))

    def predict(self, n: int) -> float:
        if self._fit is None:
            return 0.0
        a, b, floor = self._fit
        return max(a + b * n, floor)
