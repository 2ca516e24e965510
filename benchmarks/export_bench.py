"""Export time and bundle size per target: SmolLM2 at q4_0, LoRA r=8 on q/k/v/o.

Each target is exported on its own (``torch`` is always part of a bundle, it is the reference)
in a fresh process, so its peak RSS is its own; repetitions are interleaved. Reported per
target: the target's own export seconds (from the manifest), the whole export's wall time
(load + quantize + torch + target), the bytes of the target's files, and peak RSS.

    python -m benchmarks.export_bench [--quick] [--targets torch,executorch,onnx,gguf,coreml]
                                      [--base smollm2|HF folder|.gguf] [--out DIR]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks.common import Suite, main, peak_rss_mib, summarize  # noqa: E402

RANK = 8
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


def worker_export(base: str, target: str, quant: str, out: str) -> dict:
    import pocketpeft as pp

    t0 = time.perf_counter()
    b = pp.export(
        base, out, quant=quant, targets=[target], lora=pp.LoraConfig(r=RANK, lora_alpha=16, target_modules=MODULES)
    )
    wall = time.perf_counter() - t0
    m = b.manifest
    by_target: dict[str, int] = {}
    for info in m.files.values():
        by_target[info["target"]] = by_target.get(info["target"], 0) + int(info["bytes"])
    return {
        "wall_seconds": wall,
        "export_seconds": {t: i.get("export_seconds") for t, i in m.targets.items()},
        "bytes_by_target": by_target,
        "bundle_bytes": sum(by_target.values()),
        "files": {rel: int(i["bytes"]) for rel, i in m.files.items() if i["target"] == target},
        "toolchain": m.targets[target].get("toolchain", {}),
        "peak_rss_mib": peak_rss_mib(),
    }


def default_targets() -> list[str]:
    """Every registered export target (coreml only where it is registered)."""
    from pocketpeft.registry import TARGETS

    return list(TARGETS)


class ExportBench(Suite):
    name, module, description = "export_bench", "benchmarks.export_bench", __doc__
    quick_help = "1 repetition (default 2) of the targets that export in seconds (torch, gguf) unless --targets"

    def add_arguments(self, ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--reps", type=int, default=None)
        ap.add_argument("--targets", default=None, help="comma-separated targets (default: every registered one)")
        ap.add_argument("--base", default="smollm2", help="base model (default the embedded SmolLM2)")
        ap.add_argument("--quant", default="q4_0")
        ap.add_argument(
            "--timeout", type=float, default=2400, help="seconds one export may take before it counts as failed"
        )

    def worker(self, argv: list[str]) -> dict:
        return worker_export(*argv)

    def run(self, args: argparse.Namespace) -> dict:
        from pocketpeft.registry import target_entry

        quick_targets = [t for t in ("torch", "gguf") if t in default_targets()]
        targets = [
            t
            for t in (args.targets.split(",") if args.targets else quick_targets if args.quick else default_targets())
            if t
        ]
        for t in targets:
            target_entry(t)  # ConfigError naming the known targets
        reps = args.reps or (1 if args.quick else 2)
        base = args.base if args.base == "smollm2" else str(Path(args.base).resolve())
        runs: dict[str, list[dict]] = {t: [] for t in targets}
        failed: dict[str, str] = {}
        tmp = Path(tempfile.mkdtemp(prefix="pocketpeft-export-bench-"))
        try:
            for rep in range(reps):
                for t in targets:
                    if t in failed:
                        continue
                    print(f"[{rep + 1}/{reps}] export {args.quant} --targets {t}", flush=True)
                    out = tmp / f"{t}-{rep}"
                    try:
                        runs[t].append(self.run_worker([base, t, args.quant, str(out)], timeout=args.timeout))
                    except subprocess.TimeoutExpired:  # reported, not fatal
                        failed[t] = f"export did not finish within {args.timeout:.0f} s (--timeout)"
                    except RuntimeError as e:
                        failed[t] = (str(e).strip().splitlines() or ["?"])[-1][:500]
                        print(f"    failed: {failed[t]}", flush=True)
                    shutil.rmtree(out, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        results = {}
        for t, rs in runs.items():
            if not rs:
                continue
            results[t] = {
                "target_export_seconds": summarize([r["export_seconds"][t] for r in rs]),
                "wall_seconds": summarize([r["wall_seconds"] for r in rs]),
                "target_bytes": rs[0]["bytes_by_target"].get(t, 0),
                "shared_bytes": rs[0]["bytes_by_target"].get("shared", 0),
                "bundle_bytes": rs[0]["bundle_bytes"],
                "files": rs[0]["files"],
                "toolchain": rs[0]["toolchain"],
                "peak_rss_mib": summarize([r["peak_rss_mib"] for r in rs]),
            }
        ref = results.get("torch")
        for r in results.values():
            if ref:
                r["bytes_vs_torch"] = r["target_bytes"] / max(ref["target_bytes"], 1)
        return {
            "settings": {
                "base": args.base if args.base == "smollm2" else Path(args.base).name,
                "quant": args.quant,
                "lora_r": RANK,
                "target_modules": MODULES,
                "repetitions": reps,
                "quick": args.quick,
            },
            "results": results,
            "failed": failed,
        }

    def table(self, payload: dict, args: argparse.Namespace):
        rows = [
            [
                t,
                r["target_export_seconds"]["median"],
                r["wall_seconds"]["median"],
                r["target_bytes"] / 2**20,
                r["peak_rss_mib"]["median"],
            ]
            for t, r in payload["results"].items()
        ]
        return rows, [
            ("target", ""),
            ("target s", ".1f"),
            ("wall s", ".1f"),
            ("target MiB", ".1f"),
            ("peak RSS MiB", ".0f"),
        ]

    def summary(self, payload: dict, args: argparse.Namespace) -> list[str]:
        return [f"{t}: failed: {why}" for t, why in payload["failed"].items()]


if __name__ == "__main__":
    main(ExportBench())
