"""Fleet learning: a global adapter learned across simulated devices (Flower's simulation engine),
with and without differential privacy, then personal adapters on top of it.

Clients are chitchat senders (>= 1k words), each training on its own earlier messages on the
device path (ONNX Runtime, split personal preset: LoRA r=16 on SmolLM2's top 8 layers); the
held-out test senders (:func:`pocketpeft.corpus.held_out_senders`) are never clients. On each test
sender's later messages it reports next-word top-3 accuracy and keystroke savings of the model
alone (no word counts) for: the base model, the global adapter (no DP), the global adapter with
DP (stated ε at δ=1e-5), and global + a time-boxed personal update on the sender's earlier
messages. Per round: the held-out loss on test senders' messages and the bytes each client uploads.

Targets (issue 18): the DP global adapter at ε <= 8 gains >= +6 points next-word top-3 over base
on unseen senders; global + personal gains >= +3 points over global alone.

    python -m benchmarks.fleet [--quick] [--clients N] [--rounds R] [--per-round K] [--steps S]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import Suite, main


def _bundle(log):
    """A private copy of the demo's cached device bundle (onnx with a global slot, gguf for serving)."""
    from pocketpeft.apps.demo import cached_bundle, serve_backend
    from pocketpeft.fsutil import cache_dir
    from pocketpeft.manifest import Bundle

    b, _ = cached_bundle(cache_dir(), "q4_0", False, log, gguf=serve_backend() is not None, onnx=True)
    tmp = Path(tempfile.mkdtemp(prefix="pocketpeft-fleet-bench-"))
    shutil.copytree(b.root, tmp / "bundle", ignore=shutil.ignore_patterns("global"))
    return Bundle(tmp / "bundle"), tmp


def _score(serve, texts, ks_messages):
    from pocketpeft.runtime.keystrokes import keystroke_metrics

    ks = keystroke_metrics(serve.suggest, texts, 3, ks_messages)
    return {k: ks[k] for k in ("next_word_top1", "next_word_top3", "keystroke_savings")}


def run(args, log=print) -> dict:
    from pocketpeft import runtime
    from pocketpeft.corpus import held_out_senders, sender_split
    from pocketpeft.fleet.run import pick_senders, simulate
    from pocketpeft.global_adapter import load_global

    bundle, tmp = _bundle(log)
    test_senders = held_out_senders(args.test_senders)
    clients = pick_senders(args.clients, exclude=test_senders, min_words=1000)
    tests = {s: sender_split(s) for s in test_senders}
    eval_texts = [t for s in test_senders for t in tests[s][1][:6]]
    common = dict(
        clients=len(clients),
        rounds=args.rounds,
        clients_per_round=args.per_round,
        senders=clients,
        exclude=test_senders,
        steps=args.steps,
        backend="onnxruntime",
        eval_texts=eval_texts,
    )
    runs = {}
    for name, extra in (("global", {}), ("global_dp", {"dp_epsilon": args.epsilon, "clip_norm": args.clip})):
        t0 = time.perf_counter()
        log(f"fleet simulation '{name}': {len(clients)} clients, {args.per_round}/round, {args.rounds} rounds…")
        summary = simulate(bundle.root, tmp / name, **common, **extra)
        summary["wall_seconds"] = time.perf_counter() - t0
        runs[name] = summary
    globals_ = {n: load_global(Path(r["global"]), bundle.manifest.base_sha256)[0].tensors for n, r in runs.items()}

    serve_name = "llamacpp" if "gguf" in bundle.targets else "torch"
    serve = runtime.open(bundle.root, backend=serve_name, need_train=False)
    trainer = runtime.open(bundle.root, backend="onnxruntime")
    initial = bundle.initial_adapter().tensors
    per_sender = []
    for s in test_senders:
        train, test = tests[s]
        row = {"sender": s}
        serve.set_adapter_tensors(initial)
        serve.set_global_tensors(None)
        row["base"] = _score(serve, test, args.ks_messages)
        for n, g in globals_.items():
            serve.set_global_tensors(g)
            row[n] = _score(serve, test, args.ks_messages)
        if args.personal_seconds:
            trainer.set_global_tensors(globals_["global"])
            trainer.set_adapter_tensors(initial)
            rep = trainer.train(train, seconds=args.personal_seconds)
            serve.set_global_tensors(globals_["global"])
            serve.set_adapter_tensors(trainer.get_adapter_tensors())
            row["global_personal"] = {**_score(serve, test, args.ks_messages), "steps": rep.steps}
        per_sender.append(row)
        log(
            f"  {s[:8]}: top-3 base {100 * row['base']['next_word_top3']:.1f} global "
            f"{100 * row['global']['next_word_top3']:.1f} DP {100 * row['global_dp']['next_word_top3']:.1f}"
            + (f" +personal {100 * row['global_personal']['next_word_top3']:.1f}" if "global_personal" in row else "")
        )
    shutil.rmtree(tmp, ignore_errors=True)
    configs = ["base", "global", "global_dp"] + (["global_personal"] if args.personal_seconds else [])
    mean = {
        c: {k: statistics.mean(r[c][k] for r in per_sender) for k in ("next_word_top3", "keystroke_savings")}
        for c in configs
    }
    dp = runs["global_dp"].get("dp") or {}
    gain_dp = 100 * (mean["global_dp"]["next_word_top3"] - mean["base"]["next_word_top3"])
    gain_personal = (
        100 * (mean["global_personal"]["next_word_top3"] - mean["global"]["next_word_top3"])
        if args.personal_seconds
        else None
    )
    eps = dp.get("epsilon")
    return {
        "clients": len(clients),
        "clients_per_round": args.per_round,
        "rounds": args.rounds,
        "steps_per_client_round": args.steps,
        "test_senders": len(test_senders),
        "personal_seconds": args.personal_seconds,
        "keystroke_messages_per_sender": args.ks_messages,
        "dp": dp,
        "runs": {
            n: {k: r.get(k) for k in ("rounds_log", "rejected", "wall_seconds", "aggregation", "dp") if k in r}
            | {"per_round": r.get("per_round") or r.get("records")}
            for n, r in runs.items()
        },
        "mean": mean,
        "gain_points": {"global_dp_over_base": gain_dp, "personal_over_global": gain_personal},
        "targets": {
            "dp_epsilon<=8": eps is not None and eps <= 8,
            "dp_global_top3_gain>=6": gain_dp >= 6,
            "personal_over_global_top3_gain>=3": gain_personal is not None and gain_personal >= 3,
        },
        "per_sender": per_sender,
    }


