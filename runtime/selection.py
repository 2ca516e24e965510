"""Backend selection: an explicit name, or ``auto`` walking gpu → npu → cpu.

Within a tier, backends are tried in registry order; the first one that is available and
capable of what was asked (train and/or infer) wins. :func:`explain` reports, for every
registered backend and device, whether it was picked and why not.
"""

from __future__ import annotations

from dataclasses import dataclass

from pocketpeft.errors import BackendUnavailableError, PocketPeftError
from pocketpeft.registry import BACKENDS, backend_entry, load_module

from .protocol import TIERS, Probe


@dataclass(frozen=True)
class Choice:
    """One (backend, device) row of the selection table."""

    backend: str
    device: str
    tier: str
    train: bool
    infer: bool
    available: bool
    picked: bool
    reason: str


def probe(name: str) -> Probe:
    """Probe one backend; an import failure becomes an unavailable probe naming the extra."""
    entry = backend_entry(name)
    try:
        return load_module(entry).probe()
    except (ImportError, PocketPeftError, OSError, RuntimeError) as e:
        hint = f" (install with: pip install 'pocketpeft[{entry.extra}]')" if entry.extra else ""
        return Probe(name, False, (), f"{type(e).__name__}: {e}{hint}")


def explain(need_train: bool = True) -> list[Choice]:
    """Every registered (backend, device) in auto-selection order, with the pick marked."""
    rows: list[Choice] = []
    for name in BACKENDS:
        p = probe(name)
        if not p.available:
            rows.append(Choice(name, "-", "-", False, False, False, False, p.reason or "not available"))
            continue
        for dev in p.devices:
            c = p.capabilities[dev]
            rows.append(Choice(name, dev, c.tier, c.train, c.infer, True, False, c.notes))
    order = {t: i for i, t in enumerate(TIERS)}
    rows.sort(key=lambda r: (order.get(r.tier, len(TIERS)),))
    picked = False
    out = []
    for r in rows:
        capable = r.available and r.infer and (r.train or not need_train)
        if capable and not picked:
            picked = True
            out.append(Choice(**{**r.__dict__, "picked": True, "reason": f"first capable in gpu → npu → cpu order; {r.reason}".rstrip("; ")}))
        elif r.available and not capable:
            out.append(Choice(**{**r.__dict__, "reason": "cannot train (inference only)"}))
        elif r.available:
            out.append(Choice(**{**r.__dict__, "reason": f"a higher-priority backend was picked; {r.reason}".rstrip("; ")}))
        else:
            out.append(r)
    return out


def resolve(backend: str = "auto", need_train: bool = True) -> tuple[str, str]:
    """(backend name, device) to use. ``backend`` may be ``auto``, ``NAME`` or ``NAME:DEVICE``.

    Raises :class:`BackendNotFoundError` for an unknown name and :class:`BackendUnavailableError`
    (listing what this machine can run) when the backend or device can't run here.
    """
    if backend == "auto":
        for c in explain(need_train):
            if c.picked:
                return c.backend, c.device
        raise BackendUnavailableError("no backend can run here; " + _available_text())
    name, _, device = backend.partition(":")
    entry = backend_entry(name)
    p = probe(name)
    if not p.available:
        hint = f"; install it with: pip install 'pocketpeft[{entry.extra}]'" if entry.extra else ""
        raise BackendUnavailableError(f"backend {name!r} is not available here ({p.reason}){hint}; {_available_text()}")
    if device and device not in p.devices:
        raise BackendUnavailableError(f"backend {name!r} has no device {device!r} here; its devices: {', '.join(p.devices)}")
    if not device:  # the backend's own preference order: gpu first
        order = {t: i for i, t in enumerate(TIERS)}
        device = min(p.devices, key=lambda d: order.get(p.capabilities[d].tier, 9))
    if need_train and not p.capabilities[device].train:
        raise BackendUnavailableError(f"backend {name!r} on {device} cannot train (inference only)")
    return name, device


def _available_text() -> str:
    avail = [f"{c.backend}:{c.device}" for c in explain(False) if c.available]
    return "available on this machine: " + (", ".join(avail) or "none")


def create(name: str, device: str):
    """Instantiate (unloaded) backend ``name`` on ``device``."""
    return load_module(backend_entry(name)).create(device)
