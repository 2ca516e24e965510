"""The command line, run as a user would (a subprocess of the installed console script)."""

import json
import subprocess
import sys

import pytest

from tests.helpers import CHAT


def run(*args, check=True):
    p = subprocess.run(
        [sys.executable, "-m", "pocketpeft.apps.cli", *map(str, args)], capture_output=True, text=True, timeout=600
    )
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:{p.stdout}\nstderr:{p.stderr}")
    return p


def export_tiny(tiny_hf_dir, out, *extra):
    """`pocketpeft export` of the tiny model (q8_0, r=4, 32-token rows, batch 4) with ``--json``."""
    return run(
        "export",
        tiny_hf_dir,
        "--out",
        out,
        "--quant",
        "q8_0",
        "--r",
        "4",
        "--seq-len",
        "32",
        "--batch",
        "4",
        *extra,
        "--json",
    )


def test_export_train_eval_backends_json(tiny_hf_dir, tmp_path):
    b = tmp_path / "bundle"
    out = json.loads(export_tiny(tiny_hf_dir, b).stdout)
    assert out["targets"] == ["torch"] and out["trainable_tensors"] == 16
    text = tmp_path / "me.txt"
    text.write_text("\n".join(CHAT) + "\n")
    tr = json.loads(run("train", b, "--text", text, "--steps", "3", "--adapter-out", tmp_path / "ad", "--json").stdout)
    assert tr["steps"] == 3 and tr["backend"] == "torch" and (tmp_path / "ad" / "adapter_model.safetensors").is_file()
    ev = json.loads(run("eval", b, "--text", text, "--adapter", tmp_path / "ad", "--keystrokes", "1", "--json").stdout)
    assert 0 <= ev["top1"] <= ev["top3"] <= 1 and ev["perplexity"] > 1
    assert ev["keyboard"]["messages"] == 1 and 0 <= ev["keyboard"]["keystroke_savings"] < 1
    be = json.loads(run("backends", "--json").stdout)
    assert sum(r["picked"] for r in be["backends"]) == 1
    assert "gemma3_text" in be["families"]["supported"] and "llamacpp" in be["families"]["limits"]
    human = run("backends").stdout
    assert "torch" in human and "*" in human and "model families:" in human


def test_export_gguf_linear_f32(tiny_hf_dir, tmp_path):
    pytest.importorskip("gguf")
    out = json.loads(
        run(
            "export",
            tiny_hf_dir,
            "--out",
            tmp_path / "b",
            "--quant",
            "q4_0",
            "--targets",
            "gguf",
            "--gguf-linear",
            "f32",
            "--json",
        ).stdout
    )
    info = json.loads((tmp_path / "b" / "gguf" / "info.json").read_text())
    assert "gguf" in out["targets"] and info["base"] == "gguf/base.f32.gguf" and info["linear_type"] == "f32"
    assert run("export", tiny_hf_dir, "--out", tmp_path / "c", "--gguf-linear", "q2", check=False).returncode == 2


def test_export_onnx_device_memory_options(tiny_hf_dir, tmp_path):
    pytest.importorskip("onnxruntime.training")
    run(
        "export",
        tiny_hf_dir,
        "--out",
        tmp_path / "b",
        "--quant",
        "q4_0",
        "--targets",
        "onnx",
        "--r",
        "4",
        "--seq-len",
        "16",
        "--batch",
        "4",
        "--onnx-rows",
        "2",
        "--onnx-q4",
        "int8",
        "--json",
    )
    io = json.loads((tmp_path / "b" / "onnx" / "io.json").read_text())
    assert io["training_model"]["inputs"]["input_ids"] == [2, 16] and io["q4_0_storage"] == "int8"
    bad = run("export", tiny_hf_dir, "--out", tmp_path / "c", "--targets", "onnx", "--onnx-rows", "0", check=False)
    assert bad.returncode != 0 and "--onnx-rows" in bad.stderr and not (tmp_path / "c").exists()


