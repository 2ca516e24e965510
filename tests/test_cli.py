"""The command line, run as a user would (a subprocess of the installed console script)."""

import json
import subprocess
import sys

import pytest

from tests.helpers import CHAT


def run(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "pocketpeft.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:{p.stdout}\nstderr:{p.stderr}")
    return p


def test_export_train_eval_backends_json(tiny_hf_dir, tmp_path):
    b = tmp_path / "bundle"
    out = json.loads(run("export", tiny_hf_dir, "--out", b, "--quant", "q8_0", "--r", "4", "--seq-len", "32",
                         "--batch", "4", "--json").stdout)
    assert out["targets"] == ["torch"] and out["trainable_tensors"] == 16
    text = tmp_path / "me.txt"
    text.write_text("\n".join(CHAT) + "\n")
    tr = json.loads(run("train", b, "--text", text, "--steps", "3", "--adapter-out", tmp_path / "ad", "--json").stdout)
    assert tr["steps"] == 3 and tr["backend"] == "torch" and (tmp_path / "ad" / "adapter_model.safetensors").is_file()
    ev = json.loads(run("eval", b, "--text", text, "--adapter", tmp_path / "ad", "--json").stdout)
    assert 0 <= ev["top1"] <= ev["top3"] <= 1 and ev["perplexity"] > 1
    be = json.loads(run("backends", "--json").stdout)
    assert sum(r["picked"] for r in be["backends"]) == 1
    human = run("backends").stdout
    assert "torch" in human and "*" in human


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
