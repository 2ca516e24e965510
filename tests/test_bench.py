"""`pocketpeft bench`: the suite runs end to end and writes JSON and a report (smoke sizes, on the
tiny model; no timed assertions), the report renders what the results say, and the latency
workers measure what they claim (checked against the torch backend and llama.cpp)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_bench_export_suite_writes_json_and_report(tiny_hf_dir, tmp_path):
    import pocketpeft as pp

    out = tmp_path / "results"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pocketpeft.apps.cli",
            "bench",
            "--quick",
            "--suite",
            "export",
            "--base",
            str(tiny_hf_dir),
            "--targets",
            "gguf",
            "--out",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    obj = json.loads(p.stdout.strip().splitlines()[-1])
    assert obj["failed"] == [] and obj["suites"] == ["export"]
    assert [m["status"] for m in obj["modules"]] == ["ok"]
    res = json.loads((out / "export_bench_quick.json").read_text())
    assert set(res["results"]) == {"gguf"} and res["failed"] == {}
    assert res["machine"]["logical_cores"] >= 1 and "torch" in res["machine"]["versions"]
    # the sizes it reports are those of an export made independently here
    ref = pp.export(
        tiny_hf_dir,
        tmp_path / "ref",
        quant="q4_0",
        targets=["torch", "gguf"],
        lora=pp.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    gguf = res["results"]["gguf"]
    assert gguf["target_bytes"] == _dir_bytes(ref.root / "gguf") and gguf["target_export_seconds"]["median"] >= 0
    assert gguf["shared_bytes"] + gguf["target_bytes"] + _dir_bytes(ref.root / "torch") == gguf["bundle_bytes"]
    summary = Path(obj["report"])
    assert summary == out / "report" / "summary.md"
    text = summary.read_text()
    assert "## Export time and bundle size" in text and "| gguf |" in text
    assert "failed" not in text


def _write(out: Path, name: str, payload: dict, measured: str) -> None:
    from benchmarks.common import write_result

    path = write_result(name, payload, out)
    obj = json.loads(path.read_text())
    obj["measured"] = measured
    path.write_text(json.dumps(obj))


def _suggest_payload(p50s: dict[str, float], agree: float) -> dict:
    from benchmarks.suggest_latency import percentiles

    rng = np.random.default_rng(0)
    results = {}
    for name, p50 in p50s.items():
        ms = list(rng.lognormal(np.log(p50), 0.3, 50))
        r = {"latency_ms": percentiles(ms), "peak_rss_mib": {"median": 500.0}, "ms_first_rep": ms}
        if name.startswith("pocketpeft"):
            r["top3_equal_to_torch"] = 1.0 if name == "pocketpeft torch" else agree
        results[name] = r
    from benchmarks.suggest_latency import best_config

    best, met = best_config(results)
    return {
        "settings": {"keystrokes": 50, "repetitions": 1},
        "results": results,
        "best_backend": best,
        "targets_met": met,
    }


def test_suggestion_targets_hold_together_on_one_configuration():
    """The best configuration is the fastest one that agrees with torch (not the fastest one,
    judged against another's agreement); torch, the reference, is not a candidate."""
    from benchmarks.suggest_latency import best_config

    def res(p50, agree):
        return {"latency_ms": {"p50": p50}, "top3_equal_to_torch": agree}

    results = {
        "pocketpeft torch": res(300, 1.0),
        "pocketpeft llamacpp + prefetch": res(2.0, 0.78),
        "pocketpeft llamacpp, f32 GGUF": res(80, 0.99),
        "pocketpeft llamacpp, f32 GGUF + prefetch": res(3.0, 0.99),
    }
    assert best_config(results) == (
        "pocketpeft llamacpp, f32 GGUF + prefetch",
        {"p50_le_10ms": True, "top3_agreement_ge_95": True},
    )
    results["pocketpeft llamacpp, f32 GGUF + prefetch"] = res(30, 0.99)
    assert best_config(results)[1] == {"p50_le_10ms": False, "top3_agreement_ge_95": True}
    del results["pocketpeft llamacpp, f32 GGUF"], results["pocketpeft llamacpp, f32 GGUF + prefetch"]
    assert best_config(results) == (
        "pocketpeft llamacpp + prefetch",
        {"p50_le_10ms": True, "top3_agreement_ge_95": False},
    )


def test_update_targets_count_device_backends_only():
    from benchmarks.train_speed import device_targets

    res = {
        "peft+transformers eager f32": {"speed_vs_peft": 1.0, "rss_vs_peft": 1.0},
        "pocketpeft torch q4_0": {"speed_vs_peft": 1.6, "rss_vs_peft": 0.2},
        "pocketpeft onnxruntime q4_0": {"speed_vs_peft": 1.7, "rss_vs_peft": 0.55},
        "pocketpeft onnxruntime q4_0, 1-row micro-batches, int8 4-bit": {"speed_vs_peft": 1.41, "rss_vs_peft": 0.29},
    }
    assert device_targets(res) == {
        "pocketpeft onnxruntime q4_0": False,
        "pocketpeft onnxruntime q4_0, 1-row micro-batches, int8 4-bit": True,
    }


def test_report_renders_tables_plots_and_targets(tmp_path):
    import matplotlib.image

    from benchmarks.report import collect, write_report

    out = tmp_path / "results"
    # an older full run and a newer quick run: the full run is the measurement, so it is reported
    _write(
        out,
        "suggest_latency",
        _suggest_payload({"pocketpeft torch": 300.0, "pocketpeft llamacpp": 120.0, "transformers eager": 200.0}, 0.80),
        "2026-01-01T00:00:00+00:00",
    )
    _write(
        out,
        "suggest_latency_quick",
        _suggest_payload({"pocketpeft torch": 300.0, "pocketpeft llamacpp": 9.0}, 0.99),
        "2026-02-01T00:00:00+00:00",
    )
    _write(
        out,
        "train_speed_quick",
        {
            "results": {
                "peft+transformers eager f32": {
                    "tokens_per_s": {"median": 200.0, "spread": 0.1},
                    "speed_vs_peft": 1.0,
                    "peak_rss_mib": {"median": 2400.0},
                    "rss_vs_peft": 1.0,
                    "share_of_ceiling": 0.6,
                    "losses_first_run": [4.0, 3.5, 3.2],
                },
                "pocketpeft torch q4_0": {
                    "tokens_per_s": {"median": 300.0, "spread": 0.05},
                    "speed_vs_peft": 1.5,
                    "peak_rss_mib": {"median": 700.0},
                    "rss_vs_peft": 0.29,
                    "share_of_ceiling": 0.95,
                    "losses_first_run": [4.0, 3.4, 3.1],
                },
                "pocketpeft onnxruntime q4_0": {
                    "tokens_per_s": {"median": 290.0, "spread": 0.05},
                    "speed_vs_peft": 1.45,
                    "peak_rss_mib": {"median": 710.0},
                    "rss_vs_peft": 0.296,
                    "share_of_ceiling": 0.92,
                    "losses_first_run": [4.0, 3.4, 3.1],
                },
            },
            "ceiling": {"matmul_gflops": 170.0, "ceiling_tokens_per_s": 315.0},
        },
        "2026-02-01T00:00:00+00:00",
    )
    (out / "notes.json").write_text("[1, 2]")  # not a result: ignored
    found = collect(out)
    assert set(found) == {"suggest_latency", "train_speed"} and not found["suggest_latency"]["_quick"]
    assert found["train_speed"]["_quick"]  # only a quick run of it: that one

    summary = write_report(out)
    text = summary.read_text()
    assert "Suggestion latency per keystroke (suggest)\n" in text and "(suggest) (quick)" not in text
    row = next(line for line in text.splitlines() if line.startswith("| pocketpeft llamacpp |"))
    p50 = found["suggest_latency"]["results"]["pocketpeft llamacpp"]["latency_ms"]["p50"]
    assert row.split("|")[2].strip() == f"{p50:.1f}" and "80%" in row
    assert "keystrokes: pocketpeft llamacpp): p50 <= 10 ms: not met; top-3 agreement >= 95%: not met" in text
    assert "**met**" in text.split("## Update speed")[1].split("##")[0]  # onnxruntime: 1.45x speed, 0.296x RSS
    assert "| update | pocketpeft torch q4_0 | 700 |" in text and "| serving | transformers eager | 500 |" in text
    for png in ("suggest_latency.png", "train_loss.png"):
        img = matplotlib.image.imread(summary.parent / png)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_suite_runner_parses_answers_workers_writes_and_prints_a_table(tmp_path, capsys):
    from benchmarks.common import Suite, main

    class Toy(Suite):
        name, module = "toy", "benchmarks.toy"

        def add_arguments(self, ap):
            ap.add_argument("--n", type=int, default=2)

        def run(self, args):
            return {"results": {"a": {"x": args.n * 1.5}, "longer name": {"x": None}}}

        def worker(self, argv):
            return {"argv": argv}

        def table(self, payload, args):
            return [[k, r["x"]] for k, r in payload["results"].items()], [("config", ""), ("x", ".2f")]

        def summary(self, payload, args):
            return ["done"]

    path = main(Toy(), ["--quick", "--n", "3", "--out", str(tmp_path)])
    assert path == tmp_path / "toy_quick.json"
    obj = json.loads(path.read_text())
    assert obj["benchmark"] == "toy_quick" and obj["results"]["a"] == {"x": 4.5} and "machine" in obj
    lines = capsys.readouterr().out.splitlines()
    # first column left-aligned, the others right-aligned, each as wide as its widest cell (+2); None is "-"
    assert lines[1:4] == [f"{'config':<13}{'x':>6}", f"{'a':<13}{'4.50':>6}", f"{'longer name':<13}{'-':>6}"]
    assert lines[4:] == ["done", f"written to {path}"]
    assert main(Toy(), ["--worker", "p", "q"]) is None
    assert json.loads(capsys.readouterr().out) == {"argv": ["p", "q"]}


def test_bench_rejects_an_unknown_suite(tmp_path):
    from benchmarks.report import bench
    from pocketpeft.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown benchmark suite 'speed'.*train, suggest"):
        bench("speed", out=tmp_path)


@pytest.mark.slow  # ~1-2 min on 2 busy cores: three processes' worth of model loads and vocab tables
def test_latency_workers_against_torch_and_llamacpp(tiny_hf_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    import pocketpeft as pp
    from benchmarks.suggest_latency import (
        keystroke_prefixes,
        random_adapter,
        summarize_runs,
        worker_llama_raw,
        worker_session,
    )

    bundle = pp.export(
        tiny_hf_dir,
        tmp_path / "b",
        quant="q4_0",
        targets=["torch", "gguf"],
        lora=pp.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    adapter = random_adapter(bundle.root, tmp_path / "adapter", std=0.5)
    prefixes = keystroke_prefixes(["see you at  the game", "ok"])
    assert prefixes[:3] == ["", "s", "se"] and prefixes[19:] == ["", "o"] and len(prefixes) == 21

    torch_run = worker_session(str(bundle.root), "torch", str(adapter), prefixes)
    raw = worker_llama_raw(str(bundle.root), str(adapter), prefixes)
    assert len(torch_run["ms"]) == len(raw["ms"]) == len(prefixes)
    # model time is part of each keystroke's time, and only keystrokes that ran a forward have any
    for ms, model, fw in zip(torch_run["ms"], torch_run["model_ms"], torch_run["forwards"]):
        assert 0 <= model <= ms and (model > 0) == (fw > 0)
    # the session's suggestions are those of a fresh session with the same adapter
    sess = pp.runtime.open(bundle.root, backend="torch", adapter=adapter, need_train=False)
    assert torch_run["top3"] == [sess.suggest(p, 3) for p in prefixes]
    # raw llama.cpp (base GGUF + adapter converted to GGUF LoRA) predicts the torch backend's next
    # tokens: the adapter really is applied on both sides
    sep = sess.tokenizer.eos_id
    same = []
    for p, top in zip(prefixes, raw["top3_tokens"]):
        logits = sess.logits([sep, *sess.tokenizer.encode(p)])[-1]
        same.append(top[0] == int(np.argmax(logits)))
    assert np.mean(same) >= 0.9
    sess.reset_adapter()  # without the adapter the next tokens differ: it was applied, not ignored
    moved = [
        int(np.argmax(sess.logits([sep, *sess.tokenizer.encode(p)])[-1])) != t[0]
        for p, t in zip(prefixes, raw["top3_tokens"])
    ]
    assert any(moved)

    res = summarize_runs({"pocketpeft torch": [torch_run], "llama raw": [raw]}, prefixes)
    assert res["pocketpeft torch"]["top3_equal_to_torch"] == res["pocketpeft torch"]["top3_same_words_any_order"] == 1.0
    assert res["pocketpeft torch"]["latency_ms"]["p50"] == pytest.approx(float(np.median(torch_run["ms"])))
    assert "profile" not in res["llama raw"]


def test_gpu_train_smoke_runs_and_the_report_renders_it(tmp_path):
    """benchmarks.gpu_train --smoke (tiny model, CPU): every CPU configuration trains on the same
    rows with the same losses as peft + bitsandbytes; the report's GPU section renders a result."""
    from benchmarks.report import write_report

    out = tmp_path / "results"
    p = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_train", "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "gpu_train_smoke_cpu.json").read_text())
    assert set(res["results"]) == {"pocketpeft eager", "peft+bnb nf4", "peft bf16 base"}
    for batch in ("2", "4"):
        ours, base = res["results"]["pocketpeft eager"][batch], res["results"]["peft+bnb nf4"][batch]
        assert ours["tokens_per_s"]["median"] > 0 and len(ours["losses_first_run"]) == 2
        assert ours["loss_max_rel_diff_vs_peft_bnb"] < 1e-2, (ours["losses_first_run"], base["losses_first_run"])
    assert res["targets"] == {}  # the targets are stated at batch 8 and 64, which smoke does not run
    res["settings"]["smoke"], res["benchmark"] = False, "gpu_train_test_gpu"
    (out / "gpu_train_smoke_cpu.json").write_text(json.dumps(res))
    text = write_report(out, tmp_path / "report").read_text()
    assert "## GPU training on cpu" in text and "| pocketpeft eager | 2 |" in text


def _ttq_curve(points):
    return [{"seconds": t, "loss": loss, "top3": 0.4, "steps": i} for i, (t, loss) in enumerate(points)]


def _ttq_run(points, step_s, nw, **extra):
    curve = _ttq_curve(points)
    return {
        "curve": curve,
        "seconds": curve[-1]["seconds"],
        "steps": 10,
        "seconds_per_step": step_s,
        "peak_rss_mib": 900.0,
        "next_word": {"next_word_top3": nw, "words": 150},
        **extra,
    }


def _ttq_results():
    """Two senders: the baseline ends at 60 s; the split runs stop once they reach its loss."""
    from benchmarks.time_to_quality import BASELINE, COLD, TORCH, WARM, loss_at, time_to_loss

    results = {}
    for sender, shift in (("aaaaaaaa-1", 0.0), ("bbbbbbbb-2", 0.2)):
        base = _ttq_run([(0, 4.0 + shift), (30, 3.5 + shift), (60, 3.0 + shift)], 2.0, 0.40)
        per = {
            "target_loss": loss_at(base["curve"], 60.0),
            BASELINE: base,
            TORCH: _ttq_run([(0, 4.0 + shift), (30, 3.4 + shift), (60, 2.9 + shift)], 1.5, 0.41),
            COLD: _ttq_run(
                [(0, 4.0 + shift), (10, 3.5 + shift), (25, 3.0 + shift)],
                0.8,
                0.395,
                prefix_seconds=4.0,
                prefix_rows_computed=80,
            ),
            WARM: _ttq_run([(0, 4.0 + shift), (10, 3.2 + shift), (15, 3.0 + shift)], 0.5, 0.38),
        }
        for m in (BASELINE, TORCH, COLD, WARM):
            per[m]["time_to_target_s"] = time_to_loss(per[m]["curve"], per["target_loss"])
        results[sender] = per
    return results


def test_time_to_quality_interpolates_and_judges_the_targets():
    from benchmarks.time_to_quality import COLD, WARM, loss_at, mean_curve, summarize_runs, time_to_loss

    c = _ttq_curve([(0, 4.0), (10, 3.0), (20, 2.0)])
    assert loss_at(c, 5) == pytest.approx(3.5) and loss_at(c, 99) == 2.0 and loss_at(c, -1) == 4.0
    assert time_to_loss(c, 2.5) == pytest.approx(15.0) and time_to_loss(c, 4.5) == 0 and time_to_loss(c, 1.0) is None
    # a curve that stopped early counts with its last checkpoint on the mean's later times
    m = mean_curve([c, _ttq_curve([(0, 4.0), (10, 2.0)])])
    assert [p["seconds"] for p in m] == [0, 10, 20] and m[-1]["loss"] == pytest.approx(2.0)

    summary, met = summarize_runs(_ttq_results(), 60.0)
    # both senders reach the baseline's loss at 25 s (cold: > 20, <= 30) and 15 s (warm)
    assert summary[COLD]["time_to_mean_target_s"] == pytest.approx(25.0)
    assert summary[WARM]["time_to_mean_target_s"] == pytest.approx(15.0)
    assert summary[COLD]["prefix_ms_per_row"] == pytest.approx(50.0)
    assert met["split_cold"] == {
        "mean_le_half_budget": True,
        "mean_le_third_budget": False,
        "every_sender_le_half_budget": True,
        "every_sender_le_third_budget": False,
        "next_word_top3_no_worse": True,  # 0.5 points below the baseline: within the 1-point tolerance
        "met": True,
    }
    assert met["split_warm"]["mean_le_third_budget"] and met["split_warm"]["next_word_top3_no_worse"] is False
    assert met["split_warm"]["met"] is False


def test_report_renders_time_to_quality(tmp_path):
    import matplotlib.image

    from benchmarks.report import write_report
    from benchmarks.time_to_quality import summarize_runs

    out = tmp_path / "results"
    results = _ttq_results()
    summary, met = summarize_runs(results, 60.0)
    payload = {
        "settings": {"budget_seconds": 60.0, "senders": ["aaaaaaaa", "bbbbbbbb"], "next_word_tolerance_points": 1.0},
        "results": results,
        "summary": summary,
        "targets_met": met,
    }
    _write(out, "time_to_quality_quick", payload, "2026-02-01T00:00:00+00:00")
    text = write_report(out).read_text()
    section = text.split("## Time to quality")[1].split("\n## ")[0]
    assert "| split onnxruntime, cache warm | 15.0 (0.25x) | 15.0, 15.0 | 2/2 |" in section
    assert "Target, split cold: baseline's loss within 1/2 the budget (mean over senders): **met**" in section
    assert "next-word top-3 no worse than the baseline's (-1.0 points allowed): not met; together: not met" in section
    img = matplotlib.image.imread(out / "report" / "time_to_quality.png")
    assert img.ndim == 3 and img.shape[0] > 100


def test_time_to_quality_smoke_on_the_tiny_model(tiny_hf_dir, tmp_path):
    """benchmarks.time_to_quality end to end on the tiny model (split at its top layer): every
    method trains on the same rows in the same order, the split runs take prefix outputs as
    they should (cold: computed in the clock; warm: from the filled cache) without torch, and
    llama.cpp serves every adapter."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("onnxruntime")
    from benchmarks.time_to_quality import BASELINE, COLD, METHODS, TORCH, WARM

    out = tmp_path / "results"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.time_to_quality",
            "--quick",
            "--base",
            str(tiny_hf_dir),
            "--top",
            "1",
            "--seconds",
            "1",
            "--checkpoint-seconds",
            "0.5",
            "--train-rows",
            "16",
            "--test-messages",
            "4",
            "--words",
            "8",
            "--cache",
            str(tmp_path / "cache"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "time_to_quality_quick.json").read_text())
    assert res["settings"]["split_layer"] == 1 and set(res["targets_met"]) == {"split_cold", "split_warm"}
    (per,) = res["results"].values()
    runs = {m: per[m] for m in METHODS}
    for m, r in runs.items():
        assert r["steps"] >= 1 and len(r["curve"]) >= 2 and r["peak_rss_mib"] > 0, m
        assert r["next_word"]["serving_backend"] == "llamacpp" and r["next_word"]["words"] == 8, m
    # the same first batch from the same initial adapter (B = 0): the same first loss everywhere
    first = [r["losses"][0] for r in runs.values()]
    assert max(first) - min(first) < 1e-3 * first[0], first
    assert runs[BASELINE]["curve"][0]["loss"] == pytest.approx(runs[TORCH]["curve"][0]["loss"], rel=1e-4)
    cold, warm = runs[COLD], runs[WARM]
    assert not cold["torch_imported"] and not warm["torch_imported"]
    assert cold["prefix_rows_computed"] > 0 and cold["prefix_rows_cached"] == 0
    assert warm["prefix_rows_computed"] == 0 and warm["prefix_rows_cached"] > 0
    assert warm["fill_rows_computed"] == per["data"]["train_rows"] - cold["prefix_rows_computed"]


def _typist_run(ms: list[float], ksr: float, complete: bool) -> dict:
    return {
        "ms": ms,
        "complete": [complete] * len(ms),
        "forwards": [0] * len(ms),
        "visited": [["see", ["you", "the", "it"]], ["see y", ["you", "your", "yes"]]],
        "metrics": {"next_word_top1": 0.2, "next_word_top3": 0.4, "keystroke_savings": ksr, "words": 10, "chars": 50},
        "background_forwards": 30,
        "typing_gap_ms": 100.0,
        "deadline_ms": 16.0,
        "mode": "background",
        "load_seconds": 1.0,
        "peak_rss_mib": 300.0,
    }


def test_keyboard_and_taps_results_are_judged_against_their_targets(tmp_path):
    from benchmarks.report import write_report
    from benchmarks.suggest_latency import keyboard_targets, summarize_keyboard
    from benchmarks.taps import summarize

    runs = {
        "keyboard q4_0 GGUF: unbounded": [_typist_run([50.0] * 100, 0.500, True)],
        "keyboard q4_0 GGUF: deadline 16 ms, 100 ms gap": [_typist_run([2.0] * 95 + [17.0] * 5, 0.495, False)],
        "keyboard q4_0 GGUF: deadline 16 ms, no idle": [_typist_run([1.0] * 100, 0.30, False)],
    }
    kb = summarize_keyboard(runs, {"see": ["you", "the", "it"], "see y": ["your", "you", "yes"]})
    assert kb["keyboard q4_0 GGUF: unbounded"]["top3_equal_to_torch"] == 0.5  # the second bar's order differs
    kt = keyboard_targets(kb)
    assert not kt["p99_le_16ms"] and kt["ksr_within_1pt_of_unbounded"]  # 17 ms at p99; 0.5 points below
    assert (
        abs(kt["ksr_points_below_unbounded"] - 0.5) < 1e-9
        and abs(kt["no_idle"]["ksr_points_below_unbounded"] - 20) < 1e-9
    )
    payload = _suggest_payload({"pocketpeft torch": 300.0, "pocketpeft llamacpp": 9.0}, 0.99)
    _write(
        tmp_path, "suggest_latency", {**payload, "keyboard": kb, "keyboard_targets": kt}, "2026-02-01T00:00:00+00:00"
    )

    def day(top1, top3):
        return {
            "typed": {"next_word_top1": 0.25, "keystroke_savings": 0.45},
            "heldout": {"next_word_top1": top1, "next_word_top3": top3},
            "update": {"accepted": True, "seconds": 30.0, "preference_pairs": 40},
        }

    rows = [{"arms": {"text": [day(0.30, 0.45), day(0.31, 0.46)], "taps": [day(0.31, 0.45), day(0.33, 0.44)]}}]
    taps = summarize(rows, 2)
    assert abs(taps["heldout_top1_gain_points_last_day"] - 2.0) < 1e-9
    assert taps["targets"] == {
        "heldout_top1_gain_ge_1_point_after_last_day": True,
        "heldout_top3_never_below_text_only": False,  # day 2: 44% < 46%
    }
    _write(tmp_path, "taps", {**taps, "per_sender": rows, "preference_weight": 1.0}, "2026-02-01T00:00:00+00:00")
    text = write_report(tmp_path).read_text()
    assert "p99 17.0 ms <= 16: not met" in text and "(<= 1): **met**" in text
    assert "| q4_0 GGUF: deadline 16 ms, 100 ms gap |" in text
    assert "Learning from taps (taps)" in text and "+2.00 points" in text
    assert "target heldout_top3_never_below_text_only: not met" in text


def test_families_section_states_ratios_and_targets(tmp_path):
    from benchmarks.report import write_report

    def base(step, key, quant, vocab):
        return {
            "quant": quant,
            "vocab_size": vocab,
            "train_backend": "onnxruntime",
            "serve_backend": "llamacpp",
            "update_step_s": {"median": step},
            "keystroke_ms": {"median": key, "p99": 3 * key},
            "keystroke_savings": 0.5,
            "memory": {"peak_rss_mib": 700.0},
        }

    payload = {
        "bases": {"smollm2": base(2.0, 10.0, "q4_0", 49152), "gemma3-270m": base(7.0, 15.0, "q8_0", 262144)},
        "ratios_gemma_over_smollm2": {"update_step": 3.5, "keystroke_p50": 1.5},
        "targets": {"keystroke_p50_within_2x": True, "update_step_within_3x": False},
        "personalization": {"smollm2": {"mean": {"top3_gain_points": 1.25}}},
    }
    _write(tmp_path, "families", payload, "2026-02-01T00:00:00+00:00")
    text = write_report(tmp_path).read_text()
    assert "Model families: Gemma 3 270M next to SmolLM2 (families)" in text
    assert "| gemma3-270m | q8_0 | 262144 | onnxruntime / llamacpp | 7.00 | 15.0 | 45.0 | 50.0 | 700 | - |" in text
    assert "update_step 3.50x, keystroke_p50 1.50x" in text and "+1.25" in text
    assert "target update_step_within_3x: not met" in text and "target keystroke_p50_within_2x: **met**" in text
