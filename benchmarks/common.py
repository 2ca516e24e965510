"""Shared benchmark plumbing: machine description, subprocess workers, result files."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

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
    for pkg in ("pocketpeft", "torch", "transformers", "peft", "bitsandbytes", "executorch", "onnxruntime-training",
                "llama-cpp-python", "coremltools", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    info = {"load_average_1_5_15": [round(x, 2) for x in os.getloadavg()], "platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "logical_cores": os.cpu_count(), "memory_gib": mem, "versions": versions}
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
    return {"median": med, "min": min(values), "max": max(values), "n": len(values),
            "spread": (max(values) - min(values)) / med if med else 0.0}


def run_worker(module: str, args: list[str], timeout: float = 1800) -> dict[str, Any]:
    """Run ``python -m module --worker ARGS`` in a fresh process (so peak RSS is its own) and
    return the JSON object it prints last on stdout."""
    p = subprocess.run([sys.executable, "-m", module, "--worker", *args], capture_output=True, text=True,
                       timeout=timeout, cwd=Path(__file__).resolve().parent.parent)
    if p.returncode != 0:
        raise RuntimeError(f"worker {module} {args} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def write_result(name: str, payload: dict[str, Any], out_dir: Path | None = None) -> Path:
    """Write ``payload`` (plus machine info and a timestamp) to ``results/<name>.json``."""
    out_dir = out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    obj = {"benchmark": name, "measured": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), **payload}
    path = out_dir / f"{name}.json"
    from pocketpeft.fsutil import write_bytes_atomic

    write_bytes_atomic(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))
    return path


def peak_rss_mib() -> float:
    """Peak resident set size of this process, MiB.

    Read from ``VmHWM`` where the kernel has it: ``ru_maxrss`` survives fork + exec, so a worker
    started by a large parent would report the parent's peak as its own.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


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
