"""What this process costs: peak resident memory, measured the same way everywhere."""

from __future__ import annotations

from pathlib import Path


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
