"""pocketpeft: on-device LoRA personalization of small language models over a 4/8-bit base.

    import pocketpeft as pp
    bundle = pp.export("smollm2", "out/bundle", quant="q4_0", lora=pp.LoraConfig(r=8))
    sess = pp.runtime.open("out/bundle")
    sess.train(texts, steps=20); sess.save_adapter("adapters/alice")

``import pocketpeft`` is cheap: heavy modules load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from .config import LoraConfig, ModelConfig, QuantFormat
from .errors import *  # noqa: F401,F403
from .errors import PocketPeftError

__all__ = [
    "LoraConfig",
    "ModelConfig",
    "QuantFormat",
    "PocketPeftError",
    "export",
    "runtime",
    "Bundle",
    "load_adapter",
    "save_adapter",
    "__version__",
]

_LAZY = {
    "Bundle": ("pocketpeft.manifest", "Bundle"),
    "load_adapter": ("pocketpeft.adapter", "load_adapter"),
    "save_adapter": ("pocketpeft.adapter", "save_adapter"),
    "runtime": ("pocketpeft.runtime", None),
    # the exporter package, callable as the function: ``pp.export(base, out, ...)``
    "export": ("pocketpeft.export", None),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        mod, attr = _LAZY[name]
        m = importlib.import_module(mod)
        return m if attr is None else getattr(m, attr)
    raise AttributeError(f"module 'pocketpeft' has no attribute {name!r}")
