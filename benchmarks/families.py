"""Model families side by side: Gemma 3 270M next to SmolLM2-135M, measured in the same run.

Both embedded bases are exported the way the demo exports them (each in its demo format: q4_0
for SmolLM2, q8_0 for Gemma, whose k-quants don't survive q4_0; ``--quant`` sets both; the
personalization preset: LoRA r=16 on every linear of the top 8 layers, split; ONNX Runtime training graphs and
a llama.cpp GGUF where those run here) and run on the device path:

- **update step**: one training step of the bundle's batch on the session's update backend (ONNX
  Runtime on the split bundle: the frozen prefix's forward pass + the suffix's step, no prefix
  cache), the two bases alternating rep by rep so a change in the machine's speed hits both;
- **keystroke**: the serving session's ``suggest(prefix, 3)`` before every keystroke of the same
  held-out messages (llama.cpp, no deadline: the whole word search), messages alternating between
  the bases; p50 / p99 and the keystroke savings it gives;
- **memory**: peak RSS of a fresh process that opens the update session and runs 3 steps;
- **personalization** (``--senders N``, default 3): :mod:`benchmarks.personalize` per base.

Targets (issue 20, the big vocabulary): a keystroke on Gemma within 2x SmolLM2's p50, an update
step within 3x.

    python -m benchmarks.families [--quick] [--senders N] [--reps R] [--messages M]
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import Suite, main, summarize

BASES = ("smollm2", "gemma3-270m")


def _bundle(base: str, quant: str, log=print):
    from pocketpeft.apps.demo import cached_bundle, serve_backend
    from pocketpeft.fsutil import cache_dir
    from pocketpeft.runtime.selection import probe

    onnx = probe("onnxruntime").available
    return cached_bundle(cache_dir(), quant, False, log, gguf=serve_backend() is not None, onnx=onnx, base=base)[0]


def _batch(sess, seed: int = 3):
    from pocketpeft.corpus import general_texts
    from pocketpeft.text import pack_rows

    inputs, labels = pack_rows(sess.tokenizer, general_texts(n=200, seed=seed), sess.manifest.seq_len)
    bs = sess.manifest.batch_size
    return inputs[:bs], labels[:bs]


def _step(sess, ids, labels) -> float:
    """Seconds of one update step without the prefix cache."""
    be = sess.backend
    t0 = time.perf_counter()
    if sess.manifest.split is not None and hasattr(be, "train_step_hidden"):
        be.train_step_hidden(be.prefix(ids), labels)
    else:
        be.train_step(ids, labels)
    return time.perf_counter() - t0


def _quant(base: str, quant: str | None) -> str:
    from pocketpeft.apps.demo import demo_quant

    return quant or demo_quant(base)


def speed(bases, quant: str | None, reps: int, messages: int, log=print) -> dict:
    from pocketpeft import runtime
    from pocketpeft.corpus import sender_split, top_senders
    from pocketpeft.runtime.keystrokes import simulate_typing

    bundles = {b: _bundle(b, _quant(b, quant), log) for b in bases}
    train = {b: runtime.open(bundles[b]) for b in bases}
    serve = {b: runtime.open(bundles[b], need_train=False) for b in bases}
    batches = {b: _batch(train[b]) for b in bases}
    steps: dict[str, list[float]] = {b: [] for b in bases}
    for b in bases:  # warm-up: graph allocation, first-call costs
        _step(train[b], *batches[b])
    for rep in range(reps):
        for b in bases:
            steps[b].append(_step(train[b], *batches[b]))
        log(f"step rep {rep + 1}/{reps}: " + ", ".join(f"{b} {steps[b][-1]:.2f}s" for b in bases))
    _, test = sender_split(top_senders()[0])
    texts = test[:messages]
    keys: dict[str, list[float]] = {b: [] for b in bases}
    quality: dict[str, list[dict]] = {b: [] for b in bases}
    for b in bases:
        serve[b].suggest("hi", 3)  # warm-up
    for i, text in enumerate(texts):
        for b in bases:
            clock = {"t": time.perf_counter()}

            def on_key(prefix, offered, b=b, clock=clock):
                now = time.perf_counter()
                keys[b].append(1000 * (now - clock["t"]))
                clock["t"] = now

            def suggest(prefix, k, b=b, clock=clock):
                clock["t"] = time.perf_counter()
                return serve[b].suggest(prefix, k)

            quality[b].append(simulate_typing(suggest, [text], 3, on_key=on_key))
        log(f"message {i + 1}/{len(texts)}: " + ", ".join(f"{b} {len(keys[b])} keys" for b in bases))
    out = {}
    for b in bases:
        words = sum(q["words"] for q in quality[b])
        chars = sum(q["chars"] for q in quality[b])
        saved = sum(q["keystroke_savings"] * q["chars"] for q in quality[b])
        top3 = sum(q["next_word_top3"] * q["words"] for q in quality[b])
        out[b] = {
            "quant": _quant(b, quant),
            "train_backend": train[b].backend.name,
            "serve_backend": serve[b].backend.name,
            "vocab_size": train[b].manifest.arch.vocab_size,
            "layers": train[b].manifest.arch.num_hidden_layers,
            "batch": [int(x) for x in batches[b][0].shape],
            "update_step_s": summarize(steps[b]),
            "keystroke_ms": {
                **summarize(keys[b]),
                "p99": sorted(keys[b])[min(len(keys[b]) - 1, int(0.99 * len(keys[b])))],
            },
            "keystrokes": len(keys[b]),
            "words": words,
            "keystroke_savings": saved / max(chars, 1),
            "next_word_top3": top3 / max(words, 1),
        }
    return out


def memory(base: str, quant: str) -> dict:
    """Peak RSS (MiB) of this process after opening ``base``'s update session and 3 steps."""
    from pocketpeft import runtime
    from pocketpeft.procinfo import peak_rss_mib

    sess = runtime.open(_bundle(base, quant))
    ids, labels = _batch(sess)
    for _ in range(3):
        _step(sess, ids, labels)
    return {"base": base, "backend": sess.backend.name, "peak_rss_mib": peak_rss_mib()}


