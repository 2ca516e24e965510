"""pocketpeft.runtime: backends (one module each), selection (gpu → npu → cpu) and sessions.

``open(bundle, backend="auto", adapter=None)`` returns a :class:`Session`.
"""

from __future__ import annotations

import os

from pocketpeft.manifest import Bundle
from pocketpeft.registry import backend_target

from .forward_only import ForwardOnlyConfig, ForwardOnlyTrainer
from .keyboard.personalizer import Personalizer, UpdateReport
from .keyboard.store import AdapterStore, TextStore
from .protocol import Backend, Capabilities, EvalSums, Probe, StepResult, TrainConfig
from .selection import explain, resolve
from .session import EvalReport, Session, TrainReport

__all__ = [
    "open",
    "Session",
    "TrainReport",
    "EvalReport",
    "TrainConfig",
    "Backend",
    "Capabilities",
    "Probe",
    "StepResult",
    "EvalSums",
    "explain",
    "resolve",
    "ForwardOnlyConfig",
    "ForwardOnlyTrainer",
]
__all__ += ["Personalizer", "UpdateReport", "AdapterStore", "TextStore"]


def open(
    bundle: "str | os.PathLike | Bundle",
    backend: str = "auto",
    adapter: "str | os.PathLike | None" = None,
    train_config: TrainConfig | None = None,
    need_train: bool = True,
    update: str = "auto",
    forward_only: ForwardOnlyConfig | None = None,
) -> Session:  # noqa: A001
    """Open ``bundle`` on ``backend`` (``auto``, ``NAME`` or ``NAME:DEVICE``), optionally
    starting from a PEFT ``adapter`` directory.

    ``update`` says how ``Session.train`` updates the adapter: ``auto`` (backprop where the
    backend can, else forward-only on inference-only backends that support it), ``backprop``,
    or ``forward-only`` (SPSA from forward passes, options in ``forward_only``; see
    :mod:`.forward_only`): the backend is then wrapped in a :class:`ForwardOnlyTrainer`.
    ``auto`` prefers the device runtimes (see :mod:`.selection`) among the backends whose target
    the bundle has; an inference-only backend named explicitly opens (``need_train`` binds
    ``auto`` only) and ``Session.train`` on it raises :class:`BackendUnavailableError`.

    Raises :class:`BackendNotFoundError` / :class:`BackendUnavailableError` for a backend that
    doesn't exist or can't run here, :class:`ModelFileNotFoundError` for a bundle exported
    without the target the backend reads, the bundle's file errors, and the adapter's errors.
    """
    from .selection import create, resolve_update

    # auto skips backends reading a target the bundle lacks; an explicit name is checked below
    b = bundle if isinstance(bundle, Bundle) else Bundle(bundle) if backend == "auto" else None
    name, device, mode = resolve_update(backend, need_train=need_train, update=update, bundle=b)
    b = Bundle(bundle) if b is None else b
    _check_target(b, name)
    be = create(name, device)
    be.load(b)
    if mode == "forward-only":
        be = ForwardOnlyTrainer(be, forward_only)
    sess = Session(b, be, train_config)
    if adapter is not None:
        sess.load_adapter(adapter)
    return sess


def _check_target(bundle: Bundle, backend: str) -> None:
    """Raise :class:`ModelFileNotFoundError` unless ``bundle`` was exported with the target that
    ``backend`` reads (checked once here, before the backend loads anything)."""
    bundle.require_target(backend_target(backend), reader=backend)
