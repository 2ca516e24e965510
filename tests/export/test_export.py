"""The exporter and the bundle contract."""

import json
import shutil

import pytest

import pocketpeft as pp
from pocketpeft.errors import ConfigError, CorruptFileError, ModelFileNotFoundError, UnsupportedModelError
from pocketpeft.manifest import Bundle


@pytest.fixture(scope="module")
def bundle(tiny_hf_dir, tmp_path_factory):
    return pp.export(
        tiny_hf_dir,
        tmp_path_factory.mktemp("b") / "bundle",
        quant="nf4",
        lora=pp.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
        seq_len=16,
        batch_size=2,
    )


def test_manifest_records_the_contract(bundle):
    m = bundle.manifest
    raw = json.loads((bundle.root / "manifest.json").read_text())
    assert raw["format"] == "pocketpeft-bundle" and raw["quant"] == "nf4"
    assert len(m.base_sha256) == 64 and m.arch.hidden_size == 64
    assert set(m.trainable) == {
        f"base_model.model.model.layers.{i}.self_attn.{p}_proj.lora_{ab}.weight"
        for i in range(2)
        for p in "qv"
        for ab in "AB"
    }
    assert m.trainable["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == [2, 64]
    assert (
        {"manifest.json"}.isdisjoint(m.files) and "tokenizer.json" in m.files and "torch/model.safetensors" in m.files
    )
    assert m.targets["torch"]["files"] == ["torch/model.safetensors"]
    assert m.versions["pocketpeft"] == pp.__version__ and "torch" in m.versions
    bundle.verify()


def test_corrupt_and_missing_files_are_detected(bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bundle.root, copy)
    w = copy / "torch" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="sha256"):
        Bundle(copy).verify("torch")
    w.write_bytes(bytes(data[:100]))
    with pytest.raises(CorruptFileError, match="truncated"):
        pp.runtime.open(copy, backend="torch")
    w.unlink()
    with pytest.raises(ModelFileNotFoundError, match="missing"):
        Bundle(copy).verify()
    (copy / "manifest.json").write_text("{oops")
    with pytest.raises(CorruptFileError, match="JSON"):
        Bundle(copy)
    with pytest.raises(ModelFileNotFoundError, match="not a pocketpeft bundle"):
        Bundle(tmp_path)
    with pytest.raises(ModelFileNotFoundError):
        Bundle(tmp_path / "nope")


def test_failed_export_leaves_existing_bundle_in_place(bundle, tiny_hf_dir, tmp_path):
    out = tmp_path / "keep"
    shutil.copytree(bundle.root, out)
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(ConfigError, match="seq_len 4096 exceeds"):
        pp.export(tiny_hf_dir, out, seq_len=4096)
    with pytest.raises(ConfigError, match="unknown export target"):
        pp.export(tiny_hf_dir, out, targets="torch,tensorrt")
    with pytest.raises(ModelFileNotFoundError):
        pp.export(tmp_path / "no-such-model", out)
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"], "no staging directories left behind"
    Bundle(out).verify()


def test_export_from_gguf_and_unsupported_arch(tiny_gguf_path, tiny_hf_dir, tmp_path):
    b = pp.export(tiny_gguf_path, tmp_path / "g", quant="q8_0", seq_len=16)
    assert b.manifest.arch.num_hidden_layers == 2 and b.manifest.quant.value == "q8_0"
    bad = tmp_path / "gpt2"
    shutil.copytree(tiny_hf_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        pp.export(bad, tmp_path / "x")


def test_general_text_is_shipped_with_its_hash(tiny_hf_dir, tmp_path):
    """``general_text`` becomes ``general.txt`` (one message per line, inner line breaks as
    spaces), a shared file with its sha256; the bundle reads it back."""
    from pocketpeft.fsutil import sha256_file
    from pocketpeft.manifest import GENERAL_TEXT

    texts = ["see you at the game tonight", "two\nlines\r\nhere", "   ", "last one"]
    b = pp.export(tiny_hf_dir, tmp_path / "b", quant="q8_0", seq_len=16, batch_size=2, general_text=texts)
    info = b.manifest.files[GENERAL_TEXT]
    assert info["target"] == "shared" and info["sha256"] == sha256_file(b.root / GENERAL_TEXT)
    assert b.general_texts() == ["see you at the game tonight", "two lines here", "last one"]
    assert b.manifest.options == {}  # only the exported targets' options are recorded
    b.verify()
    none = pp.export(tiny_hf_dir, tmp_path / "c", quant="q8_0", seq_len=16, batch_size=2, general_text=[])
    assert GENERAL_TEXT not in none.manifest.files and none.general_texts() == []
    with pytest.raises(ConfigError, match="general_text"):
        pp.export(tiny_hf_dir, tmp_path / "d", quant="q8_0", seq_len=16, batch_size=2, general_text="one string")


def test_general_text_defaults_to_the_chitchat_sample(bundle):
    from pocketpeft.corpus import general_texts
    from pocketpeft.errors import MissingDependencyError

    try:
        expected = general_texts(n=120, seed=7)
    except MissingDependencyError:
        assert bundle.general_texts() == []
        return
    assert bundle.general_texts() == [" ".join(t.splitlines()) for t in expected if t.strip()]


def test_target_options_are_typed_and_recorded(tiny_hf_dir, tmp_path):
    from pocketpeft.export import GgufOptions, OnnxOptions

    with pytest.raises(ConfigError, match="GgufOptions"):
        pp.export(tiny_hf_dir, tmp_path / "b", targets=["torch"], seq_len=16, batch_size=2, gguf="f32")
    with pytest.raises(ConfigError, match="OnnxOptions.q4"):
        OnnxOptions(q4="nibbles")
    assert OnnxOptions(rows=2, q4="INT8").to_dict() == {"rows": 2, "q4": "int8"}
    assert GgufOptions().to_dict() == {"linear": "native", "nf4": "f16", "passthrough": False}
    assert not (tmp_path / "b").exists()