def test_cli_errors_are_clear(tiny_hf_dir, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9\n")
    p = run("train", tmp_path, "--text", bad, "--steps", "1", check=False)
    assert p.returncode == 2 and "error" in p.stderr
    p = run("train", tmp_path, "--text", bad, "--backend", "nope", "--json", check=False)
    assert p.returncode == 2
    err = json.loads(p.stdout)
    assert err["type"] in {"InputTextError", "BackendNotFoundError"}
    p = run("eval", tmp_path / "missing", "--text", bad, "--json", check=False)
    assert p.returncode == 2 and json.loads(p.stdout)["type"] in {"InputTextError", "ModelFileNotFoundError"}


@pytest.fixture(scope="module")
def kb_bundle(tiny_hf_dir, tmp_path_factory):
    """A tiny torch bundle for the keyboard commands (suggest, eval's keystroke metrics)."""
    import pocketpeft as pp

    return pp.export(
        tiny_hf_dir,
        tmp_path_factory.mktemp("kb") / "b",
        quant="q8_0",
        lora=pp.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False),
        seq_len=32,
        batch_size=2,
    )


def _main_json(capsys, *args):
    """Run the CLI in-process with --json; (exit status, the JSON object it printed)."""
    from pocketpeft.apps.cli import main

    code = main([*map(str, args), "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_suggest_matches_the_session_api(kb_bundle, capsys):
    import pocketpeft as pp

    sess = pp.runtime.open(kb_bundle.root, backend="torch")
    out = json.loads(run("suggest", kb_bundle.root, "see you at th", "-k", "3", "--backend", "torch", "--json").stdout)
    assert out["suggestions"] == sess.suggest("see you at th", 3) and len(out["suggestions"]) == 3
    assert all(w.lower().startswith("th") for w in out["suggestions"])
    assert out["latency_ms"] > 0 and out["uncached_ms"] > 0 and out["trimmed"] is False
    assert out["backend"] == "torch:cpu"
    for prefix in ("hey ", ""):  # the next word; the first word of a new message
        code, out = _main_json(capsys, "suggest", kb_bundle.root, prefix, "--backend", "torch")
        assert code == 0 and out["suggestions"] == sess.suggest(prefix, 3), prefix
    from pocketpeft.apps.cli import main

    assert main(["suggest", str(kb_bundle.root), "see you at th", "-k", "2"]) == 0
    human = capsys.readouterr().out
    assert "1. " in human and " ms on " in human
    # a generous deadline: the search finishes inside it and the answer says so
    code, out = _main_json(
        capsys, "suggest", kb_bundle.root, "see you at th", "--backend", "torch", "--deadline-ms", "5000"
    )
    assert code == 0 and out["complete"] is True and out["deadline_ms"] == 5000.0
    assert out["suggestions"] == sess.suggest("see you at th", 3)


def test_suggest_bad_input(kb_bundle, capsys, monkeypatch):
    import io

    code, out = _main_json(capsys, "suggest", kb_bundle.root, "x", "-k", "0")
    assert code == 2 and out["type"] == "ConfigError" and "-k" in out["error"]
    for bad in ("0", "-3", "nan", "inf", "1e9"):
        code, out = _main_json(capsys, "suggest", kb_bundle.root, "x", "--deadline-ms", bad)
        assert code == 2 and out["type"] == "ConfigError" and "deadline_ms" in out["error"], bad
    code, out = _main_json(capsys, "suggest", kb_bundle.root, "caf\udce9 au")  # argv bytes b"caf\xe9"
    assert code == 2 and out["type"] == "InputTextError" and "prefix" in out["error"]
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait\n")))
    code, out = _main_json(capsys, "suggest", kb_bundle.root, "-")
    assert code == 2 and out["type"] == "InputTextError" and "UTF-8" in out["error"]
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("caf\u00e9 au l\n".encode())))
    code, out = _main_json(capsys, "suggest", kb_bundle.root, "-", "--backend", "torch")
    assert code == 0 and out["prefix"] == "caf\u00e9 au l"
    code, out = _main_json(capsys, "suggest", kb_bundle.root, "see you", "--adapter", kb_bundle.root / "no-adapter")
    assert code == 2 and out["type"] == "ModelFileNotFoundError" and "no-adapter" in out["error"]
    long = "see you at the game " * 300  # 1500 words: beyond the 1024-token suggestion context
    code, out = _main_json(capsys, "suggest", kb_bundle.root, long + "ton", "--backend", "torch")
    assert code == 0 and out["trimmed"] is True and out["max_context"] == 1024
    assert all(w.lower().startswith("ton") for w in out["suggestions"])


