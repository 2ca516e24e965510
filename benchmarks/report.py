"""The benchmark suite runner and its report (``pocketpeft bench``).

Suites, each runnable alone, each a set of benchmark modules run as subprocesses (a module
that does not exist yet is skipped with a message):

- ``train``: update speed and memory (benchmarks.train_speed, .forward_only, .gpu_train), and time
  to the PEFT baseline's held-out loss (benchmarks.time_to_quality)
- ``suggest``: per-keystroke suggestion latency (benchmarks.suggest_latency)
- ``quality``: next-word accuracy before/after personalization (benchmarks.personalize)
- ``taps``: learning from the keyboard's taps (DPO) vs text alone over simulated days (benchmarks.taps)
- ``export``: export time and bundle size per target (benchmarks.export_bench)
- ``memory``: peak RSS of update and of serving, read from the train and suggest results
  (those suites are run first when their results are missing)

Every module writes ``<name>.json`` (or ``<name>_quick.json``) into the results directory; the
report (``summary.md`` + PNG plots) is built from whatever results are there, newest first.

    python -m benchmarks.report [--suite all] [--quick] [--out DIR] [--report-only] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SUITES: dict[str, list[str]] = {
    "train": [
        "benchmarks.train_speed",
        "benchmarks.forward_only",
        "benchmarks.gpu_train",
        "benchmarks.time_to_quality",
    ],
    "suggest": ["benchmarks.suggest_latency"],
    "quality": ["benchmarks.personalize"],
    "export": ["benchmarks.export_bench"],
    "memory": ["benchmarks.loop_memory"],
    "fleet": ["benchmarks.fleet"],
    "taps": ["benchmarks.taps"],
    "families": ["benchmarks.families", "benchmarks.quant_quality"],
}
ALL = ["train", "suggest", "quality", "export", "memory", "fleet", "taps", "families"]


# ---------------------------------------------------------------------------- running
def _module_help(module: str) -> str:
    p = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    return p.stdout


def run_module(module: str, quick: bool, out: Path, extra: list[str] | None = None, log=print) -> dict[str, Any]:
    """Run ``python -m module [--quick] [--out OUT] [extra]``; returns {module, status, seconds, ...}.
    Options the module's ``--help`` doesn't list are not passed."""
    import time

    if importlib.util.find_spec(module) is None:
        log(f"skip {module}: not present in this checkout")
        return {"module": module, "status": "absent"}
    helptext = _module_help(module)
    cmd = [sys.executable, "-m", module]
    if quick and "--quick" in helptext:
        cmd.append("--quick")
    if "--out" in helptext:
        cmd += ["--out", str(out)]
    extra = list(extra or [])
    while extra:
        opt, val = extra[0], extra[1]
        extra = extra[2:]
        if opt in helptext:
            cmd += [opt, val]
    log(f"run {' '.join(cmd[2:])}")
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    res = {
        "module": module,
        "seconds": round(time.perf_counter() - t0, 1),
        "status": "ok" if p.returncode == 0 else "failed",
        "returncode": p.returncode,
    }
    if p.returncode != 0:
        res["error"] = (p.stderr or p.stdout)[-2000:]
        log(f"  {module} failed ({p.returncode}):\n{res['error'][-800:]}")
    return res


def run_suites(
    suites: list[str], quick: bool, out: Path, base: str | None = None, targets: str | None = None, log=print
) -> list[dict[str, Any]]:
    """Run the modules of ``suites`` (``memory`` runs ``train``/``suggest`` only when their
    results are missing from ``out``); returns one status dict per module."""
    order: list[str] = []
    for s in suites:
        mods = SUITES[s]
        if s == "memory":
            have = {r["benchmark"].removesuffix("_quick") for r in collect(out).values()}
            mods = [
                m
                for m, name in (
                    ("benchmarks.train_speed", "train_speed"),
                    ("benchmarks.suggest_latency", "suggest_latency"),
                )
                if name not in have
            ]
        order += [m for m in mods if m not in order]
    extra = (["--base", base] if base else []) + (["--targets", targets] if targets else [])
    return [run_module(m, quick, out, extra, log) for m in order]


# ---------------------------------------------------------------------------- collecting
def collect(results_dir: Path) -> dict[str, dict[str, Any]]:
    """One result per benchmark in ``results_dir``, keyed by its name without ``_quick``: the
    newest full-size run where there is one (a full run is the measurement; a later quick run
    is a smoke check and does not replace it), else the newest quick one (flagged ``_quick``)."""
    best: dict[str, dict[str, Any]] = {}
    for p in sorted(Path(results_dir).glob("*.json")):
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(obj, dict) or "benchmark" not in obj:
            continue
        name = str(obj["benchmark"])
        key = name.removesuffix("_quick")
        obj["_quick"], obj["_file"] = name.endswith("_quick"), p.name
        rank = (not obj["_quick"], str(obj.get("measured", "")))
        if key not in best or rank > (not best[key]["_quick"], str(best[key].get("measured", ""))):
            best[key] = obj
    return best


# ---------------------------------------------------------------------------- report
def _f(x: Any, fmt: str = ".1f") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *["| " + " | ".join(r) + " |" for r in rows]]


def _title(obj: dict[str, Any], what: str) -> str:
    m = obj.get("machine", {})
    return (
        f"## {what}{' (quick)' if obj.get('_quick') else ''}\n\n`{obj['_file']}`, measured {obj.get('measured', '?')}"
        f" on {m.get('logical_cores', '?')} cores ({m.get('cpu', '?')}), load average "
        f"{', '.join(map(str, m.get('load_average_1_5_15', [])))}\n"
    )


def _met(ok: bool | None) -> str:
    return "**met**" if ok else ("not met" if ok is not None else "n/a")


def section_train(obj: dict[str, Any], plots: Path, out: list[str]) -> None:
    res, ceil = obj.get("results", {}), obj.get("ceiling", {})
    out.append(_title(obj, "Update speed (train)"))
    rows = [
        [
            n,
            f"{_f(r['tokens_per_s']['median'], '.0f')} (±{_f(100 * r['tokens_per_s']['spread'], '.0f')}%)",
            f"{_f(r.get('speed_vs_peft'), '.2f')}x",
            _f(r["peak_rss_mib"]["median"], ".0f"),
            f"{_f(r.get('rss_vs_peft'), '.2f')}x",
            f"{_f(100 * r.get('share_of_ceiling', 0), '.0f')}%",
        ]
        for n, r in res.items()
    ]
    out += _table(["config", "tokens/s (spread)", "vs PEFT", "peak RSS MiB", "vs PEFT", "of fp32 ceiling"], rows)
    from benchmarks.train_speed import device_targets

    met = device_targets(res)  # per device-backend configuration
    peft = next((r["tokens_per_s"]["median"] for n, r in res.items() if n.startswith("peft")), None)
    ok = any(met.values()) if met else None
    out.append(
        f"\nTarget: {obj.get('target', 'best device backend >= 1.4x PEFT tokens/s and <= 0.3x its RSS')}: {_met(ok)}. "
        f"fp32 matmul {_f(ceil.get('matmul_gflops'), '.0f')} GFLOP/s -> ceiling {_f(ceil.get('ceiling_tokens_per_s'), '.0f')} tokens/s"
        + (
            f" ({ceil['ceiling_tokens_per_s'] / peft:.2f}x PEFT: a step doing nothing but its matmuls)"
            if ceil.get("ceiling_tokens_per_s") and peft
            else ""
        )
        + (
            f"; int8 matmul (ORT MatMulInteger) {_f(ceil['int8_matmul_gops'], '.0f')} GOP/s"
            if ceil.get("int8_matmul_gops")
            else ""
        )
        + ".\n"
    )
    free = [n for n, r in res.items() if r.get("torch_imported") is False]
    if free:
        out.append("Run without torch in the process, as on a device: " + "; ".join(f"`{n}`" for n in free) + ".\n")
    curves = {n: r["losses_first_run"] for n, r in res.items() if r.get("losses_first_run")}
    if curves and _plot_lines(curves, "loss curves per backend (first run)", "step", "loss", plots / "train_loss.png"):
        out.append("![loss curves](train_loss.png)\n")


def section_suggest(obj: dict[str, Any], plots: Path, out: list[str]) -> None:
    res = obj.get("results", {})
    out.append(_title(obj, "Suggestion latency per keystroke (suggest)"))
    st = obj.get("settings", {})
    out.append(
        f"{st.get('keystrokes', '?')} keystrokes x {st.get('repetitions', '?')} repetitions, model {st.get('model', '?')}, "
        f"adapter: {st.get('adapter', '?')}.\n"
    )
    rows = []
    for n, r in res.items():
        lat, pr = r["latency_ms"], r.get("profile", {})
        rows.append(
            [
                n,
                _f(lat["p50"]),
                _f(lat["p95"]),
                _f(lat["p99"]),
                _f(r["peak_rss_mib"]["median"], ".0f"),
                f"{_f(100 * r['top3_equal_to_torch'], '.0f')}%" if "top3_equal_to_torch" in r else "-",
                f"{_f(100 * r['top3_same_words_any_order'], '.0f')}%" if "top3_same_words_any_order" in r else "-",
                _f(pr.get("forwards_per_keystroke_mean"), ".2f"),
                _f(pr.get("model_ms_per_forward")),
                _f(pr.get("overhead_ms_mean")),
            ]
        )
    out += _table(
        [
            "config",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "peak RSS MiB",
            "top-3 = torch",
            "same 3 words",
            "forwards/keystroke",
            "ms/forward",
            "Python ms/keystroke",
        ],
        rows,
    )
    tm, best = obj.get("targets_met", {}), obj.get("best_backend")
    out.append(
        f"\nTargets, together on one configuration (the fastest whose top-3 equals torch's on >= 95% of "
        f"keystrokes: {best}): p50 <= 10 ms: {_met(tm.get('p50_le_10ms'))}; "
        f"top-3 agreement >= 95%: {_met(tm.get('top3_agreement_ge_95'))}.\n"
    )
    kb = obj.get("keyboard") or {}
    if kb:
        out.append(
            "\nThe keyboard, judged by the user's text (a simulated user types in real time and taps a "
            "suggestion when it is the word; suggestions before every keystroke):\n"
        )
        krows = []
        for n, r in kb.items():
            u, lat = r.get("user", {}), r["latency_ms"]
            krows.append(
                [
                    n.removeprefix("keyboard "),
                    _f(lat["p50"]),
                    _f(lat["p99"]),
                    _f(100 * u.get("next_word_top1", float("nan"))),
                    _f(100 * u.get("next_word_top3", float("nan"))),
                    _f(100 * u.get("keystroke_savings", float("nan"))),
                    _f(100 * r.get("complete_share", float("nan")), ".0f"),
                    _f(100 * r["top3_equal_to_torch"], ".0f") if r.get("top3_equal_to_torch") is not None else "-",
                ]
            )
        out += _table(
            ["configuration", "p50 ms", "p99 ms", "top-1 %", "top-3 %", "KSR %", "complete %", "top-3 = torch %"], krows
        )
        kt = obj.get("keyboard_targets") or {}
        if kt:
            out.append(
                f"\nTargets (q4_0 GGUF, 16 ms deadline, 100 ms typing gap): p99 {_f(kt.get('p99_ms'))} ms <= 16: "
                f"{_met(kt.get('p99_le_16ms'))}; keystroke savings {_f(kt.get('ksr_points_below_unbounded'), '+.2f')} "
                f"points below the unbounded search (<= 1): {_met(kt.get('ksr_within_1pt_of_unbounded'))}."
            )
            ni = kt.get("no_idle")
            if ni:
                out.append(
                    f"With no idle time (a keystroke every 16 ms): p99 {_f(ni.get('p99_ms'))} ms, keystroke savings "
                    f"{_f(ni.get('ksr_points_below_unbounded'), '+.2f')} points below unbounded, "
                    f"{_f(100 * ni.get('complete_share', float('nan')), '.0f')}% of answers complete.\n"
                )
    dists = {n: r["ms_first_rep"] for n, r in res.items() if r.get("ms_first_rep")}
    if dists and _plot_box(
        dists, "per-keystroke latency (first repetition)", "ms (log scale)", plots / "suggest_latency.png"
    ):
        out.append("![latency distributions](suggest_latency.png)\n")


def section_export(obj: dict[str, Any], plots: Path, out: list[str]) -> None:
    res = obj.get("results", {})
    out.append(_title(obj, "Export time and bundle size (export)"))
    out.append(f"base {obj.get('settings', {}).get('base', '?')} at {obj.get('settings', {}).get('quant', '?')}.\n")
    rows = [
        [
            t,
            _f(r["target_export_seconds"]["median"]),
            _f(r["wall_seconds"]["median"]),
            _f(r["target_bytes"] / 2**20),
            f"{_f(r.get('bytes_vs_torch'), '.2f')}x",
            _f(r["peak_rss_mib"]["median"], ".0f"),
        ]
        for t, r in res.items()
    ]
    out += _table(["target", "target export s", "whole export s", "target MiB", "vs torch", "peak RSS MiB"], rows)
    for t, why in obj.get("failed", {}).items():
        out.append(f"\n- {t}: **failed**: {why}")
    out.append("")


def _ba(b: dict, a: dict, key: str) -> str:
    return f"{_f(100 * b.get(key, float('nan')))} -> {_f(100 * a.get(key, float('nan')))}"


def section_quality(obj: dict[str, Any], plots: Path, out: list[str]) -> None:
    out.append(_title(obj, "Personalization quality (quality)"))
    rows, before_after = [], {}
    if isinstance(obj.get("per_sender"), list):  # benchmarks.personalize: rows with base / personalized
        out.append(
            f"Per sender: one Personalizer update of at most {_f(obj.get('update_budget_seconds'), '.0f')} s "
            f"(training on the {obj.get('quant', '?')} base, suggestions served by {obj.get('serving_backend', '?')}); "
            f"next-word top-3 on the sender's later messages, from the base model, LoRA alone, the sender's word "
            f"counts mixed in alone (weight {obj.get('word_weight', '?')}), and both (what the Personalizer serves). "
            f"The n-gram columns are a word trigram keyboard model alone, built from other people's messages, "
            f"then given the same sender text.\n"
        )
        top3 = "next_word_top3"
        for r in obj["per_sender"]:
            b, ng = r.get("base", {}), r.get("ngram", {})
            both, lora, words = r.get("personalized", {}), r.get("lora", {}), r.get("words", {})
            rows.append(
                [
                    str(r.get("sender", "?"))[:8],
                    str(r.get("steps", "-")),
                    "yes" if r.get("accepted") else "no",
                    _f(100 * b.get(top3, float("nan"))),
                    _f(100 * lora.get(top3, float("nan"))),
                    _f(100 * words.get(top3, float("nan"))),
                    _f(100 * both.get(top3, float("nan"))),
                    _ba(b, both, "keystroke_savings"),
                    _ba(ng.get("base", {}), ng.get("personalized", {}), top3) if ng else "-",
                    f"{_f(r.get('others_ppl_change_pct'), '+.1f')}%",
                ]
            )
            before_after[str(r.get("sender", "?"))[:8]] = (b.get(top3, 0), both.get(top3, 0))
        m = obj.get("mean", {})
        pts = lambda key: f"{_f(m.get(key), '+.2f')}"  # noqa: E731
        rows.append(
            [
                "**mean gain (points)**",
                "",
                f"{obj.get('accepted', '?')}/{obj.get('senders', '?')}",
                "",
                pts("lora_top3_gain_points"),
                pts("words_top3_gain_points"),
                f"**{pts('top3_gain_points')}**",
                pts("ksr_gain_points"),
                pts("ngram_top3_gain_points"),
                f"{_f(m.get('others_ppl_change_pct'), '+.1f')}%",
            ]
        )
        out += _table(
            [
                "sender",
                "steps",
                "accepted",
                "base top-3 %",
                "LoRA",
                "word counts",
                "both",
                "keystroke savings %",
                "n-gram top-3 %",
                "others' ppl",
            ],
            rows,
        )
        t = obj.get("targets", {})
        secs = [r.get("update_seconds", 0) for r in obj["per_sender"]]
        out.append(
            f"\nUpdates took {_f(min(secs), '.1f')}-{_f(max(secs), '.1f')} s (budget "
            f"{_f(obj.get('update_budget_seconds'), '.0f')} s, the quality gate's evaluations included)."
        )
        out.append(
            f"\nTargets (issue 5): mean top-3 gain >= +5 points (both): {_met(t.get('top3_gain_points>=5'))} "
            f"(LoRA alone: {_met(t.get('lora_top3_gain_points>=5'))}); other people's perplexity within +5%: "
            f"{_met(t.get('others_ppl_change_pct<=5'))}."
        )
    else:
        out += _generic(obj)
    if before_after and _plot_before_after(before_after, plots / "quality_before_after.png"):
        out.append("\n![quality before/after](quality_before_after.png)")
    out.append("")


def section_forward_only(obj: dict[str, Any], plots: Path, out: list[str]) -> None:
    out.append(_title(obj, "Forward-only (SPSA) updates against backprop (train)"))
    st = obj.get("settings", {})
    out.append(
        f"Held-out loss over update time per sender; backprop gets {_f(st.get('backprop_seconds'), '.0f')} s, forward-only "
        f"{_f(st.get('forward_only_seconds'), '.0f')} s (4x). Peak RSS is the update phase's; it is compared with "
        f"inference of the same graph on the same batches in the same process (the 'inference' rows are separate "
        f"processes, for scale).\n"
    )
    rows, curves = [], {}
    for sender, per in obj.get("results", {}).items():
        for name, r in per.items():
            c = r.get("curve") if isinstance(r, dict) else None
            if name == "summary" or not c:
                continue
            rows.append(
                [
                    sender[:8],
                    name,
                    f"{_f(c[0]['loss'], '.3f')} -> {_f(c[-1]['loss'], '.3f')}",
                    f"{_f(100 * c[0]['top3'])} -> {_f(100 * c[-1]['top3'])}",
                    _f(r.get("seconds"), ".0f"),
                    str(r.get("steps", "-")),
                    _f(r.get("phase_peak_rss_mib"), ".0f"),
                ]
            )
            if len(c) > 1:
                curves[f"{sender[:8]} {name}"] = ([p["seconds"] for p in c], [p["loss"] for p in c])
        sm = per.get("summary", {})
        if sm:
            rows.append(
                [
                    sender[:8],
                    "**forward-only vs**",
                    f"{_f(100 * (sm.get('forward_only_share_of_backprop_gain') or 0), '.0f')}% of backprop's loss gain",
                    "",
                    "",
                    "",
                    f"{_f(sm.get('forward_only_peak_vs_inference'), '.2f')}x inference",
                ]
            )
    out += _table(["sender", "config", "held-out loss", "top-3 token %", "update s", "steps", "peak RSS MiB"], rows)
    t = obj.get("targets_met", {})
    if t:
        out.append(
            f"\nTargets (issue 6): held-out loss reduced on every sender: {_met(t.get('loss_reduced_every_sender'))}; "
            f"peak <= 1.1x inference: {_met(t.get('peak_le_1_1x_inference'))}."
        )
    if curves and _plot_lines(curves, "held-out loss over update time", "seconds", "loss", plots / "forward_only.png"):
        out.append("\n![forward-only vs backprop](forward_only.png)")
    out.append("")


def section_time_to_quality(obj: dict[str, Any], plots: Path, out: list[str]) -> None:
    out.append(_title(obj, "Time to quality: split updates against PEFT (train)"))
    st, summ = obj.get("settings", {}), obj.get("summary", {})
    budget = st.get("budget_seconds")
    out.append(
        f"{len(st.get('senders', []))} senders, {st.get('train_rows', '?')} most recent training rows of "
        f"{st.get('seq_len', '?')} tokens each, {st.get('test_messages', '?')} held-out messages; batch "
        f"{st.get('batch', '?')}, AdamW lr {st.get('train_config', {}).get('lr', '?')} for every method. Target: the PEFT "
        f"baseline's held-out loss at {_f(budget, '.0f')} s of training (evaluation and loading off the clock); the "
        f"split runs (LoRA on layers >= {st.get('split_layer', '?')}, prefix outputs cached) stop when they reach it. "
        f"Next-word top-3 served by llama.cpp with each run's adapter, at most {st.get('next_word_max_words', '?')} "
        f"words per sender.\n"
    )
    rows, curves = [], {}
    for m, s in summ.items():
        ttl, per = s.get("time_to_mean_target_s"), s.get("time_to_target_per_sender_s", {})
        rows.append(
            [
                m,
                f"{_f(ttl)} ({_f(s.get('time_to_mean_target_vs_budget'), '.2f')}x)"
                if ttl is not None
                else "not reached",
                ", ".join(_f(t) for t in per.values()),
                f"{s.get('senders_reached', '?')}/{len(per)}",
                _f(s.get("final_loss"), ".3f"),
                _f(100 * s["next_word_top3"]) if s.get("next_word_top3") is not None else "-",
                _f(s.get("seconds_per_step"), ".2f"),
                _f(s.get("prefix_ms_per_row"), ".0f"),
                _f(s.get("peak_rss_mib"), ".0f"),
            ]
        )
        c = s.get("mean_curve", [])
        if len(c) > 1:
            curves[m] = ([p["seconds"] for p in c], [p["loss"] for p in c])
    out += _table(
        [
            "method",
            "s to target, mean curve (vs budget)",
            "per sender s",
            "reached",
            "final loss",
            "next-word top-3 %",
            "s/step",
            "prefix ms/row",
            "peak RSS MiB",
        ],
        rows,
    )
    if obj.get("base_model_next_word_top3") is not None:
        out.append(
            f"\nThe base model without an adapter: next-word top-3 {_f(100 * obj['base_model_next_word_top3'])}%."
        )
    tol = st.get("next_word_tolerance_points")
    for key, t in obj.get("targets_met", {}).items():
        out.append(
            f"\nTarget, {key.replace('_', ' ')}: baseline's loss within 1/2 the budget (mean over senders): "
            f"{_met(t.get('mean_le_half_budget'))} (1/3: {_met(t.get('mean_le_third_budget'))}; every sender 1/2: "
            f"{_met(t.get('every_sender_le_half_budget'))}); next-word top-3 no worse than the baseline's "
            f"(-{_f(tol)} points allowed): {_met(t.get('next_word_top3_no_worse'))}; together: {_met(t.get('met'))}."
        )
    base = summ.get("peft eager (baseline)", {})
    if curves and base.get("mean_target_loss") is not None and budget:
        curves["baseline's loss at the budget"] = ([0.0, budget], [base["mean_target_loss"]] * 2)
    if curves and _plot_lines(
        curves, "mean held-out loss over training time", "seconds of training", "loss", plots / "time_to_quality.png"
    ):
        out.append("\n![time to quality](time_to_quality.png)")
    out.append("")


def section_memory(found: dict[str, dict[str, Any]], out: list[str]) -> None:
    rows = []
    for key, what in (("train_speed", "update"), ("suggest_latency", "serving")):
        for n, r in found.get(key, {}).get("results", {}).items():
            if isinstance(r.get("peak_rss_mib"), dict):
                rows.append([what, n, _f(r["peak_rss_mib"]["median"], ".0f")])
    if not rows:
        return
    out.append("## Memory (peak RSS, own process)\n")
    out += _table(["phase", "config", "peak RSS MiB"], rows)
    out.append("")


def _generic(obj: dict[str, Any]) -> list[str]:
    """A table of the scalar fields of ``results``, nested dicts flattened into rows named by their
    path (for benchmarks without a dedicated section)."""
    res = obj.get("results")
    if not isinstance(res, dict) or not res:
        return ["(no `results` table in this file)"]
    rows: list[tuple[str, dict[str, Any]]] = []

    def walk(name: str, d: dict[str, Any]) -> None:
        scalars = {k: v for k, v in d.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        if scalars and name:
            rows.append((name, scalars))
        for k, v in d.items():
            if isinstance(v, dict) and len(rows) < 24:
                walk(f"{name} / {k}" if name and len(d) > 1 else str(k), v)

    walk("", res)
    if not rows:
        return ["(no scalar results in this file)"]
    cols: list[str] = []
    for _, sc in rows:
        cols += [k for k in sc if k not in cols]
    cols = cols[:8]
    return _table(
        ["config", *cols],
        [[n, *[_f(sc.get(c), ".4g") if not isinstance(sc.get(c), str) else sc[c] for c in cols]] for n, sc in rows],
    )


def section_gpu_train(obj: dict[str, Any], plots: Path, out: list[str]) -> None:
    st = obj.get("settings", {})
    out.append(_title(obj, f"GPU training on {st.get('gpu') or st.get('device', '?')}"))
    out.append(
        f"{st.get('model', '?')}, LoRA r={st.get('lora_r')} on {'/'.join(st.get('target_modules', []))}, "
        f"{st.get('seq_len')}-token rows, bf16 compute, {st.get('repetitions')} interleaved repetitions x "
        f"{st.get('timed_steps')} timed steps; each configuration in its own process.\n"
    )
    rows = []
    for name, per in obj.get("results", {}).items():
        if "error" in per:
            rows.append([name, "failed", per["error"][:80], "", "", "", ""])
            continue
        for batch, r in per.items():
            share = r.get("share_of_spec_bf16_peak") or r.get("share_of_measured_bf16_matmul")
            rows.append(
                [
                    name,
                    batch,
                    _f(r.get("step_ms")),
                    _f(r["tokens_per_s"]["median"], ".0f"),
                    f"{_f(r.get('speed_vs_peft_bnb'), '.2f')}x",
                    _f(r["peak_mib"]["median"], ".0f"),
                    f"{_f(100 * share if share else None, '.2f')}%",
                ]
            )
    out += _table(["config", "batch", "step ms", "tokens/s", "vs peft+bnb", "peak GPU MiB", "of bf16 peak"], rows)
    for batch, t in obj.get("targets", {}).items():
        out.append(
            f"\nTarget at {batch}: >= {t['needed_speedup']:.0f}x peft+bnb: {t['speedup']:.2f}x "
            f"({t['best_config']}), {_met(t['met'])}; its losses within "
            f"{100 * t['loss_max_rel_diff']:.3f}% of peft+bnb's."
        )
    out.append("")


def section_loop_memory(obj: dict[str, Any], plots: Path, out: list[str]) -> None:
    """The whole Personalizer loop's peak RSS per configuration, and where the device loop's goes."""
    out.append(_title(obj, "Whole-loop memory (Personalizer: store, gated update, serving)"))
    rows = []
    for kind, r in obj.get("runs", {}).items():
        rows.append(
            [
                kind,
                _f(r.get("peak_rss_mib"), ".0f"),
                str(r.get("steps", "-")),
                str(r.get("accepted", "-")),
                _f(r.get("suggest_ms_p50")),
                "yes" if r.get("torch_imported") else "no",
            ]
        )
    out += _table(["loop", "peak RSS MiB", "update steps", "accepted", "suggest p50 ms", "torch"], rows)
    for name, ok in obj.get("targets", {}).items():
        out.append(f"- {name}: {_met(ok)}")
    stages = obj.get("runs", {}).get("device", {}).get("rss_mib_by_stage")
    if stages:
        out.append("- device loop RSS by stage (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()))
    out.append("")


def section_fleet(obj: dict[str, Any], plots: Path, out: list[str]) -> None:
    """Fleet learning: held-out metrics of base / global / DP global / global + personal, per-round
    held-out loss, upload per device, DP guarantee, and the targets."""
    out.append(_title(obj, "Fleet learning: a global adapter from simulated devices, then personal adapters"))
    dp = obj.get("dp") or {}
    out.append(
        f"{obj.get('clients', '?')} simulated devices (chitchat senders), {obj.get('clients_per_round', '?')} per round, "
        f"{obj.get('rounds', '?')} rounds of {obj.get('steps_per_client_round', '?')} local steps on the device path; "
        f"{obj.get('test_senders', '?')} held-out senders never seen in training, "
        f"{obj.get('keystroke_messages_per_sender', '?')} of their later messages typed each; personal updates of "
        f"{_f(obj.get('personal_seconds'), '.0f')} s on top of the global adapter (no DP). DP: "
        + (
            f"ε = {_f(dp.get('epsilon'), '.2f')} at δ = {dp.get('delta')}, noise multiplier "
            f"{_f(dp.get('noise_multiplier'), '.3f')}, clip {dp.get('clip_norm')}, sampling rate "
            f"{_f(dp.get('sampling_rate'), '.2f')} ({dp.get('accountant', '?')}).\n"
            if dp
            else "none.\n"
        )
    )
    rows = [
        [c, _f(100 * m["next_word_top3"]), _f(100 * m["keystroke_savings"])] for c, m in obj.get("mean", {}).items()
    ]
    out += _table(["model", "next-word top-3 %", "keystroke savings %"], rows)
    g = obj.get("gain_points", {})
    out.append(
        f"\nDP global over base: {_f(g.get('global_dp_over_base'), '+.2f')} points; global + personal over global: "
        f"{_f(g.get('personal_over_global'), '+.2f')} points."
    )
    curves = {}
    for name, r in obj.get("runs", {}).items():
        recs = [x for x in r.get("per_round") or [] if "eval_loss" in x]
        if len(recs) > 1:
            curves[name] = ([x["round"] for x in recs], [x["eval_loss"] for x in recs])
        ups = [x.get("upload_bytes_per_client") for x in r.get("per_round") or [] if x.get("upload_bytes_per_client")]
        rej = r.get("rejected") or {}
        out.append(
            f"- {name}: upload per device per round {_f(ups[0] / 2**20 if ups else None, '.2f')} MiB; rejected updates "
            f"{sum(rej.values()) if rej else 0}; {_f(r.get('wall_seconds'), '.0f')} s"
        )
    for name, ok in obj.get("targets", {}).items():
        out.append(f"- target {name}: {_met(ok)}")
    if curves and _plot_lines(curves, "held-out loss per round", "round", "loss", plots / "fleet.png"):
        out.append("\n![fleet](fleet.png)")
    out.append("")


def section_taps(obj: dict[str, Any], plots: Path, out: list[str]) -> None:
    """Learning from taps: per simulated day and arm, acceptance and keystroke savings while typing,
    then the held-out next-word accuracy after the day's update."""
    out.append(_title(obj, "Learning from taps (taps)"))
    out.append(
        f"{len(obj.get('per_sender', []))} senders, updates on {obj.get('training_backend', '?')}, suggestions from "
        f"{obj.get('serving_backend', '?')}; arms: text only vs text + taps (DPO, weight {obj.get('preference_weight', '?')}).\n"
    )
    rows = []
    for e in obj.get("per_day", []):
        for arm in ("text", "taps"):
            a = e.get(arm, {})
            rows.append(
                [
                    str(e.get("day")),
                    arm,
                    _f(100 * a.get("typing_top1_acceptance", float("nan"))),
                    _f(100 * a.get("typing_keystroke_savings", float("nan"))),
                    _f(100 * a.get("heldout_top1", float("nan"))),
                    _f(100 * a.get("heldout_top3", float("nan"))),
                    str(a.get("accepted", "-")),
                    _f(a.get("preference_pairs"), ".0f"),
                ]
            )
    out += _table(
        ["day", "arm", "top-1 acceptance %", "KSR %", "held-out top-1 %", "held-out top-3 %", "accepted", "pairs"], rows
    )
    out.append(
        f"\nHeld-out top-1 gain of taps over text after the last day: {_f(obj.get('heldout_top1_gain_points_last_day'), '+.2f')} points."
    )
    for name, ok in obj.get("targets", {}).items():
        out.append(f"- target {name}: {_met(ok)}")
    out.append("")


