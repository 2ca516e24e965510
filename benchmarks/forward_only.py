"""Forward-only (SPSA) vs backprop LoRA updates on SmolLM2 personalization: held-out loss and
top-3 next-token accuracy over wall time, and peak memory against inference of the same graph.

Per chitchat sender (earlier messages train, later ones are held out), each configuration runs
in its own process, on the same rows in the same order:

- ``backprop torch``: the reference backend, AdamW, for ``--seconds`` of update time;
- ``forward-only onnxruntime-infer``: SPSA over ``infer.onnx`` on a plain InferenceSession, for
  ``4 x --seconds`` (the issue's budget: its gain must come within 4x backprop's time);
- ``inference onnxruntime-infer`` / ``inference torch``: the same graphs only computing the loss
  on the same batches: the memory each update is compared with.

Held-out metrics are taken at checkpoints, outside the timed update windows. Memory is the
peak RSS of the update (or inference) phase alone: the peak counter is reset after loading and
read before each evaluation (``/proc/self/clear_refs``), so loading transients don't hide it.
Each update process first runs inference alone on its first batches (up to 20 s) and records that
phase's peak: the update's peak is compared with it, the same graph in the same process.

    python -m benchmarks.forward_only [--quick] [--senders 3] [--seconds 120]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.common import Suite, main, peak_rss_mib

SEQ, RANK = 64, 8
BATCH = 8  # rows per step; --batch changes it (the bundle is exported at 8 x 64)
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _data(tokenizer, sender: str, n_test_rows: int):
    from pocketpeft.corpus import sender_split
    from pocketpeft.text import pack_rows

    train, test = sender_split(sender)
    x, y = pack_rows(tokenizer, train, SEQ)
    tx, ty = pack_rows(tokenizer, test, SEQ)
    return x, y, tx[:n_test_rows], ty[:n_test_rows]


def _held_out(be, tx, ty) -> dict:
    loss = tok = top3 = 0
    for s in range(0, len(tx), BATCH):
        e = be.eval_batch(tx[s : s + BATCH], ty[s : s + BATCH])
        loss, tok, top3 = loss + e.loss_sum, tok + e.tokens, top3 + e.top3
    return {"loss": loss / tok, "top3": top3 / tok, "tokens": tok}


def worker(
    bundle: str,
    backend: str,
    mode: str,
    sender: str,
    seconds: float,
    checkpoints: int,
    lr: float,
    seed: int,
    n_test_rows: int,
) -> dict:
    """mode: backprop | forward-only | inference. Returns the curve and the phase peaks."""
    import numpy as np

    import pocketpeft as pp
    from pocketpeft.runtime import ForwardOnlyConfig, TrainConfig

    t0 = time.perf_counter()
    sess = pp.runtime.open(
        bundle,
        backend=backend,
        need_train=mode != "inference",
        update=mode if mode != "inference" else "auto",
        forward_only=ForwardOnlyConfig(lr=lr, seed=seed) if mode == "forward-only" else None,
    )
    be = sess.backend
    load_s = time.perf_counter() - t0
    x, y, tx, ty = _data(sess.tokenizer, sender, n_test_rows)
    order = np.random.default_rng(seed).permutation(len(x))
    curve = [{"seconds": 0.0, "steps": 0, **_held_out(be, tx, ty)}]
    load_peak = peak_rss_mib()

    def infer(idx):  # what an update's forward passes compute, without updating
        inner = getattr(be, "inner", be)
        loss_only = getattr(inner, "loss_sum", None)
        loss_only(x[idx], y[idx]) if loss_only else inner.eval_batch(x[idx], y[idx])

    inference_peak = None
    if mode != "inference":  # the same graph's inference peak, in this process, on the first batches
        _reset_peak()
        t, i = time.perf_counter(), 0
        while time.perf_counter() - t < min(20.0, seconds / 4) or i < 2:
            infer(order[(i * BATCH + np.arange(BATCH)) % len(order)])
            i += 1
        inference_peak = peak_rss_mib()
        forward_s = (time.perf_counter() - t) / i
    phase_peak, spent, step = 0.0, 0.0, 0
    if mode == "backprop":
        be.configure(TrainConfig(lr=lr, seed=seed, total_steps=10_000))
    elif mode == "forward-only":  # cosine decay over the steps the budget holds (two forwards each)
        be.configure(TrainConfig(seed=seed, total_steps=max(10, int(seconds / (2.1 * forward_s)))))
    for c in range(1, checkpoints + 1):
        _reset_peak()
        t = time.perf_counter()
        while time.perf_counter() - t < seconds / checkpoints:
            idx = order[(step * BATCH + np.arange(BATCH)) % len(order)]
            if mode == "inference":
                infer(idx)
            else:
                be.train_step(x[idx], y[idx])
            step += 1
        spent += time.perf_counter() - t
        phase_peak = max(phase_peak, peak_rss_mib())
        if mode != "inference":
            curve.append({"seconds": spent, "steps": step, **_held_out(be, tx, ty)})
    return {
        "curve": curve,
        "load_seconds": load_s,
        "steps": step,
        "seconds": spent,
        "inference_peak_rss_mib": inference_peak,
        "step_seconds": spent / max(step, 1),
        "phase_peak_rss_mib": phase_peak,
        "load_peak_rss_mib": load_peak,
        "lora_mib": sum(v.nbytes for v in be.get_adapter().values()) / 2**20,
    }


def _bundle() -> Path:
    import pocketpeft as pp
    from pocketpeft.fsutil import cache_dir

    path = cache_dir() / "bench" / f"smollm2-q4_0-r{RANK}-torch-onnx"
    try:
        pp.Bundle(path).verify()
    except pp.PocketPeftError:
        print(f"exporting {path.name} (once; ~10-20 min on 2 cores) …", flush=True)
        pp.export(
            "smollm2",
            path,
            quant="q4_0",
            targets=["torch", "onnx"],
            seq_len=SEQ,
            batch_size=BATCH,
            lora=pp.LoraConfig(r=RANK, lora_alpha=16, target_modules=MODULES),
        )
    return path


class ForwardOnly(Suite):
    name, module, description = "forward_only", "benchmarks.forward_only", __doc__
    quick_help = "1 sender, 30 s backprop budget, 2 checkpoints"

    def add_arguments(self, ap: argparse.ArgumentParser) -> None:
        ap.add_argument(
            "--batch", type=int, default=8, help="rows of 64 tokens per backprop step (default 8, as the Personalizer)"
        )
        ap.add_argument(
            "--batch-forward-only",
            type=int,
            default=2,
            help="rows per SPSA step (default 2: the estimate's noise is dominated by the random "
            "direction, not the data, so smaller batches buy more directions per second)",
        )
        ap.add_argument("--senders", type=int, default=3)
        ap.add_argument(
            "--seconds", type=float, default=60.0, help="backprop update budget per sender (the demo's 60 s)"
        )
        ap.add_argument("--ratio", type=float, default=4.0, help="forward-only budget = ratio x backprop's")
        ap.add_argument("--lr-backprop", type=float, default=2e-3)
        ap.add_argument(
            "--lr-forward-only",
            type=float,
            default=2e-3,
            help="SGD peak lr of the SPSA update (ForwardOnlyConfig's default, tuned on SmolLM2)",
        )
        ap.add_argument(
            "--test-rows", type=int, default=None, help="held-out rows of 64 tokens per sender (16; quick: 8)"
        )

    def worker(self, argv: list[str]) -> dict:
        global BATCH
        b, be, mode, sender, secs, cps, lr, seed, rows, batch = argv
        BATCH = int(batch)
        return worker(b, be, mode, sender, float(secs), int(cps), float(lr), int(seed), int(rows))

    def run(self, args: argparse.Namespace) -> dict:
        return _run(self, args)

    def table(self, payload: dict, args: argparse.Namespace):
        rows = []
        for sender, per in payload["results"].items():
            for name, r in per.items():
                if name == "summary":
                    continue
                c = r["curve"]
                rows.append(
                    [
                        sender,
                        name,
                        f"{c[0]['loss']:.3f} → {c[-1]['loss']:.3f}",
                        f"{c[0]['top3']:.3f} → {c[-1]['top3']:.3f}",
                        r["seconds"],
                        r["steps"],
                        r["phase_peak_rss_mib"],
                    ]
                )
        return rows, [
            ("sender", ""),
            ("config", ""),
            ("loss start→end", ""),
            ("top-3", ""),
            ("s", ".0f"),
            ("steps", "d"),
            ("peak MiB", ".0f"),
        ]

    def summary(self, payload: dict, args: argparse.Namespace) -> list[str]:
        return [f"{sender}: {json.dumps(per['summary'], indent=1)}" for sender, per in payload["results"].items()]


def _run(suite: Suite, args: argparse.Namespace) -> dict:
    from pocketpeft.corpus import top_senders

    senders, secs, cps = (1, 30.0, 2) if args.quick else (args.senders, args.seconds, 4)
    bb, fb = args.batch, args.batch_forward_only
    test_rows = args.test_rows or (8 if args.quick else 16)
    bundle = str(_bundle())
    configs = [
        ("backprop torch", "torch", "backprop", secs, args.lr_backprop, bb),
        (
            "forward-only onnxruntime-infer",
            "onnxruntime-infer",
            "forward-only",
            args.ratio * secs,
            args.lr_forward_only,
            fb,
        ),
        ("inference onnxruntime-infer", "onnxruntime-infer", "inference", min(secs, 30.0), 0.0, fb),
        ("inference torch", "torch", "inference", min(secs, 30.0), 0.0, bb),
    ]
    results = {}
    for sender in top_senders()[:senders]:
        per = results[sender] = {}
        for name, backend, mode, budget, lr, batch in configs:
            print(f"[{sender}] {name} ({budget:.0f} s, batch {batch})", flush=True)
            per[name] = suite.run_worker(
                [
                    bundle,
                    backend,
                    mode,
                    sender,
                    str(budget),
                    str(cps if mode != "inference" else 1),
                    str(lr),
                    "0",
                    str(test_rows),
                    str(batch),
                ],
                timeout=7200,
            )
        bp, fo = per["backprop torch"], per["forward-only onnxruntime-infer"]
        start = bp["curve"][0]["loss"]
        gain_bp = start - bp["curve"][-1]["loss"]
        gain_fo = fo["curve"][0]["loss"] - fo["curve"][-1]["loss"]
        reached = next((p["seconds"] for p in fo["curve"][1:] if start - p["loss"] >= gain_bp), None)
        per["summary"] = {
            "held_out_loss": {
                "start": start,
                "backprop_end": bp["curve"][-1]["loss"],
                "forward_only_end": fo["curve"][-1]["loss"],
            },
            "top3": {
                "start": bp["curve"][0]["top3"],
                "backprop_end": bp["curve"][-1]["top3"],
                "forward_only_end": fo["curve"][-1]["top3"],
            },
            "backprop_loss_gain": gain_bp,
            "forward_only_loss_gain": gain_fo,
            "backprop_seconds": bp["seconds"],
            "forward_only_seconds": fo["seconds"],
            "forward_only_share_of_backprop_gain": gain_fo / gain_bp if gain_bp > 0 else None,
            "forward_only_reached_backprop_gain_at_s": reached,
            # against inference of the same graph on the same batches in the same process (a separate
            # process's peak varies by a few hundred MiB with what loading leaves resident)
            "forward_only_peak_vs_inference": fo["phase_peak_rss_mib"] / fo["inference_peak_rss_mib"],
            "backprop_peak_vs_inference": bp["phase_peak_rss_mib"] / bp["inference_peak_rss_mib"],
            "forward_only_peak_vs_inference_process": fo["phase_peak_rss_mib"]
            / per["inference onnxruntime-infer"]["phase_peak_rss_mib"],
            "forward_only_peak_vs_backprop": fo["phase_peak_rss_mib"] / bp["phase_peak_rss_mib"],
        }
    sums = [per["summary"] for per in results.values()]
    targets_met = {
        "loss_reduced_every_sender": all(sm["forward_only_loss_gain"] > 0 for sm in sums),
        "peak_le_1_1x_inference": all(sm["forward_only_peak_vs_inference"] <= 1.1 for sm in sums),
    }
    payload = {
        "settings": {
            "model": "SmolLM2-135M-Instruct q4_0",
            "lora_r": RANK,
            "target_modules": MODULES,
            "batch_backprop": bb,
            "batch_forward_only": fb,
            "seq_len": SEQ,
            "backprop_seconds": secs,
            "forward_only_seconds": args.ratio * secs,
            "lr_backprop": args.lr_backprop,
            "lr_forward_only": args.lr_forward_only,
            "eps": 1e-3,
            "perturbations": 1,
            "seed": 0,
            "held_out_rows": test_rows,
            "quick": args.quick,
        },
        "targets": {
            "peak_vs_inference": "<= 1.1",
            "forward_only_budget": "4x backprop's",
            "held_out_loss": "reduced on every sender",
        },
        "targets_met": targets_met,
        "results": results,
    }
    return payload


if __name__ == "__main__":
    main(ForwardOnly())
