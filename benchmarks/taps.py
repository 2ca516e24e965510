"""Learning from taps: does a preference (DPO) loss on the keyboard's feedback make the top
suggestion right more often than learning from the text alone?

A simulated user per chitchat sender (the 10 most prolific, :func:`pocketpeft.corpus.held_out_senders`)
types the sender's messages day by day on the device path (updates on the training backend the
demo uses, suggestions from llama.cpp, the user's word counts mixed in as the Personalizer
serves them) and taps a suggestion exactly when it is the word being typed
(:func:`pocketpeft.runtime.keystrokes.simulate_typing`); every word's bar is recorded with
:meth:`Personalizer.feedback <pocketpeft.runtime.Personalizer.feedback>` (tapped, or all
ignored). After each simulated day an update runs with the day's text and taps. Two arms in the
same run, from the same base, differing only in ``preference_weight``:

- ``text``: the language-model loss alone (``preference_weight=0``);
- ``taps``: the same plus the DPO loss from the taps (``preference_weight``, default 1).

Reported per day and arm: top-1 acceptance (the first suggestion at a word's start is the word)
and keystroke savings while typing that day (before its update), and after its update the
next-word top-1 / top-3 on the sender's held-out (latest) messages. Targets (issue 19): after 5
days, held-out top-1 acceptance with taps >= text-only + 1 point; held-out next-word top-3 with
taps never below text-only (any day, mean over senders).

    python -m benchmarks.taps [--quick] [--senders N] [--days D] [--per-day M] [--steps S]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from benchmarks.common import Suite, main

ARMS = ("text", "taps")


def next_word_metrics(suggest, texts: list[str]) -> dict:
    """Next-word top-1 / top-3 over ``texts``: each word predicted from the words before it in
    its message, nothing of it typed (the first keystroke of :func:`simulate_typing`, alone)."""
    from pocketpeft.runtime.keystrokes import message_words

    top1 = top3 = words = 0
    for text in texts:
        msg = " ".join(text.split())
        for start, word, _ in message_words(msg):
            offered = [w.lower() for w in suggest(msg[:start], 3)]
            words += 1
            top1 += offered[:1] == [word.lower()]
            top3 += word.lower() in offered[:3]
    return {"next_word_top1": top1 / max(words, 1), "next_word_top3": top3 / max(words, 1), "words": words}


def simulate_user(personalizer, days: list[list[str]], held: list[str], steps: int, log=print) -> list[dict]:
    """Type each day's messages on ``personalizer``, record every bar as feedback, update, and
    score the held-out messages; one dict per day."""
    from pocketpeft.runtime.keystrokes import simulate_typing

    out = []
    for d, msgs in enumerate(days):
        taps: list[tuple] = []
        t0 = time.perf_counter()
        typed = simulate_typing(personalizer.suggest, msgs, 3, on_word=lambda *t, into=taps: into.append(t))
        type_s = time.perf_counter() - t0
        personalizer.observe(msgs)
        for prefix, bar, chosen in taps:
            if bar:
                personalizer.feedback(prefix, bar, chosen)
        upd = personalizer.update(max_steps=steps)
        held_m = next_word_metrics(personalizer.suggest, held)
        out.append(
            {
                "day": d + 1,
                "typed": typed,
                "taps": sum(1 for _, bar, c in taps if c is not None),
                "ignored": sum(1 for _, bar, c in taps if c is None and bar),
                "typing_seconds": type_s,
                "update": {
                    k: getattr(upd, k)
                    for k in (
                        "accepted",
                        "reason",
                        "steps",
                        "seconds",
                        "preference_pairs",
                        "heldout_acceptance_before",
                        "heldout_acceptance_after",
                    )
                },
                "heldout": held_m,
            }
        )
        log(
            f"  day {d + 1}: top-1 acceptance {100 * typed['next_word_top1']:.1f}%, KSR "
            f"{100 * typed['keystroke_savings']:.1f}%, {out[-1]['taps']} taps; update "
            f"{'accepted' if upd.accepted else 'rejected'} ({upd.steps} steps, {upd.preference_pairs} pairs, "
            f"{upd.seconds:.0f}s); held-out top-1 {100 * held_m['next_word_top1']:.1f}% top-3 "
            f"{100 * held_m['next_word_top3']:.1f}%"
        )
    return out


def run(n_senders: int, n_days: int, per_day: int, steps: int, held_n: int, weight: float, log=print) -> dict:
    from pocketpeft import runtime
    from pocketpeft.apps.demo import cached_bundle, demo_personalizer
    from pocketpeft.apps.demo import serve_backend as demo_serve_backend
    from pocketpeft.corpus import held_out_senders, sender_split
    from pocketpeft.fsutil import cache_dir

    serve_backend = demo_serve_backend() or "torch"
    bundle, _ = cached_bundle(cache_dir(), "q4_0", False, log, gguf=serve_backend == "llamacpp", onnx=True)
    train_sess = runtime.open(bundle)  # the device path: what auto picks for training
    serve = runtime.open(bundle, backend=serve_backend, need_train=False)
    rows = []
    for i, sender in enumerate(held_out_senders(n_senders)):
        train, test = sender_split(sender)
        recent = train[-n_days * per_day :]
        days = [recent[d * per_day : (d + 1) * per_day] for d in range(n_days)]
        held = test[:held_n]
        row = {"sender": sender, "arms": {}}
        for arm in ARMS:
            log(f"[{i + 1}/{n_senders}] {sender[:8]} {arm}")
            train_sess.reset_adapter()
            serve.reset_adapter()
            with tempfile.TemporaryDirectory() as store:
                p = demo_personalizer(train_sess, store, sender, serve_session=serve)
                p.preference_weight = weight if arm == "taps" else 0.0
                row["arms"][arm] = simulate_user(p, days, held, steps, log)
                p.close()
        rows.append(row)
    return summarize(rows, n_days) | {
        "training_backend": train_sess.backend.name,
        "serving_backend": serve.backend.name,
        "per_sender": rows,
    }


def summarize(rows: list[dict], n_days: int) -> dict:
    """Per day and arm: means over senders; the targets on the last day."""
    per_day = []
    for d in range(n_days):
        entry = {"day": d + 1}
        for arm in ARMS:
            days = [r["arms"][arm][d] for r in rows]
            entry[arm] = {
                "typing_top1_acceptance": statistics.fmean(x["typed"]["next_word_top1"] for x in days),
                "typing_keystroke_savings": statistics.fmean(x["typed"]["keystroke_savings"] for x in days),
                "heldout_top1": statistics.fmean(x["heldout"]["next_word_top1"] for x in days),
                "heldout_top3": statistics.fmean(x["heldout"]["next_word_top3"] for x in days),
                "accepted": sum(x["update"]["accepted"] for x in days),
                "update_seconds": statistics.fmean(x["update"]["seconds"] for x in days),
                "preference_pairs": statistics.fmean(x["update"]["preference_pairs"] for x in days),
            }
        per_day.append(entry)
    last = per_day[-1]
    gain = 100 * (last["taps"]["heldout_top1"] - last["text"]["heldout_top1"])
    top3_never_lower = all(e["taps"]["heldout_top3"] >= e["text"]["heldout_top3"] for e in per_day)
    return {
        "per_day": per_day,
        "heldout_top1_gain_points_last_day": gain,
        "targets": {
            "heldout_top1_gain_ge_1_point_after_last_day": gain >= 1.0,
            "heldout_top3_never_below_text_only": top3_never_lower,
        },
    }


class Taps(Suite):
    name, module, description = "taps", "benchmarks.taps", __doc__
    quick_help = "2 senders, 2 days of 6 messages, 6 steps"

    def add_arguments(self, ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--senders", type=int, help="senders (default 10; quick 2)")
        ap.add_argument("--days", type=int, help="simulated days (default 5; quick 2)")
        ap.add_argument("--per-day", type=int, help="messages typed per day (default 10; quick 6)")
        ap.add_argument("--steps", type=int, help="optimizer steps per update (default 12; quick 6)")
        ap.add_argument("--held", type=int, help="held-out messages per sender (default 15; quick 8)")
        ap.add_argument("--weight", type=float, default=1.0, help="preference_weight of the taps arm")

    def run(self, args: argparse.Namespace) -> dict:
        q = args.quick
        t0 = time.perf_counter()
        res = run(
            args.senders or (2 if q else 10),
            args.days or (2 if q else 5),
            args.per_day or (6 if q else 10),
            args.steps or (6 if q else 12),
            args.held or (8 if q else 15),
            args.weight,
        )
        return {"quick": q, "preference_weight": args.weight, **res, "wall_seconds": time.perf_counter() - t0}

    def table(self, payload: dict, args: argparse.Namespace):
        rows = []
        for e in payload["per_day"]:
            for arm in ARMS:
                a = e[arm]
                rows.append(
                    [
                        e["day"],
                        arm,
                        100 * a["typing_top1_acceptance"],
                        100 * a["typing_keystroke_savings"],
                        100 * a["heldout_top1"],
                        100 * a["heldout_top3"],
                        a["accepted"],
                        a["preference_pairs"],
                    ]
                )
        return rows, [
            ("day", "d"),
            ("arm", ""),
            ("top-1 accept. %", ".1f"),
            ("KSR %", ".1f"),
            ("held-out top-1 %", ".1f"),
            ("held-out top-3 %", ".1f"),
            ("accepted", "d"),
            ("pairs", ".0f"),
        ]

    def summary(self, payload: dict, args: argparse.Namespace) -> list[str]:
        t = payload["targets"]
        return [
            f"held-out top-1 after the last day: taps {payload['heldout_top1_gain_points_last_day']:+.2f} points "
            f"over text only (target >= +1: {'met' if t['heldout_top1_gain_ge_1_point_after_last_day'] else 'NOT met'}); "
            f"held-out top-3 never below text only: {'met' if t['heldout_top3_never_below_text_only'] else 'NOT met'}"
        ]


if __name__ == "__main__":
    main(Taps())
