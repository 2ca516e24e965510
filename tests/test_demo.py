"""The main job end to end on the embedded SmolLM2, at a small size: export (cached), learn from
one chitchat sender, report before/after with keyboard metrics, the plot and the JSON report."""

import json

import pytest

from pocketpeft.apps.demo import run_demo
from pocketpeft.runtime.selection import probe


@pytest.mark.slow
def test_demo_runs_end_to_end_and_writes_its_report(tmp_path):
    lines: list[str] = []
    rep = run_demo(
        seconds=20,
        out_dir=tmp_path / "out",
        cache=tmp_path / "cache",
        max_test_messages=24,
        keystroke_messages=2,
        examples=1,
        log=lines.append,
        global_seconds=20,
    )
    saved = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert saved["sender"] == rep["sender"] and saved["update"]["steps"] == rep["update"]["steps"]
    assert (tmp_path / "out" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for side in ("before", "after"):
        m = rep[side]
        assert 0 <= m["next_word_top3"] <= 1 and 0 <= m["keystroke_savings"] <= 1 and m["loss"] > 0
    bd = rep["breakdown"]  # what the word counts and the LoRA update each do alone
    assert 0 < bd["word_weight"] <= 1
    for part in ("base_with_word_counts", "lora_alone"):
        assert bd[part]["words"] == rep["after"]["words"] == rep["before"]["words"]
    assert rep["test_messages"] == 24 and 1 <= rep["keystroke_messages"] <= 2  # fewer when typing is slow
    assert rep["update"]["steps"] >= 1 or "too short" in rep["update"]["reason"]
    if rep["update"]["accepted"]:  # the gate let it through only because held-out loss fell
        assert rep["update"]["heldout_loss_after"] < rep["update"]["heldout_loss_before"]
    assert any("+personal" in ln for ln in lines)  # the base / global / global + personal table was printed
    # two-level adapters: a chat-adapted global adapter (host-trained on other people's messages)
    # ships in the bundle and the personal adapter trains on top of it
    g = rep["global"]
    assert g["version"] >= 1 and g["source"] == "host" and g["steps"] >= 1
    assert 0 <= rep["base"]["next_word_top3"] <= 1 and rep["base"]["loss"] > 0
    # the device path where its runtimes are installed: split training on ONNX Runtime, llama.cpp serving
    assert rep["split"]["layer"] == 22 and rep["split"]["hidden_size"] == 576
    if probe("onnxruntime").available:
        assert rep["backend"].startswith("onnxruntime")
    if probe("llamacpp").available:
        assert rep["serving_backend"].startswith("llamacpp")
    assert (
        run_demo(
            seconds=1,
            out_dir=tmp_path / "out2",
            cache=tmp_path / "cache",
            max_test_messages=4,
            keystroke_messages=1,
            examples=1,
            log=None,
            global_seconds=20,
        )["export_seconds"]
        == 0.0
    )  # cached bundle reused, its global adapter too


@pytest.mark.slow
def test_demo_on_gemma3_270m(tmp_path):
    """``pocketpeft demo --base gemma3-270m`` at a small size: the Gemma bundle (q8_0, the top 8 of
    its 18 layers split off) learns on the device path and serves from llama.cpp."""
    from pocketpeft.apps.demo import demo_quant

    rep = run_demo(
        base="gemma3-270m",
        quant=demo_quant("gemma3-270m"),
        seconds=20,
        out_dir=tmp_path / "out",
        cache=tmp_path / "cache",
        max_test_messages=12,
        keystroke_messages=1,
        examples=1,
        log=None,
        global_seconds=0,
    )
    assert rep["base_model"] == {"name": "gemma3-270m", "model": "Gemma 3 270M", "quant": "q8_0"}
    assert rep["split"]["layer"] == 10 and rep["split"]["hidden_size"] == 640
    for side in ("before", "after"):
        assert 0 <= rep[side]["next_word_top3"] <= 1 and rep[side]["loss"] > 0
    assert rep["update"]["steps"] >= 1 or "too short" in rep["update"]["reason"]
    if probe("onnxruntime").available:
        assert rep["backend"].startswith("onnxruntime")
    if probe("llamacpp").available:
        assert rep["serving_backend"].startswith("llamacpp")