def section_families(obj: dict[str, Any], plots: Path, out: list[str]) -> None:
    """Model families side by side: each base's update step, keystroke latency and quality, peak
    memory and personalization, with Gemma's ratios to SmolLM2 and the targets."""
    out.append(_title(obj, "Model families: Gemma 3 270M next to SmolLM2 (families)"))
    rows = []
    for name, r in obj.get("bases", {}).items():
        pers = obj.get("personalization", {}).get(name, {}).get("mean", {})
        rows.append(
            [
                name,
                r.get("quant", "?"),
                str(r.get("vocab_size")),
                f"{r.get('train_backend')} / {r.get('serve_backend')}",
                _f(r.get("update_step_s", {}).get("median"), ".2f"),
                _f(r.get("keystroke_ms", {}).get("median")),
                _f(r.get("keystroke_ms", {}).get("p99")),
                _f(100 * r.get("keystroke_savings", float("nan"))),
                _f(r.get("memory", {}).get("peak_rss_mib"), ".0f"),
                _f(pers.get("top3_gain_points"), "+.2f"),
            ]
        )
    out += _table(
        [
            "base",
            "quant",
            "vocab",
            "update / serve",
            "step s (p50)",
            "keystroke ms p50",
            "p99",
            "KSR %",
            "update peak MiB",
            "top-3 gain (pers.)",
        ],
        rows,
    )
    ratios = obj.get("ratios_gemma_over_smollm2", {})
    out.append("\nGemma / SmolLM2: " + ", ".join(f"{k} {_f(v, '.2f')}x" for k, v in ratios.items()) + ".")
    for name, ok in obj.get("targets", {}).items():
        out.append(f"- target {name}: {_met(ok)}")
    out.append("")


