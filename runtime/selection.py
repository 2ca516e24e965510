"""Backend selection: an explicit name, or ``auto`` walking gpu → npu → cpu.

Within a tier, ``auto`` prefers the device runtimes over the host reference: :data:`TRAIN_ORDER`
for updates, :data:`SERVE_ORDER` for serving (registry order for backends in neither). The first
row that is available, capable of what was asked (train and/or infer) and, given a bundle, has
its target in that bundle wins. :func:`explain` reports, for every registered backend and device,
whether it was picked and why (not); :func:`plan` says where each part of an update and of
serving runs.

Training prefers backpropagation; when no available backend can backpropagate, ``auto`` picks
the first inference-only backend that declares ``forward_only`` and trains it with forward-only
(SPSA) updates (:mod:`.forward_only`). ``update="forward-only"`` forces that on any backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pocketpeft.errors import BackendUnavailableError, PocketPeftError
from pocketpeft.registry import BACKENDS, backend_entry, backend_target, load_module

from .protocol import TIERS, Probe

if TYPE_CHECKING:
    from pocketpeft.manifest import Bundle

#: Preference within a tier for updates by backprop. The device runtimes first: ONNX Runtime
#: (torch-free, ~the reference's speed on CPU at a fraction of its memory, CUDA where usable), then
#: ExecuTorch (torch-free too, slower on CPU); the torch reference, and the server's peft stack,
#: only where neither runs (they are the yardsticks the device runtimes are tested against).
TRAIN_ORDER = ("onnxruntime", "executorch", "torch", "peft")
#: Preference within a tier for serving, and for forward-only updates (they too run only forward
#: passes). llama.cpp first: a KV-cached decoder on native quantized kernels, several times faster
#: per keystroke than any other here; then ONNX Runtime's InferenceSession over infer.onnx (the
#: graph NPU execution providers take), ORT's training session, ExecuTorch; the references last.
SERVE_ORDER = ("llamacpp", "onnxruntime-infer", "onnxruntime", "executorch", "torch", "peft")
#: Host/server references: picked by ``auto`` only where no device runtime can do the job.
REFERENCES = ("torch", "peft")


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
    missing_target: str = ""  # the bundle target this backend reads, when the given bundle lacks it
    #: why this backend can't run the given bundle's global adapter (two-level adapters), else ""
    no_global: str = ""


#: backends that apply a global adapter on every bundle; the onnx ones need the graphs' global slot
GLOBAL_ANYWHERE = ("torch", "peft", "llamacpp")
GLOBAL_WITH_SLOT = ("onnxruntime", "onnxruntime-infer", "executorch")


def global_blocker(name: str, bundle: "Bundle | None", installed: bool = False) -> str:
    """Why backend ``name`` can't apply ``bundle``'s installed global adapter ("" when it can, or
    when the bundle has none; ``installed=True``: as if it had one)."""
    from pocketpeft.global_adapter import GLOBAL_DIR

    if bundle is None or name in GLOBAL_ANYWHERE or not (installed or (bundle.root / GLOBAL_DIR).exists()):
        return ""
    if name in GLOBAL_WITH_SLOT:
        if bundle.manifest.global_slot:
            return ""
        return "the bundle has a global adapter but its graphs no global slot (re-export with --global-adapter)"
    return "does not apply a global adapter, and the bundle has one"


def probe(name: str) -> Probe:
    """Probe one backend; an import failure becomes an unavailable probe naming the extra."""
    entry = backend_entry(name)
    try:
        return load_module(entry).probe()
    except (ImportError, PocketPeftError, OSError, RuntimeError) as e:
        hint = f" (install with: pip install 'pocketpeft[{entry.extra}]')" if entry.extra else ""
        return Probe(name, False, (), f"{type(e).__name__}: {e}{hint}")


def _rank(name: str, order: tuple[str, ...]) -> int:
    return order.index(name) if name in order else len(order) + list(BACKENDS).index(name)


def _preference(r: Choice, task: str) -> str:
    """Why ``r`` wins its tier for ``task`` (``train``, ``serve``, ``run forward-only updates``)."""
    if r.backend in REFERENCES:
        return f"the {r.backend} reference: no device runtime can {task} in the {r.tier} tier here"
    return "device runtime preferred over the torch reference"


def explain(need_train: bool = True, update: str = "auto", bundle: "Bundle | None" = None) -> list[Choice]:
    """Every registered (backend, device) in auto-selection order, with the pick marked.

    ``update`` (``auto``, ``backprop``, ``forward-only``) says how training may update the
    adapter; it matters only with ``need_train``. With a ``bundle``, backends reading a target it
    was exported without are skipped (their reason names the target and the export flag).
    Raises :class:`ConfigError` for an unknown ``update``."""
    from .forward_only import check_update

    check_update(update)
    targets = None if bundle is None else set(bundle.targets)
    rows: list[Choice] = []
    for name in BACKENDS:
        p = probe(name)
        if not p.available:
            rows.append(Choice(name, "-", "-", False, False, False, False, p.reason or "not available"))
            continue
        missing = "" if targets is None or backend_target(name) in targets else backend_target(name)
        blocked = global_blocker(name, bundle)
        for dev in p.devices:
            c = p.capabilities[dev]
            rows.append(
                Choice(
                    name,
                    dev,
                    c.tier,
                    c.train,
                    c.infer,
                    True,
                    False,
                    c.notes,
                    c.forward_only,
                    kv_cache=c.kv_cache,
                    missing_target=missing,
                    no_global=blocked,
                )
            )
    mode = ""
    if need_train:
        backprop = any(r.available and r.infer and r.train and not (r.missing_target or r.no_global) for r in rows)
        mode = "backprop" if update == "backprop" or (update == "auto" and backprop) else "forward-only"
    order = TRAIN_ORDER if mode == "backprop" else SERVE_ORDER
    tier = {t: i for i, t in enumerate(TIERS)}
    rows.sort(key=lambda r: (tier.get(r.tier, len(TIERS)), _rank(r.backend, order)))
    task = {"backprop": "train", "": "serve", "forward-only": "run forward-only updates"}[mode]
    why = {
        "backprop": "",
        "": "",
        "forward-only": (
            "forced forward-only (SPSA) updates over its forward pass; "
            if update == "forward-only"
            else "no backend here can backpropagate: forward-only (SPSA) updates over its inference graph; "
        ),
    }

    def capable(r: Choice) -> bool:
        if not (r.available and r.infer) or r.missing_target or r.no_global:
            return False
        return (not need_train or r.train) if mode != "forward-only" else (r.train or r.forward_only)

    picked = next((r for r in rows if capable(r)), None)
    out = []
    for r in rows:
        if r is picked:
            reason = f"first capable in gpu → npu → cpu order; {_preference(r, task)}; {why[mode]}{r.reason}"
            out.append(Choice(**{**r.__dict__, "picked": True, "update": mode, "reason": reason.rstrip("; ")}))
        elif r.available and r.missing_target:
            t = r.missing_target
            out.append(Choice(**{**r.__dict__, "reason": f"bundle has no '{t}' target (export with --targets {t})"}))
        elif r.available and r.no_global:
            out.append(Choice(**{**r.__dict__, "reason": r.no_global}))
        elif r.available and not capable(r) and r.infer and r.forward_only:
            out.append(
                Choice(
                    **{
                        **r.__dict__,
                        "reason": "cannot backpropagate; trains only with forward-only updates "
                        "(picked by auto when nothing here can backpropagate)",
                    }
                )
            )
        elif r.available and not capable(r):
            out.append(Choice(**{**r.__dict__, "reason": "cannot train (inference only)"}))
        elif r.available:
            first = f"{picked.backend}:{picked.device}" if picked else "another"
            reason = f"a higher-priority backend was picked ({first}); {r.reason}"
            out.append(Choice(**{**r.__dict__, "reason": reason.rstrip("; ")}))
        else:
            out.append(r)
    return out


def resolve(backend: str = "auto", need_train: bool = True, bundle: "Bundle | None" = None) -> tuple[str, str]:
    """(backend name, device) to use. ``backend`` may be ``auto``, ``NAME`` or ``NAME:DEVICE``.

    ``auto`` picks as :func:`explain` does, skipping backends whose target ``bundle`` lacks; an
    explicit name is not checked against the bundle here (``runtime.open`` raises
    :class:`ModelFileNotFoundError` for that, before loading anything).

    Raises :class:`BackendNotFoundError` for an unknown name and :class:`BackendUnavailableError`
    (listing what this machine can run) when the backend or device can't run here, or, with
    ``need_train``, can't train.
    """
    if backend == "auto":
        for c in explain(need_train, bundle=bundle):
            if c.picked:
                return c.backend, c.device
        held = f" with the targets of bundle {bundle.root} ({', '.join(bundle.targets)})" if bundle else ""
        raise BackendUnavailableError(f"no backend can run here{held}; " + _available_text())
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


def resolve_update(
    backend: str = "auto", need_train: bool = True, update: str = "auto", bundle: "Bundle | None" = None
) -> tuple[str, str, str]:
    """(backend name, device, update) to use; update is ``backprop``, ``forward-only`` or ``none``
    (no training: without ``need_train``, or an inference-only backend named explicitly).

    ``update="auto"`` trains by backprop where the backend can, else forward-only on backends that
    declare it; ``forward-only`` forces it on any backend. ``auto`` skips backends whose target
    ``bundle`` lacks. ``need_train`` binds ``auto`` only: a backend named explicitly that can do
    neither opens for inference (``update="auto"``), and training it raises the backend's
    :class:`BackendUnavailableError`; ``update="backprop"`` demands backprop of it up front.

    Raises :class:`ConfigError` for an unknown ``update`` and the errors of :func:`resolve`.
    """
    from .forward_only import check_update

    check_update(update)
    if not need_train:
        return (*resolve(backend, need_train=False, bundle=bundle), "none")
    if backend == "auto":
        for c in explain(True, update, bundle):
            if c.picked:
                return c.backend, c.device, c.update
        held = f" with the targets of bundle {bundle.root} ({', '.join(bundle.targets)})" if bundle else ""
        raise BackendUnavailableError(f"no backend can train here{held} with update={update!r}; " + _available_text())
    if update == "backprop":
        return (*resolve(backend, need_train=True), "backprop")
    name, device = resolve(backend, need_train=False)
    caps = probe(name).capabilities[device]
    if caps.train and update == "auto":
        return name, device, "backprop"
    if caps.train or caps.forward_only or update == "forward-only":
        return name, device, "forward-only"
    return name, device, "none"


def plan(bundle: "Bundle | None" = None) -> dict[str, Any]:
    """Where each part runs with ``auto`` (for ``bundle``'s targets when given): ``update`` (the
    backend and device that train, the ``mode``, and the forward-only ``fallback``), ``prefix``
    (the frozen layers below the first trained one), ``suffix`` (the trained layers) and
    ``serving``; each a dict of ``backend``, ``device``, ``provider`` (an ONNX Runtime execution
    provider, or None) and ``why``. A part nothing here can run has ``backend`` None.

    The prefix needs no backward, so with ONNX Runtime training it can run as an InferenceSession
    on the best execution provider here (an NPU's, when there is one) while the suffix
    backpropagates on the training session; ExecuTorch and torch run their whole graph themselves.
    """
    none = {"backend": None, "device": None, "provider": None}
    rows = explain(True, "auto", bundle)
    up = next((r for r in rows if r.picked), None)
    fo = next(
        (r for r in rows if r.available and r.infer and r.forward_only and not (r.missing_target or r.no_global)), None
    )
    fallback = (
        {"backend": fo.backend, "device": fo.device, "why": "forward-only (SPSA) updates over its inference graph"}
        if fo
        else {"backend": None, "device": None, "why": "no inference-only backend here takes forward-only updates"}
    )
    if up is None:
        nothing = {**none, "why": "nothing here can train" + (" this bundle" if bundle else "")}
        update, prefix, suffix = {**nothing, "mode": ""}, dict(nothing), dict(nothing)
    else:
        task = "train" if up.update == "backprop" else "run forward-only updates"
        where = {"backend": up.backend, "device": up.device, "provider": None}
        update = {**where, "mode": up.update, "why": _preference(up, task)}
        if up.update == "forward-only":
            prefix = {**where, "why": "forward-only updates run the whole forward pass, frozen layers included, here"}
            suffix = {**where, "why": "no backward: SPSA perturbs the LoRA tensors and compares forward losses"}
        else:
            suffix = {**where, "why": f"the trained layers backpropagate in {up.backend}'s training graph"}
            prefix = {**where, "why": f"{up.backend} runs the frozen layers itself, in its training graph"}
            if up.backend == "onnxruntime":
                from .backends.ort_providers import inference_providers, tier_of

                ep, why = inference_providers()[0]
                device = {"CUDAExecutionProvider": "cuda", "CPUExecutionProvider": "cpu"}.get(ep, tier_of(ep))
                prefix = {
                    "backend": "onnxruntime",
                    "device": device,
                    "provider": ep,
                    "why": f"no backward needed, so the best execution provider here ({why})",
                }
    update["fallback"] = fallback
    srv = next((r for r in explain(False, bundle=bundle) if r.picked), None)
    serving = (
        {"backend": srv.backend, "device": srv.device, "provider": None, "why": _preference(srv, "serve")}
        if srv
        else {**none, "why": "nothing here can serve" + (" this bundle" if bundle else "")}
    )
    return {"update": update, "prefix": prefix, "suffix": suffix, "serving": serving}


def _available_text() -> str:
    avail = [f"{c.backend}:{c.device}" for c in explain(False) if c.available]
    return "available on this machine: " + (", ".join(avail) or "none")


def create(name: str, device: str):
    """Instantiate (unloaded) backend ``name`` on ``device``."""
    return load_module(backend_entry(name)).create(device)
