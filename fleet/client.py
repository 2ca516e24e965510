"""The local update a device runs in a fleet round: train from the global adapter on its own
text, return only the (clipped, noised) change of the shared tensors and a few counts.

The device's text never leaves this module: :func:`local_update` returns a :class:`LocalUpdate`
holding float32 deltas under PEFT names and numbers (examples, steps, loss, seconds). Opened
sessions are cached per process (:func:`open_session`), so a Ray actor of the simulation or a
SuperNode's ClientApp process loads the bundle once and reuses it round after round.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from pocketpeft.errors import ConfigError
from pocketpeft.text import pack_rows, validate_texts

from . import updates as U

_SESSIONS: dict[tuple[str, str], object] = {}
_LOCK = threading.Lock()


def open_session(bundle: "str | os.PathLike", backend: str = "auto"):
    """A :class:`~pocketpeft.runtime.Session` of ``bundle`` on ``backend``, opened once per process.

    A bundle with an installed global adapter is opened with that adapter *removed*: fleet training
    learns the next global adapter in the trainable slot, which must start from the plain base."""
    from pocketpeft import runtime

    key = (str(Path(bundle).resolve()), backend)
    with _LOCK:
        sess = _SESSIONS.get(key)
        if sess is None:
            sess = runtime.open(key[0], backend=backend)
            if sess.global_info is not None:
                sess.set_global_tensors(None)
            _SESSIONS[key] = sess
    return sess


def close_sessions() -> None:
    """Forget the cached sessions (tests; a process that switches bundles)."""
    with _LOCK:
        for sess in _SESSIONS.values():
            close = getattr(sess.backend, "close", None)
            if close is not None:  # llama.cpp holds native memory until closed
                close()
        _SESSIONS.clear()


@dataclass
class LocalConfig:
    """How a device trains in one round (the server sends it with the global adapter).

    ``steps`` / ``seconds``: the local budget (whichever ends first; at least one must be set).
    ``clip_norm``: L2 bound of the shared delta (None: no clipping). ``noise_std``: per-client
    Gaussian noise (see :func:`~.updates.client_noise_std`; 0: none). ``fedsa``: share ``lora_A``
    only and keep the device's own ``lora_B``; ``share_b``: under FedSA, send B too (the final
    round, see :mod:`.server`). ``seed``: the data order and noise of this device in this round."""

    steps: int | None = 10
    seconds: float | None = None
    lr: float | None = None
    batch_size: int | None = None
    clip_norm: float | None = None
    noise_std: float = 0.0
    fedsa: bool = False
    share_b: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps is None and self.seconds is None:
            raise ConfigError("a local update needs a budget: steps and/or seconds")
        if self.steps is not None and (
            isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1
        ):
            raise ConfigError(f"steps must be a positive integer, got {self.steps!r}")
        if self.seconds is not None and not (self.seconds > 0 and math.isfinite(self.seconds)):
            raise ConfigError(f"seconds must be a positive number, got {self.seconds!r}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        if self.clip_norm is not None and not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise ConfigError(f"clip_norm must be a positive number, got {self.clip_norm!r}")
        if not (self.noise_std >= 0 and math.isfinite(self.noise_std)):
            raise ConfigError(f"noise_std must be a number >= 0, got {self.noise_std!r}")
        if self.noise_std > 0 and self.clip_norm is None:
            raise ConfigError("noise without clipping gives no privacy: set clip_norm with noise_std")

    def shared(self, names: Sequence[str]) -> list[str]:
        """The tensor names this round's delta carries."""
        return U.shared_names(names, fedsa=self.fedsa and not self.share_b)


@dataclass
class LocalUpdate:
    """What a device sends back: the delta of the shared tensors and numbers, nothing else."""

    delta: dict[str, np.ndarray]
    num_examples: int
    steps: int
    train_loss: float
    norm: float  # L2 norm of the delta before clipping
    seconds: float
    #: the device's adapter after training (kept on the device: FedSA's own lora_B); never sent
    local: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def metrics(self, base_sha256: str, private: bool = False) -> dict[str, int | float]:
        """The numeric metrics that go on the wire with the delta. ``private`` (a DP round): only
        what the DP guarantee covers or is data-independent — the step count and the base id; the
        training loss, the unclipped norm, the amount of text and the time taken would each tell
        the server something about this device's text outside the accountant's reckoning."""
        if private:
            return {"num-examples": 1, "steps": int(self.steps), "base-id": U.base_id(base_sha256)}
        return {
            "num-examples": int(self.num_examples),
            "steps": int(self.steps),
            "train-loss": float(self.train_loss),
            "norm": float(self.norm),
            "seconds": float(self.seconds),
            "base-id": U.base_id(base_sha256),
        }


def local_update(
    bundle: "str | os.PathLike",
    texts: "Sequence[str]",
    global_tensors: Mapping[str, np.ndarray],
    config: LocalConfig,
    backend: str = "auto",
    local_b: Mapping[str, np.ndarray] | None = None,
) -> LocalUpdate:
    """One device's round: start from ``global_tensors`` (the shared tensors of the global adapter;
    under FedSA with ``local_b`` the device's own ``lora_B`` replaces the global one), train on
    ``texts`` within ``config``'s budget, and return the clipped, noised delta of the shared tensors.

    The split device path (a split bundle's prefix computed once, the suffix trained) is used by
    ``Session.train`` by itself. Raises :class:`InputTextError` for unusable text, :class:`ConfigError`
    for a bad config, :class:`AdapterShapeError` for global tensors of another LoRA shape.
    """
    from pocketpeft.runtime import TrainConfig

    texts = validate_texts(texts, what="device texts")
    sess = open_session(bundle, backend)
    expected = sess.manifest.trainable
    start = {k: np.asarray(v, np.float32) for k, v in global_tensors.items()}
    if config.fedsa and local_b:
        start.update({k: np.asarray(v, np.float32) for k, v in local_b.items() if k in expected and not U.is_lora_a(k)})
    missing = sorted(set(expected) - set(start))
    if missing:  # the server sends every tensor; a partial start is a protocol error
        raise ConfigError(f"global tensors lack {len(missing)} of the bundle's LoRA tensors (e.g. {missing[:2]})")
    sess.set_adapter_tensors(start)
    sess.train_config = TrainConfig(lr=config.lr) if config.lr is not None else TrainConfig()
    t0 = time.perf_counter()
    rep = sess.train(texts, steps=config.steps, seconds=config.seconds, batch_size=config.batch_size, seed=config.seed)
    after = sess.get_adapter_tensors()
    names = config.shared(expected)
    # against what the server sent: under FedSA the final round's B delta is then B_local - B_global
    # (the devices' own B, averaged), not just this round's change of it
    sent = {k: np.asarray(v, np.float32) for k, v in global_tensors.items()}
    delta = U.subtract(after, sent, names)
    norm = U.l2_norm(delta)
    if config.clip_norm is not None:
        delta, norm = U.clip_update(delta, config.clip_norm)
    if config.noise_std > 0:
        # the noise must be unpredictable to the server: fresh OS entropy, not the round's seed
        delta = U.add_gaussian_noise(delta, config.noise_std, np.random.default_rng())
    rows = len(pack_rows(sess.tokenizer, texts, sess.manifest.seq_len)[0])
    losses = [x for x in rep.losses if math.isfinite(x)]
    return LocalUpdate(
        delta=delta,
        num_examples=rows,
        steps=rep.steps,
        train_loss=float(np.mean(losses)) if losses else float("nan"),
        norm=norm,
        seconds=time.perf_counter() - t0,
        local={k: np.asarray(v, np.float32) for k, v in after.items()},
    )
