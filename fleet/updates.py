"""Client updates of the global LoRA adapter: validation, clipping, noise and aggregation (numpy only).

Everything on the wire is a mapping of PEFT tensor names (``base_model.model.model.layers.3.
self_attn.q_proj.lora_A.weight``) to float32 arrays. A client sends a *delta* (its adapter after
local training minus the global adapter it started from), never its adapter or its text.

- :func:`validate_update` is what the server runs on every reply before it is aggregated: a reply
  with NaN/inf, the wrong tensor names or shapes, another base model, or an L2 norm far outside the
  clipping bound is refused with an :class:`UpdateRejectedError` whose ``reason`` the server counts
  (:class:`RejectCounter`); a refused update is never aggregated.
- :func:`clip_update` scales a delta to L2 norm at most ``C`` (the per-client sensitivity of DP-FedAvg).
- :func:`add_gaussian_noise` adds the client's share of distributed DP noise:
  std ``noise_multiplier * C / sqrt(expected_clients)`` per client (:func:`client_noise_std`), so
  the *sum* of ``expected_clients`` updates — all a server behind secure aggregation ever sees —
  carries Gaussian noise of std ``noise_multiplier * C``, the Gaussian mechanism that
  :mod:`.dp` accounts for.
- :func:`fedavg` averages deltas weighted by example counts, or unweighted (``weights=None``): with DP
  the mean of clipped deltas is unweighted, as in DP-FedAvg (McMahan et al., 2018), because a
  client's weight would otherwise scale its sensitivity.
- :func:`shared_names` picks the tensors that travel: all of them (FedAvg) or only ``lora_A``
  (FedSA-LoRA, Guo et al., 2024: the A matrices carry what is common across clients, the B matrices
  what is client specific, so clients keep their own B between rounds).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Mapping, Sequence

import numpy as np

from pocketpeft.errors import (
    AdapterShapeError,
    BaseModelMismatchError,
    ConfigError,
    CorruptFileError,
    PocketPeftError,
)

Tensors = Mapping[str, np.ndarray]

#: reasons a reply is refused (keys of :class:`RejectCounter`)
REASONS = ("error", "format", "names", "shapes", "non_finite", "base", "norm")

#: default slack of the norm check: an update with norm above ``NORM_SLACK`` x its bound is refused
NORM_SLACK = 1.5


class UpdateRejectedError(PocketPeftError, ValueError):
    """A client update the server refuses; ``reason`` is one of :data:`REASONS`."""

    reason = "format"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class UpdateFormatError(UpdateRejectedError):
    """The reply is not a delta at all (missing records, non-float arrays, a client error)."""

    reason = "format"


class UpdateShapeError(UpdateRejectedError, AdapterShapeError):
    """Tensor names or shapes other than the bundle's (``reason`` "names" or "shapes")."""

    reason = "shapes"


class NonFiniteUpdateError(UpdateRejectedError, CorruptFileError):
    """A tensor holds NaN or inf."""

    reason = "non_finite"


class UpdateBaseMismatchError(UpdateRejectedError, BaseModelMismatchError):
    """The update was computed on another base model."""

    reason = "base"


class UpdateNormError(UpdateRejectedError):
    """The update's L2 norm is far outside the clipping bound."""

    reason = "norm"


class RejectCounter(Counter):
    """Refused updates counted by reason (a :class:`collections.Counter` over :data:`REASONS`)."""

    def add(self, error: UpdateRejectedError) -> None:
        self[error.reason] += 1

    def as_dict(self) -> dict[str, int]:
        return {r: int(self.get(r, 0)) for r in REASONS}


# ---------------------------------------------------------------------------- names and vectors
def is_lora_a(name: str) -> bool:
    return ".lora_A." in name


def shared_names(names: Iterable[str], fedsa: bool = False) -> list[str]:
    """The tensor names clients send, sorted: every tensor, or with ``fedsa`` only ``lora_A``."""
    names = sorted(names)
    return [n for n in names if is_lora_a(n)] if fedsa else names


def flatten(tensors: Tensors, names: Sequence[str] | None = None) -> np.ndarray:
    """The tensors ``names`` (default: all, sorted) concatenated into one float64 vector."""
    names = sorted(tensors) if names is None else names
    if not names:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([np.asarray(tensors[n], dtype=np.float64).ravel() for n in names])


