"""Backend selection: an explicit name, or ``auto`` walking gpu → npu → cpu.

Within a tier, backends are tried in registry order; the first one that is available and
capable of what was asked (train and/or infer) wins. :func:`explain` reports, for every
registered backend and device, whether it was picked and why not.

Training prefers backpropagation; when no available backend can backpropagate, ``auto`` picks
the first inference-only backend that declares ``forward_only`` and trains it with forward-only
(SPSA) updates (:mod:`.forward_only`). ``update="forward-only"`` forces that on any backend.
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
    forward_only: bool = False
    update: str = ""  # how the picked row would train: "backprop" or "forward-only"
    kv_cache: bool = False  # Capabilities.kv_cache: suggestions reuse a KV cache across passes


def probe(name: str) -> Probe:
    """Probe one backend; an import failure becomes an unavailable probe naming the extra."""
    entry = backend_entry(name)
    try:
        return load_module(entry).probe()
    except (ImportError, PocketPeftError, OSError, RuntimeError) as e:
        hint = f" (install with: pip install 'pocketpeft[{entry.extra}]')" if entry.extra else ""
        return Probe(name, False, (), f"{type(e).__name__}: {e}{hint}")


def explain(need_train: bool = True, update: str = "auto") -> list[Choice]:
    """Every registered (backend, device) in auto-selection order, with the pick marked.

    ``update`` (``auto``, ``backprop``, ``forward-only``) says how training may update the
    adapter; it matters only with ``need_train``."""
    from .forward_only import check_update

    check_update(update)
    rows: list[Choice] = []
    for name in BACKENDS:
        p = probe(name)
        if not p.available:
            rows.append(Choice(name, "-", "-", False, False, False, False, p.reason or "not available"))
            continue
        for dev in p.devices:
            c = p.capabilities[dev]
            rows.append(
                Choice(name, dev, c.tier, c.train, c.infer, True, False, c.notes, c.forward_only, kv_cache=c.kv_cache)
            )
    order = {t: i for i, t in enumerate(TIERS)}
    rows.sort(key=lambda r: (order.get(r.tier, len(TIERS)),))
    mode = ""
    if need_train:
        backprop = any(r.available and r.infer and r.train for r in rows)
        mode = "backprop" if update == "backprop" or (update == "auto" and backprop) else "forward-only"
    why = {
        "backprop": "",
        "": "",
        "forward-only": (
            "forced forward-only (SPSA) updates over its forward pass; "
            if update == "forward-only"
            else "no backend here can backpropagate: forward-only (SPSA) updates over its inference graph; "
        ),
    }
    picked = False
    out = []
    for r in rows:
        capable = (
            r.available
            and r.infer
            and (not need_train or r.train if mode != "forward-only" else r.train or r.forward_only)
        )
        if capable and not picked:
            picked = True
            out.append(
                Choice(
                    **{
                        **r.__dict__,
                        "picked": True,
                        "update": mode,
                        "reason": f"first capable in gpu → npu → cpu order; {why[mode]}{r.reason}".rstrip("; "),
                    }
                )
            )
        elif r.available and not capable and r.infer and r.forward_only:
            out.append(
                Choice(
                    **{
                        **r.__dict__,
                        "reason": "cannot backpropagate; trains only with forward-only updates "
                        "(picked by auto when nothing here can backpropagate)",
                    }
                )
            )
        elif r.available and not capable:
            out.append(Choice(**{**r.__dict__, "reason": "cannot train (inference only)"}))
        elif r.available:
            out.append(
                Choice(**{**r.__dict__, "reason": f"a higher-priority backend was picked; {r.reason}".rstrip("; ")})
            )
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
        raise BackendUnavailableError(
            f"backend {name!r} has no device {device!r} here; its devices: {', '.join(p.devices)}"
        )
    if not device:  # the backend's own preference order: gpu first
        order = {t: i for i, t in enumerate(TIERS)}
        device = min(p.devices, key=lambda d: order.get(p.capabilities[d].tier, 9))
    if need_train and not p.capabilities[device].train:
        raise BackendUnavailableError(f"backend {name!r} on {device} cannot train (inference only)")
    return name, device


def resolve_update(backend: str = "auto", need_train: bool = True, update: str = "auto") -> tuple[str, str, str]:
    """(backend name, device, update) to use; update is ``backprop``, ``forward-only`` or, without
    ``need_train``, ``none``. ``update="auto"`` trains by backprop where the backend can, else
    forward-only on backends that declare it; ``forward-only`` forces it on any backend.

    Raises :class:`ConfigError` for an unknown ``update`` and the errors of :func:`resolve`.
    """
    from .forward_only import check_update

    check_update(update)
    if not need_train:
        return (*resolve(backend, need_train=False), "none")
    if backend == "auto":
        for c in explain(True, update):
            if c.picked:
                return c.backend, c.device, c.update
        raise BackendUnavailableError(f"no backend can train here with update={update!r}; " + _available_text())
    if update == "backprop":
        return (*resolve(backend, need_train=True), "backprop")
    name, device = resolve(backend, need_train=False)
    caps = probe(name).capabilities[device]
    if caps.train and update == "auto":
        return name, device, "backprop"
    if caps.train or caps.forward_only or update == "forward-only":
        return name, device, "forward-only"
    raise BackendUnavailableError(
        f"backend {name!r} on {device} cannot train (inference only); "
        "force forward-only updates on it with update='forward-only'"
    )


def _available_text() -> str:
    avail = [f"{c.backend}:{c.device}" for c in explain(False) if c.available]
    return "available on this machine: " + (", ".join(avail) or "none")


def create(name: str, device: str):
    """Instantiate (unloaded) backend ``name`` on ``device``."""
    return load_module(backend_entry(name)).create(device)
