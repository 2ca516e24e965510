"""Optional dependencies: imported where needed, behind a cached availability check.

A missing one raises :class:`MissingDependencyError` naming the extra to install.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType

from .errors import MissingDependencyError


@functools.lru_cache(maxsize=None)
def available(module: str) -> bool:
    """True when ``module`` can be imported here (no import is performed)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming ``pip install 'pocketpeft[extra]'``."""
    if not available(module):
        raise MissingDependencyError(f"{module} is not installed; install it with: pip install 'pocketpeft[{extra}]'")
    try:
        return importlib.import_module(module)
    except ImportError as e:  # installed but broken (e.g. ABI mismatch)
        raise MissingDependencyError(
            f"{module} is installed but failed to import ({e}); reinstall it with: pip install 'pocketpeft[{extra}]'"
        ) from e