def unflatten(
    vector: np.ndarray, shapes: Mapping[str, Sequence[int]], names: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """Inverse of :func:`flatten`: float32 arrays of ``shapes`` (in ``names`` order, default sorted).

    Raises :class:`ConfigError` when the vector's length is not the shapes' total size."""
    names = sorted(shapes) if names is None else list(names)
    sizes = [int(np.prod(shapes[n])) for n in names]
    if vector.ndim != 1 or vector.size != sum(sizes):
        raise ConfigError(f"vector of {vector.size} values does not fill tensors of {sum(sizes)} values")
    out, pos = {}, 0
    for n, s in zip(names, sizes):
        out[n] = vector[pos : pos + s].reshape(shapes[n]).astype(np.float32)
        pos += s
    return out


def l2_norm(tensors: Tensors) -> float:
    """Global L2 norm over all tensors (float64 accumulation)."""
    return float(math.sqrt(sum(float(np.sum(np.square(np.asarray(v, dtype=np.float64)))) for v in tensors.values())))


def subtract(a: Tensors, b: Tensors, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """``a - b`` per tensor over ``names`` (default: ``a``'s), float32."""
    return {n: (np.asarray(a[n], np.float32) - np.asarray(b[n], np.float32)) for n in (names or a)}


def add(a: Tensors, b: Tensors) -> dict[str, np.ndarray]:
    """``a + b``: every tensor of ``a``, plus ``b``'s where ``b`` has it, float32."""
    return {
        n: (np.asarray(v, np.float32) + np.asarray(b[n], np.float32) if n in b else np.asarray(v, np.float32))
        for n, v in a.items()
    }


# ---------------------------------------------------------------------------- clipping and noise
def clip_update(delta: Tensors, clip_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """``delta`` scaled to L2 norm at most ``clip_norm`` and its norm before clipping.

    Raises :class:`ConfigError` for a non-positive bound."""
    if not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ConfigError(f"clip_norm must be a positive number, got {clip_norm!r}")
    norm = l2_norm(delta)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: (np.asarray(v, np.float32) * np.float32(scale)) for k, v in delta.items()}, norm


def client_noise_std(noise_multiplier: float, clip_norm: float, expected_clients: float) -> float:
    """Per-client Gaussian noise std of distributed DP: ``z * C / sqrt(m)``, so that the sum of
    ``m`` clients' noise has std ``z * C`` (the Gaussian mechanism on the sum of clipped updates)."""
    if noise_multiplier < 0 or clip_norm <= 0 or expected_clients <= 0:
        raise ConfigError(
            f"noise needs noise_multiplier >= 0, clip_norm > 0, expected_clients > 0; got "
            f"{noise_multiplier}, {clip_norm}, {expected_clients}"
        )
    return float(noise_multiplier * clip_norm / math.sqrt(expected_clients))


def add_gaussian_noise(delta: Tensors, std: float, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """``delta`` plus i.i.d. N(0, std²) on every entry (float32). ``std == 0`` returns a copy."""
    if std < 0 or not math.isfinite(std):
        raise ConfigError(f"noise std must be a finite number >= 0, got {std!r}")
    rng = rng or np.random.default_rng()
    if std == 0:
        return {k: np.array(v, np.float32) for k, v in delta.items()}
    return {
        k: (np.asarray(v, np.float64) + rng.normal(0.0, std, size=np.shape(v))).astype(np.float32)
        for k, v in delta.items()
    }


def norm_bound(clip_norm: float | None, noise_std: float = 0.0, dim: int = 0, slack: float = NORM_SLACK) -> float:
    """The largest L2 norm the server accepts from a client, or ``inf`` without clipping.

    A clipped, noised update has norm at most ``C + ||noise||``, and ``||noise||`` of ``dim``
    i.i.d. N(0, std²) entries concentrates at ``std * sqrt(dim)`` (spread about ``std / sqrt(2)``),
    so the bound is ``slack * C + std * (sqrt(dim) + 6)``: an honest client fails it with
    negligible probability, a scaled-up (model-poisoning) update does not pass."""
    if clip_norm is None:
        return math.inf
    return float(slack * clip_norm + noise_std * (math.sqrt(max(dim, 0)) + 6.0))


# ---------------------------------------------------------------------------- validation
def validate_update(
    delta: Mapping[str, object],
    expected: Mapping[str, Sequence[int]],
    *,
    base_sha256: str | None = None,
    update_base: str | int | None = None,
    max_norm: float = math.inf,
    where: str = "client update",
) -> dict[str, np.ndarray]:
    """Check one client's ``delta`` and return it as float32 arrays.

    ``expected``: the tensor names and shapes a reply must have (exactly). ``base_sha256`` /
    ``update_base``: the bundle's base hash and the one the client reports (the full hex digest,
    or :func:`base_id` of it); ``max_norm``: see :func:`norm_bound`. Raises an
    :class:`UpdateRejectedError` subclass whose ``reason`` says why (checked in this order:
    format, base, names, shapes, non_finite, norm)."""
    if not isinstance(delta, Mapping) or not delta:
        raise UpdateFormatError(
            f"{where}: expected a non-empty mapping of tensor names to arrays, got {type(delta).__name__}"
        )
    if base_sha256 is not None:
        try:
            ok = update_base is not None and (
                update_base == base_sha256 if isinstance(update_base, str) else int(update_base) == base_id(base_sha256)
            )
        except (TypeError, ValueError, OverflowError):  # NaN, inf, a list: not a base id at all
            ok = False
        if not ok:
            raise UpdateBaseMismatchError(
                f"{where} was computed on base {update_base!r}, the global adapter's base is {base_sha256[:12]}…"
            )
    missing, extra = sorted(set(expected) - set(delta)), sorted(set(delta) - set(expected))
    if missing or extra:
        raise UpdateShapeError(
            f"{where}: tensor names don't match the bundle's LoRA tensors: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})",
            reason="names",
        )
    out = {}
    for name, shape in expected.items():
        v = delta[name]
        if not isinstance(v, np.ndarray) or v.dtype.kind != "f":
            raise UpdateFormatError(
                f"{where}: tensor {name} is {type(v).__name__} {getattr(v, 'dtype', '')}, expected a float array"
            )
        if list(v.shape) != list(shape):
            raise UpdateShapeError(
                f"{where}: tensor {name} has shape {list(v.shape)}, expected {list(shape)}", reason="shapes"
            )
        v = np.asarray(v, dtype=np.float32)  # cast first: a finite float64 can overflow float32 to inf
        if not np.isfinite(v).all():
            raise NonFiniteUpdateError(f"{where}: tensor {name} holds NaN or inf values (as float32)")
        out[name] = v
    if math.isfinite(max_norm):
        norm = l2_norm(out)
        if norm > max_norm:
            raise UpdateNormError(f"{where}: L2 norm {norm:.4g} exceeds the accepted bound {max_norm:.4g}")
    return out


def base_id(base_sha256: str) -> int:
    """A base model's hash as a number (its first 60 bits): what a client reports in its numeric
    metrics, so nothing but numbers and float arrays leaves a device."""
    try:
        return int(base_sha256[:15], 16)
    except (TypeError, ValueError):
        raise ConfigError(f"base_sha256 must be a hex digest, got {base_sha256!r}") from None


# ---------------------------------------------------------------------------- aggregation
def fedavg(deltas: Sequence[Tensors], weights: Sequence[float] | None = None) -> dict[str, np.ndarray]:
    """The mean of ``deltas`` (same names and shapes), weighted by ``weights`` (e.g. example
    counts) or unweighted when ``weights`` is None (DP-FedAvg). float64 accumulation, float32 out.

    Raises :class:`ConfigError` for no deltas, mismatched weights or a non-positive total weight."""
    if not deltas:
        raise ConfigError("fedavg needs at least one update")
    w = np.ones(len(deltas)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(deltas),) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(
            f"fedavg weights must be {len(deltas)} non-negative numbers with a positive sum, got {weights!r}"
        )
    w = w / w.sum()
    out = {}
    for name in deltas[0]:
        acc = np.zeros(np.shape(deltas[0][name]), dtype=np.float64)
        for wi, d in zip(w, deltas):
            acc += wi * np.asarray(d[name], dtype=np.float64)
        out[name] = acc.astype(np.float32)
    return out


def dp_release(
    deltas: Sequence[Tensors], expected_clients: float, client_noise: float, rng=None
) -> dict[str, np.ndarray]:
    """The DP-FedAvg release of noised client ``deltas``: their sum, topped up with the Gaussian
    noise of the ``max(0, m - n)`` expected clients that did not report (each client adds std
    ``client_noise`` = z·C/√m, so the sum carries std z·C however many arrived), divided by the
    fixed expected count ``m`` rather than by ``n`` — what the accountant assumes (McMahan et al.,
    2018, "Learning Differentially Private Recurrent Language Models")."""
    if not deltas or expected_clients <= 0:
        raise ConfigError("dp_release needs at least one update and a positive expected client count")
    rng = rng or np.random.default_rng()
    missing = max(0.0, expected_clients - len(deltas))
    out = {}
    for name in deltas[0]:
        acc = np.zeros(np.shape(deltas[0][name]), dtype=np.float64)
        for d in deltas:
            acc += np.asarray(d[name], dtype=np.float64)
        if missing and client_noise > 0:
            acc += rng.normal(0.0, client_noise * math.sqrt(missing), acc.shape)
        out[name] = (acc / expected_clients).astype(np.float32)
    return out


def apply_delta(global_tensors: Tensors, mean_delta: Tensors, server_lr: float = 1.0) -> dict[str, np.ndarray]:
    """The new global adapter: ``global + server_lr * mean_delta`` on the tensors the delta has
    (under FedSA the B tensors are left as they are)."""
    return {
        n: (np.asarray(v, np.float32) + np.float32(server_lr) * np.asarray(mean_delta[n], np.float32))
        if n in mean_delta
        else np.asarray(v, np.float32)
        for n, v in global_tensors.items()
    }
