"""Differential privacy accounting of fleet training with Google's ``dp_accounting``.

One round of DP-FedAvg releases the sum of clipped client deltas (L2 bound ``C``) plus Gaussian
noise of std ``noise_multiplier * C`` (distributed across the clients, see
:func:`pocketpeft.fleet.updates.client_noise_std`), over a sample of the clients in which each is
included with probability ``sampling_rate``: a Poisson-subsampled Gaussian mechanism, with
user-level sensitivity ``C`` (one user changes one clipped delta). ``rounds`` rounds compose. The
RDP accountant turns that into (ε, δ).

The server samples with :func:`poisson_sample` when DP is on, so the accounted mechanism is the
one run. The guarantee holds for the released global adapter as long as clients add their noise
honestly; without secure aggregation the server itself sees each update with only a
``1/sqrt(expected clients)`` share of the noise, so it must be trusted.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import asdict, dataclass

import numpy as np

from pocketpeft.errors import ConfigError, MissingDependencyError

ACCOUNTANT = "dp_accounting RDP"
DEFAULT_DELTA = 1e-5


@contextlib.contextmanager
def _quiet_absl():
    """dp_accounting logs a warning through absl for every RDP order whose series does not converge
    (harmless: that order is left out of the minimum); keep them off the terminal."""
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _dpa():
    try:
        import dp_accounting
        from dp_accounting import rdp
    except ImportError as e:  # pragma: no cover - the fleet extra installs it
        raise MissingDependencyError(
            "dp-accounting is not installed; install the fleet extra: pip install 'pocketpeft[fleet]'"
        ) from e
    return dp_accounting, rdp


def _check(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> None:
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ConfigError(f"noise_multiplier must be a positive number, got {noise_multiplier!r}")
    if not 0 < sampling_rate <= 1:
        raise ConfigError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds must be a positive integer, got {rounds!r}")
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}")


def dp_event(noise_multiplier: float, sampling_rate: float, rounds: int):
    """The ``dp_accounting`` event of ``rounds`` Poisson-subsampled Gaussian rounds."""
    dpa, _ = _dpa()
    return dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(sampling_rate, dpa.GaussianDpEvent(noise_multiplier)), rounds
    )


def epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float = DEFAULT_DELTA) -> float:
    """ε at ``delta`` of ``rounds`` rounds of the Poisson-subsampled Gaussian mechanism (RDP accountant).

    Raises :class:`ConfigError` for out-of-range arguments."""
    _check(noise_multiplier, sampling_rate, rounds, delta)
    _, rdp = _dpa()
    with _quiet_absl():
        acc = rdp.RdpAccountant()
        acc.compose(dp_event(noise_multiplier, sampling_rate, rounds))
        return float(acc.get_epsilon(delta))


def noise_for_epsilon(target_epsilon: float, sampling_rate: float, rounds: int, delta: float = DEFAULT_DELTA) -> float:
    """The smallest noise multiplier whose ``rounds`` rounds at ``sampling_rate`` stay within
    ``target_epsilon`` at ``delta`` (``dp_accounting.mechanism_calibration``, RDP accountant).

    Raises :class:`ConfigError` for a non-positive target or out-of-range arguments."""
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ConfigError(f"target epsilon must be a positive number, got {target_epsilon!r}")
    _check(1.0, sampling_rate, rounds, delta)
    dpa, rdp = _dpa()
    from dp_accounting import mechanism_calibration as mc

    with _quiet_absl():
        try:
            z = mc.calibrate_dp_mechanism(
                rdp.RdpAccountant,
                lambda z: dp_event(z, sampling_rate, rounds),
                target_epsilon,
                delta,
                bracket_interval=mc.ExplicitBracketInterval(0.05, 1e3),
                tol=1e-4,
            )
        except ValueError as e:  # the target is out of reach within the bracket
            raise ConfigError(
                f"no noise multiplier in [0.05, 1000] reaches epsilon {target_epsilon:g} at delta {delta:g} "
                f"over {rounds} rounds at sampling rate {sampling_rate:g}: {e}"
            ) from e
    return float(z)


@dataclass
class DpConfig:
    """Client-level DP of a fleet run: clip bound, noise multiplier, δ and the accounted (ε, δ).

    Build with :meth:`from_target` (a target ε) or directly with a noise multiplier."""

    clip_norm: float
    noise_multiplier: float
    sampling_rate: float
    rounds: int
    delta: float = DEFAULT_DELTA

    def __post_init__(self) -> None:
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise ConfigError(f"clip norm must be a positive number, got {self.clip_norm!r}")
        _check(self.noise_multiplier, self.sampling_rate, self.rounds, self.delta)

    @classmethod
    def from_target(
        cls, target_epsilon: float, clip_norm: float, sampling_rate: float, rounds: int, delta: float = DEFAULT_DELTA
    ) -> "DpConfig":
        return cls(
            clip_norm, noise_for_epsilon(target_epsilon, sampling_rate, rounds, delta), sampling_rate, rounds, delta
        )

    def epsilon(self, rounds: int | None = None) -> float:
        """ε after ``rounds`` rounds (default: all)."""
        return epsilon(self.noise_multiplier, self.sampling_rate, rounds or self.rounds, self.delta)

    def record(self, rounds: int | None = None) -> dict:
        """What :class:`~pocketpeft.global_adapter.GlobalInfo` records in ``dp``."""
        r = rounds if rounds is not None else self.rounds
        return {
            "epsilon": self.epsilon(r) if r > 0 else 0.0,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.clip_norm,
            "sampling_rate": self.sampling_rate,
            "rounds": r,
            "accountant": ACCOUNTANT,
        }

    def to_dict(self) -> dict:
        return asdict(self)


def poisson_sample(node_ids: list[int], rate: float, rng: np.random.Generator) -> list[int]:
    """Each node independently with probability ``rate`` (the sampling the accountant assumes)."""
    return [n for n in node_ids if rng.random() < rate]