SECTIONS = {
    "families": section_families,
    "fleet": section_fleet,
    "taps": section_taps,
    "train_speed": section_train,
    "suggest_latency": section_suggest,
    "export_bench": section_export,
    "personalize": section_quality,
    "forward_only": section_forward_only,
    "time_to_quality": section_time_to_quality,
    "loop_memory": section_loop_memory,
}


def write_report(results_dir: Path, out_dir: Path | None = None) -> Path:
    """Write ``summary.md`` and PNG plots for the results in ``results_dir`` into ``out_dir``
    (default ``results_dir/report``); returns the summary's path."""
    from pocketpeft.fsutil import write_bytes_atomic

    results_dir = Path(results_dir)
    out_dir = Path(out_dir) if out_dir else results_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    found = collect(results_dir)
    lines = [
        "# pocketpeft benchmarks\n",
        "Every speed figure is measured side by side with its baseline in the same run on the same machine; "
        "reproduce with `pocketpeft bench --suite all` (add `--quick` for the few-minute sizes).\n",
    ]
    if not found:
        lines.append("No results yet: run `pocketpeft bench`.\n")
    order = [k for k in SECTIONS if k in found] + sorted(k for k in found if k not in SECTIONS)
    for key in order:
        obj = found[key]
        if key in SECTIONS:
            SECTIONS[key](obj, out_dir, lines)
        elif key.startswith("gpu_train_") and not obj.get("settings", {}).get("smoke"):
            section_gpu_train(obj, out_dir, lines)
        else:
            lines.append(_title(obj, key.replace("_", " ")))
            lines += _generic(obj)
            lines.append("")
    section_memory(found, lines)
    path = out_dir / "summary.md"
    write_bytes_atomic(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path


# ---------------------------------------------------------------------------- plots
def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def _save(fig, plt, path: Path) -> bool:
    import io

    from pocketpeft.fsutil import write_bytes_atomic

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
    return True


def _plot_lines(curves: dict[str, Any], title: str, xlabel: str, ylabel: str, path: Path) -> bool:
    """One line per curve: a list of y values (x = 1, 2, ...) or an (xs, ys) pair."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for n, c in curves.items():
        xs, ys = c if isinstance(c, tuple) else (range(1, len(c) + 1), c)
        ax.plot(xs, ys, marker="o", label=n)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def _plot_box(dists: dict[str, list[float]], title: str, ylabel: str, path: Path) -> bool:
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = list(dists)
    ax.boxplot([[max(x, 1e-3) for x in dists[n]] for n in names], whis=(5, 95), showfliers=True)
    ax.set_xticks(range(1, len(names) + 1), [n.replace(" (", "\n(") for n in names], fontsize=7)
    ax.set_yscale("log")
    ax.axhline(10, color="red", linestyle="--", linewidth=1, label="10 ms target")
    ax.set(title=title, ylabel=ylabel)
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def _plot_before_after(vals: dict[str, tuple[float, float]], path: Path) -> bool:
    plt = _pyplot()
    if plt is None:
        return False
    import numpy as np

    names = list(vals)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(names)), 4))
    ax.bar(x - 0.2, [100 * vals[n][0] for n in names], 0.4, label="before")
    ax.bar(x + 0.2, [100 * vals[n][1] for n in names], 0.4, label="after")
    ax.set_xticks(x, names, rotation=60, fontsize=7)
    ax.set(title="next-word top-3 per sender, before/after personalization", ylabel="%")
    ax.legend()
    return _save(fig, plt, path)


# ---------------------------------------------------------------------------- entry
def bench(
    suite: str = "all",
    quick: bool = False,
    out: Path | None = None,
    base: str | None = None,
    targets: str | None = None,
    run: bool = True,
    log=print,
) -> dict[str, Any]:
    """Run ``suite`` (a name or ``all``), then write the report. Results go to ``out``
    (default benchmarks/results), the report to ``out/report``; ``base`` and ``targets`` (export
    targets) go to the modules that take them. Returns a summary dict. Raises
    :class:`ConfigError` for an unknown suite."""
    from pocketpeft.errors import ConfigError

    suites = ALL if suite == "all" else [suite]
    if any(s not in SUITES for s in suites):
        raise ConfigError(f"unknown benchmark suite {suite!r}; expected one of: {', '.join(ALL)}, all")
    out = Path(out) if out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    ran = run_suites(suites, quick, out, base, targets, log) if run else []
    summary = write_report(out)
    return {
        "suites": suites,
        "quick": quick,
        "modules": ran,
        "results_dir": str(out),
        "results": sorted(o["_file"] for o in collect(out).values()),
        "report": str(summary),
        "plots": sorted(p.name for p in summary.parent.glob("*.png")),
        "failed": [m["module"] for m in ran if m["status"] == "failed"],
    }


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.report``: progress on stderr, the summary dict on stdout (or, with
    ``--json-out FILE``, written to FILE: how ``pocketpeft bench`` runs it); exit status 1 when a
    module failed."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="all", choices=[*ALL, "all"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--base", default=None, help="base model for the suites that take one (default smollm2)")
    ap.add_argument(
        "--targets", default=None, help="export targets for the export suite (default: every registered one)"
    )
    ap.add_argument("--report-only", action="store_true", help="only rebuild the report from existing results")
    ap.add_argument("--json-out", type=Path, default=None, help="write the summary as JSON to this file")
    args = ap.parse_args(argv)
    res = bench(
        args.suite,
        args.quick,
        args.out,
        args.base,
        args.targets,
        run=not args.report_only,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    if args.json_out is not None:
        from pocketpeft.fsutil import write_bytes_atomic

        write_bytes_atomic(args.json_out, (json.dumps(res, default=str) + "\n").encode("utf-8"))
    else:
        print(json.dumps(res, indent=2, default=str))
    sys.exit(1 if res["failed"] else 0)


if __name__ == "__main__":
    main()