class Families(Suite):
    name, module, description = "families", "benchmarks.families", __doc__
    quick_help = "3 step reps, 3 messages, 1 sender with 30 s updates"

    def add_arguments(self, ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--quant", help="frozen weights' format of both bases (default: each base's demo format)")
        ap.add_argument("--reps", type=int, help="update-step reps per base (default 8; quick 3)")
        ap.add_argument("--messages", type=int, help="held-out messages typed per base (default 12; quick 3)")
        ap.add_argument("--senders", type=int, help="personalization senders per base (default 3; quick 1; 0: skip)")
        ap.add_argument("--seconds", type=float, help="update time box per sender (default 60; quick 30)")

    def worker(self, argv: list[str]) -> dict:
        base, quant = argv
        return memory(base, quant)

    def run(self, args: argparse.Namespace) -> dict:
        from benchmarks import personalize

        reps = args.reps or (3 if args.quick else 8)
        msgs = args.messages or (3 if args.quick else 12)
        senders = args.senders if args.senders is not None else (1 if args.quick else 3)
        secs = args.seconds or (30.0 if args.quick else 60.0)
        for b in BASES:  # export (cached) before anything is timed
            _bundle(b, _quant(b, args.quant))
        res = speed(BASES, args.quant, reps, msgs)
        for b in BASES:
            res[b]["memory"] = self.run_worker([b, _quant(b, args.quant)])
        small, big = (res[b] for b in BASES)
        ratios = {
            "update_step": big["update_step_s"]["median"] / small["update_step_s"]["median"],
            "keystroke_p50": big["keystroke_ms"]["median"] / small["keystroke_ms"]["median"],
            "peak_rss": big["memory"]["peak_rss_mib"] / small["memory"]["peak_rss_mib"],
        }
        pers = {}
        if senders:
            for b in BASES:
                pers[b] = personalize.run(
                    senders,
                    secs,
                    ks_messages=10 if args.quick else 15,
                    loss_messages=40 if args.quick else 60,
                    quant=_quant(b, args.quant),
                    others_messages=40 if args.quick else 60,
                    base=b,
                )
                pers[b].pop("per_sender", None)
        return {
            "quick": args.quick,
            "quant": args.quant,
            "bases": res,
            "ratios_gemma_over_smollm2": ratios,
            "targets": {
                "keystroke_p50_within_2x": ratios["keystroke_p50"] <= 2.0,
                "update_step_within_3x": ratios["update_step"] <= 3.0,
            },
            "personalization": pers,
        }

    def table(self, payload: dict, args: argparse.Namespace):
        rows = []
        for b, r in payload["bases"].items():
            p = payload["personalization"].get(b, {}).get("mean", {})
            rows.append(
                [
                    b,
                    r["vocab_size"],
                    r["update_step_s"]["median"],
                    r["keystroke_ms"]["median"],
                    r["keystroke_ms"]["p99"],
                    100 * r["keystroke_savings"],
                    r["memory"]["peak_rss_mib"],
                    p.get("top3_gain_points", float("nan")),
                ]
            )
        return rows, [
            ("base", ""),
            ("vocab", "d"),
            ("step s", ".2f"),
            ("key p50 ms", ".1f"),
            ("key p99 ms", ".1f"),
            ("KSR %", ".1f"),
            ("peak MiB", ".0f"),
            ("top-3 gain", "+.2f"),
        ]

    def summary(self, payload: dict, args: argparse.Namespace) -> list[str]:
        r = payload["ratios_gemma_over_smollm2"]
        return [
            f"Gemma 3 270M / SmolLM2: update step {r['update_step']:.2f}x (target <= 3x), keystroke p50 "
            f"{r['keystroke_p50']:.2f}x (target <= 2x), peak RSS {r['peak_rss']:.2f}x; targets {payload['targets']}"
        ]


if __name__ == "__main__":
    main(Families())
