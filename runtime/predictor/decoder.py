"""The one fallback decoder, for backends without :class:`~..protocol.SupportsDecoder`."""

from __future__ import annotations

import numpy as np


class RecomputeDecoder:
    """:class:`~..protocol.Decoder` for backends without a KV cache or without ``decoder()``:
    every ``extend`` runs ``backend.logits`` over the whole sequence so far."""

    def __init__(self, backend) -> None:
        self._backend, self._ids = backend, []

    @property
    def n_tokens(self) -> int:
        return len(self._ids)

    def extend(self, ids: "list[int]") -> np.ndarray:
        ids = [int(i) for i in ids]
        self._ids.extend(ids)
        return self._backend.logits(np.asarray([self._ids], np.int64))[0][len(self._ids) - len(ids) :]

    def truncate(self, n: int) -> None:
        del self._ids[n:]
