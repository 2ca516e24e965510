"""``pocketpeft demo``: personalize the embedded SmolLM2 on one chitchat sender's earlier
messages and compare base vs personalized on their later (held-out) messages."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from .fsutil import write_bytes_atomic


def cached_bundle(cache: Path, quant: str, progress: bool, log: Callable[[str], None] | None):
    """The demo bundle (SmolLM2, ``quant``, LoRA r=8 on q/k/v/o), exported once and cached."""
    from .errors import PocketPeftError
    from .export import export
    from .manifest import Bundle

    path = cache / "bundles" / f"smollm2-{quant}-r8"
    try:
        b = Bundle(path)
        b.verify()
        return b, 0.0
    except PocketPeftError:
        pass
    if log:
        log(f"exporting SmolLM2 ({quant}) to {path} (once; cached for the next run)…")
    t0 = time.perf_counter()
    b = export("smollm2", path, quant=quant, targets=["torch"], progress=progress)
    return b, time.perf_counter() - t0


def run_demo(sender: str | None = None, seconds: float = 60.0, quant: str = "q4_0", out_dir: str | Path = "pocketpeft-demo",
             cache: Path | None = None, progress: bool = False, max_test_messages: int = 400,
             log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Run the demo; returns (and writes to ``out_dir/report.json``) the before/after report."""
    from . import runtime
    from .data import sender_split, top_senders

    cache = cache or Path.home() / ".cache" / "pocketpeft"
    bundle, export_s = cached_bundle(Path(cache), quant, progress, log)
    sender = sender or top_senders()[0]
    train, test = sender_split(sender)
    test = test[:max_test_messages]
    sess = runtime.open(bundle)
    if log:
        log(f"sender {sender}: {len(train)} earlier messages to learn from, {len(test)} later ones held out; "
            f"backend {sess.backend.name}:{sess.backend.device}")
    before = sess.eval(test, progress=progress)
    rep = sess.train(train, seconds=seconds, progress=progress)
    after = sess.eval(test, progress=progress)
    out = Path(out_dir)
    sess.save_adapter(out / "adapter")
    report = {"sender": sender, "quant": quant, "backend": f"{sess.backend.name}:{sess.backend.device}",
              "export_seconds": round(export_s, 1), "train": rep.to_dict(), "before": before.to_dict(),
              "after": after.to_dict(), "adapter": str(out / "adapter")}
    write_bytes_atomic(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    if log:
        log("")
        log(f"{'held-out metric':<24}{'base':>10}{'personalized':>14}")
        for k, label, pct in (("loss", "loss", False), ("perplexity", "perplexity", False),
                              ("top1", "next-token top-1", True), ("top3", "next-token top-3", True)):
            a, b = report["before"][k], report["after"][k]
            fmt = (lambda x: f"{100 * x:.1f}%") if pct else (lambda x: f"{x:.3f}")
            log(f"{label:<24}{fmt(a):>10}{fmt(b):>14}")
        log("")
        log(f"update: {rep.steps} steps in {rep.seconds:.1f}s ({rep.tokens_per_s:.0f} tokens/s), "
            f"peak RSS {rep.peak_rss_mb:.0f} MiB; adapter in {out / 'adapter'}, report in {out / 'report.json'}")
    return report
