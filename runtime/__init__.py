"""pocketpeft.runtime: backends (one module each), selection (gpu → npu → cpu) and sessions.

``open(bundle, backend="auto", adapter=None)`` returns a :class:`Session`.
"""

from __future__ import annotations

import os

from pocketpeft.manifest import Bundle

from .protocol import Backend, Capabilities, EvalSums, Probe, StepResult, TrainConfig
from .selection import explain, resolve
from .session import EvalReport, Session, TrainReport
from .personalizer import Personalizer, UpdateReport
from .store import AdapterStore, TextStore

__all__ = ["open", "Session", "TrainReport", "EvalReport", "TrainConfig", "Backend", "Capabilities",
           "Probe", "StepResult", "EvalSums", "explain", "resolve"]
__all__ += ["Personalizer", "UpdateReport", "AdapterStore", "TextStore"]


def open(bundle: "str | os.PathLike | Bundle", backend: str = "auto", adapter: "str | os.PathLike | None" = None,
         train_config: TrainConfig | None = None, need_train: bool = True) -> Session:  # noqa: A001
    """Open ``bundle`` on ``backend`` (``auto``, ``NAME`` or ``NAME:DEVICE``), optionally
    starting from a PEFT ``adapter`` directory.

    Raises :class:`BackendNotFoundError` / :class:`BackendUnavailableError` for a backend that
    doesn't exist or can't run here, the bundle's file errors, and the adapter's errors.
    """
    from .selection import create

    name, device = resolve(backend, need_train=need_train)
    b = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
    be = create(name, device)
    be.load(b)
    sess = Session(b, be, train_config)
    if adapter is not None:
        sess.load_adapter(adapter)
    return sess