class Fleet(Suite):
    name, module, description = "fleet", "benchmarks.fleet", __doc__
    quick_help = "12 clients, 4 per round, 2 rounds, 3 test senders, 20 s personal updates"

    def add_arguments(self, ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--clients", type=int, help="simulated clients (default 50; quick 12)")
        ap.add_argument("--per-round", type=int, help="clients sampled per round (default 10; quick 4)")
        ap.add_argument("--rounds", type=int, help="rounds (default 6; quick 2)")
        ap.add_argument("--steps", type=int, default=4, help="local steps per client per round")
        ap.add_argument("--epsilon", type=float, default=8.0, help="DP target ε at δ=1e-5")
        ap.add_argument("--clip", type=float, default=0.5, help="DP clipping bound of a client's update (L2)")
        ap.add_argument("--test-senders", type=int, help="held-out senders (default 10; quick 3)")
        ap.add_argument("--personal-seconds", type=float, help="personal update per test sender (default 60; quick 20)")
        ap.add_argument("--ks-messages", type=int, help="held-out messages typed per sender (default 12; quick 5)")

    def run(self, args: argparse.Namespace) -> dict:
        q = args.quick
        args.clients = args.clients or (12 if q else 50)
        args.per_round = args.per_round or (4 if q else 10)
        args.rounds = args.rounds or (2 if q else 6)
        args.test_senders = args.test_senders or (3 if q else 10)
        args.personal_seconds = args.personal_seconds if args.personal_seconds is not None else (20.0 if q else 60.0)
        args.ks_messages = args.ks_messages or (5 if q else 12)
        t0 = time.perf_counter()
        res = run(args)
        res["wall_seconds"] = time.perf_counter() - t0
        return {"quick": q, **res}

    def table(self, payload: dict, args: argparse.Namespace):
        rows = [[c, 100 * m["next_word_top3"], 100 * m["keystroke_savings"]] for c, m in payload["mean"].items()]
        return rows, [("config", ""), ("next-word top-3 %", ".1f"), ("keystroke savings %", ".1f")]

    def summary(self, payload: dict, args: argparse.Namespace) -> list[str]:
        g = payload["gain_points"]
        eps = (payload.get("dp") or {}).get("epsilon")
        return [
            f"DP global (ε={eps if eps is None else round(eps, 2)} at δ=1e-5) over base: {g['global_dp_over_base']:+.2f} "
            f"points top-3; global + personal over global: {g['personal_over_global']}; targets {payload['targets']}"
        ]


if __name__ == "__main__":
    main(Fleet())
