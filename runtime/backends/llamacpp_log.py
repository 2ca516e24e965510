"""llama.cpp's log, collected for the llamacpp backend's error messages instead of printed."""

from __future__ import annotations

import contextlib
import ctypes
import functools
from typing import Iterator

LOG_ERROR = 4  # ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
_LOG_CONT = 5
_log_sink: list[tuple[int, str]] = []


@functools.lru_cache(maxsize=1)
def _log_callback():
    import llama_cpp

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data) -> None:  # noqa: ANN001
        _log_sink.append((level, text.decode("utf-8", "replace")))

    return collect


@contextlib.contextmanager
def llama_log() -> Iterator[list[tuple[int, str]]]:
    """Collect llama.cpp's log lines (level, text) instead of printing them, for the duration.
    llama-cpp-python 0.3.36 maps ggml's log levels off by one, so its own callback prints
    warnings (e.g. "cannot use buft 'CPU_REPACK'" for every LoRA tensor) even with verbose=False;
    errors are kept here for our exception messages instead."""
    import llama_cpp

    _log_sink.clear()
    llama_cpp.llama_log_set(_log_callback(), ctypes.c_void_p(0))
    try:
        yield _log_sink
    finally:
        try:
            from llama_cpp._logger import llama_log_callback as restore
        except ImportError:  # pragma: no cover - a future llama-cpp-python without it: stay quiet
            restore = _log_callback()
        llama_cpp.llama_log_set(restore, ctypes.c_void_p(0))


def errors(log: list[tuple[int, str]]) -> str:
    """The error lines of a collected log, joined (or a generic hint)."""
    lines, keep = [], False
    for level, text in log:
        keep = level == LOG_ERROR or (level == _LOG_CONT and keep)
        if keep and text.strip():
            lines.append(text.strip())
    return "; ".join(lines[-4:]) or "no error message from llama.cpp"
