"""Shared benchmark plumbing: machine description, subprocess workers, result files, and the
suite runner every ``python -m benchmarks.<suite>`` goes through (:class:`Suite`, :func:`main`,
:func:`print_table`)."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

from pocketpeft.procinfo import peak_rss_mib  # noqa: F401  (re-exported: the one measurement of peak RSS)

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """Where and with what a result was measured."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    versions = {}
    for pkg in (
        "pocketpeft",
        "torch",
        "transformers",
        "peft",
        "bitsandbytes",
        "executorch",
        "onnxruntime-training",
        "llama-cpp-python",
        "coremltools",
        "numpy",
    ):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    info = {
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "memory_gib": mem,
        "versions": versions,
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def summarize(values: list[float]) -> dict[str, float]:
    """Median, min, max and relative spread ((max-min)/median) of repeated measurements."""
    med = statistics.median(values)
    return {
        "median": med,
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "spread": (max(values) - min(values)) / med if med else 0.0,
    }


def run_worker(module: str, args: list[str], timeout: float = 1800) -> dict[str, Any]:
    """Run ``python -m module --worker ARGS`` in a fresh process (so peak RSS is its own) and
    return the JSON object it prints last on stdout."""
    p = subprocess.run(
        [sys.executable, "-m", module, "--worker", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if p.returncode != 0:
        raise RuntimeError(f"worker {module} {args} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def write_result(name: str, payload: dict[str, Any], out_dir: Path | None = None) -> Path:
    """Write ``payload`` (plus machine info and a timestamp) to ``results/<name>.json``."""
    out_dir = out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    obj = {
        "benchmark": name,
        "measured": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        **payload,
    }
    path = out_dir / f"{name}.json"
    from pocketpeft.fsutil import write_bytes_atomic

    write_bytes_atomic(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))
    return path


def block_modules(*names: str) -> None:
    """Make ``names`` (and their submodules) unimportable in this process, as on a device where
    they aren't installed: a later ``import`` raises ``ModuleNotFoundError``. Call before
    anything imports them (a worker's first line)."""
    import importlib.abc

    class _Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname.split(".")[0] in names:
                raise ModuleNotFoundError(f"No module named {fullname!r} (not on this device)", name=fullname)
            return None

    already = sorted(m for m in sys.modules if m.split(".")[0] in names)
    if already:
        raise RuntimeError(f"block_modules: already imported: {already[:3]}")
    sys.meta_path.insert(0, _Blocker())


# ---------------------------------------------------------------------------- tables
Column = tuple[str, str]  # (header, format spec of its values, e.g. ".0f"; "" for text)


def print_table(rows: Sequence[Sequence[Any]], columns: Sequence[Column], out: Callable[[str], None] = print) -> None:
    """Print ``rows`` under ``columns`` (``(header, format spec)`` pairs): the first column
    left-aligned, the others right-aligned, each as wide as its widest cell. ``None`` prints as
    ``-``; a string is printed as it is, whatever the column's format."""

    def cell(v: Any, fmt: str) -> str:
        if v is None:
            return "-"
        if isinstance(v, str) or not fmt:
            return str(v)
        return format(v, fmt)

    text = [[cell(v, fmt) for v, (_, fmt) in zip(row, columns)] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in text if i < len(r)]) for i, (h, _) in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        return "".join(
            c.ljust(widths[0] + 2) if i == 0 else c.rjust(widths[i] + 2) for i, c in enumerate(cells)
        ).rstrip()

    out("")
    out(line([h for h, _ in columns]))
    for r in text:
        out(line(r))


# ---------------------------------------------------------------------------- suites
class Suite:
    """One benchmark suite, run by :func:`main` as ``python -m benchmarks.<module>``.

    A suite names its result (``name``; ``_quick`` is appended under ``--quick``), adds its own
    options (:meth:`add_arguments`: ``--quick``, ``--out`` and the hidden ``--worker`` are
    the runner's), measures (:meth:`run` returns the result payload, or ``None`` when nothing was
    measured), answers worker processes (:meth:`worker`: ``python -m MODULE --worker ARGS``
    started by :meth:`run_worker`, its dict printed as JSON), and says how its payload reads as
    a table (:meth:`table`) and in closing lines (:meth:`summary`)."""

    name: str = ""
    module: str = ""  #: ``benchmarks.<module>``, what :meth:`run_worker` starts
    description: str | None = None
    quick_help: str = "sizes that finish in minutes"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        pass

    def run(self, args: argparse.Namespace) -> dict[str, Any] | None:
        raise NotImplementedError

    def worker(self, argv: list[str]) -> dict[str, Any]:
        raise NotImplementedError(f"{self.module} has no worker processes")

    def result_name(self, args: argparse.Namespace, payload: dict[str, Any]) -> str:
        return f"{self.name}_quick" if getattr(args, "quick", False) else self.name

    def out_dir(self, args: argparse.Namespace) -> Path | None:
        return args.out

    def table(self, payload: dict[str, Any], args: argparse.Namespace) -> tuple[list[list[Any]], list[Column]] | None:
        return None

    def summary(self, payload: dict[str, Any], args: argparse.Namespace) -> list[str]:
        return []

    def run_worker(self, args: list[str], timeout: float = 1800) -> dict[str, Any]:
        return run_worker(self.module, args, timeout=timeout)


def main(suite: Suite, argv: list[str] | None = None) -> Path | None:
    """The command line of every suite: parse (the suite's options plus ``--quick``, ``--out`` and
    ``--worker``), answer a worker call, or run the suite, write its result with
    :func:`write_result` and print its table and summary. Returns the result file's path."""
    ap = argparse.ArgumentParser(
        prog=f"python -m {suite.module}",
        description=suite.description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help=suite.quick_help)
    suite.add_arguments(ap)
    ap.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    ap.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from pocketpeft.apps.cli import _quiet_third_party

    _quiet_third_party()  # as the pocketpeft command: no third-party warning spam
    if args.worker is not None:
        print(json.dumps(suite.worker(list(args.worker))))
        return None
    payload = suite.run(args)
    if payload is None:
        return None
    path = write_result(suite.result_name(args, payload), payload, suite.out_dir(args))
    table = suite.table(payload, args)
    if table is not None:
        print_table(*table)
    for line in suite.summary(payload, args):
        print(line)
    print(f"written to {path}")
    return path