def test_eval_reports_keyboard_metrics(kb_bundle, tmp_path, capsys):
    import pocketpeft as pp

    text = tmp_path / "held_out.txt"
    text.write_text("\n".join(CHAT[:4]) + "\n")
    code, out = _main_json(capsys, "eval", kb_bundle.root, "--texts", text, "--keystrokes", "2", "--backend", "torch")
    assert code == 0
    want = pp.runtime.open(kb_bundle.root, backend="torch").eval_keystrokes(CHAT[:4], k=3, max_messages=2)
    assert out["keyboard"] == want and want["messages"] == 2 and want["words"] > 5
    assert 0 <= want["next_word_top1"] <= want["next_word_top3"] <= 1 and 0 <= want["keystroke_savings"] < 1
    from pocketpeft.apps.cli import main

    assert main(["eval", str(kb_bundle.root), "--text", str(text), "--keystrokes", "1"]) == 0
    human = capsys.readouterr().out
    assert "next-word top-1" in human and "keystroke savings" in human
    code, out = _main_json(capsys, "eval", kb_bundle.root, "--text", text, "--keystrokes", "0")
    assert code == 0 and "keyboard" not in out
    code, out = _main_json(capsys, "eval", kb_bundle.root, "--text", text, "--keystrokes", "-1")
    assert code == 2 and out["type"] == "ConfigError"


def test_fleet_host_then_install_global(tiny_hf_dir, tmp_path):
    """`pocketpeft fleet --host` makes a global adapter, `export --global-adapter` ships it,
    `install-global` puts a newer one into an existing bundle and refuses a corrupt one (exit 2,
    typed error, the installed one kept)."""
    pytest.importorskip("flwr")
    b = tmp_path / "bundle"
    export_tiny(tiny_hf_dir, b)
    text = tmp_path / "public.txt"
    text.write_text("\n".join(CHAT) + "\n")
    host = json.loads(
        run("fleet", "--host", "--bundle", b, "--out", tmp_path / "g1", "--text", text, "--steps", "2", "--json").stdout
    )
    assert host["source"] == "host" and host["version"] == 1
    b2 = tmp_path / "bundle2"
    ex = json.loads(export_tiny(tiny_hf_dir, b2, "--global-adapter", tmp_path / "g1" / "global").stdout)
    assert ex["global"]["version"] == 1 and ex["global"]["source"] == "host"
    host2 = json.loads(
        run(
            "fleet", "--host", "--bundle", b2, "--out", tmp_path / "g2", "--text", text, "--steps", "2", "--json"
        ).stdout
    )
    assert host2["version"] == 2  # the next version after the installed one
    ig = json.loads(run("install-global", b2, tmp_path / "g2" / "global", "--json").stdout)
    assert ig["installed"]["version"] == 2 and ig["previous_version"] == 1
    bad = tmp_path / "g2" / "global" / "adapter_model.safetensors"
    bad.write_bytes(bad.read_bytes()[:-3])
    p = run("install-global", b, tmp_path / "g2" / "global", "--json", check=False)
    assert p.returncode == 2 and json.loads(p.stdout)["type"] == "CorruptFileError"
    assert not (b / "global").exists()


@pytest.mark.slow
def test_export_gemma3_270m_as_the_issue_writes_it(tmp_path):
    """`pocketpeft export gemma3-270m --quant q4_0 --targets torch,onnx,gguf`, no --out: the
    bundle lands in bundles/gemma3-270m-q4_0 of the working directory, trains on ONNX Runtime
    and suggests from llama.cpp."""
    cmd = [sys.executable, "-m", "pocketpeft.apps.cli"]
    p = subprocess.run(
        [*cmd, "export", "gemma3-270m", "--quant", "q4_0", "--targets", "torch,onnx,gguf", "--json"],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)
    bundle = tmp_path / "bundles" / "gemma3-270m-q4_0"
    assert out["bundle"] == str(bundle.resolve()) and sorted(out["targets"]) == ["gguf", "onnx", "torch"]
    assert out["base"] == "gemma3-270m" and out["quant"] == "q4_0"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["arch"]["model_type"] == "gemma3_text" and manifest["arch"]["vocab_size"] == 262144
    text = tmp_path / "me.txt"
    text.write_text("\n".join(CHAT) + "\n")
    tr = json.loads(run("train", bundle, "--text", text, "--steps", "1", "--backend", "onnxruntime", "--json").stdout)
    assert tr["steps"] == 1 and tr["backend"] == "onnxruntime"
    sg = json.loads(run("suggest", bundle, "see you at the", "--backend", "llamacpp", "--json").stdout)
    assert len(sg["suggestions"]) == 3 and all(isinstance(w, str) and w for w in sg["suggestions"])
