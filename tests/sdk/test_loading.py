"""load_base: SmolLM2 GGUF vs transformers' GGUF loader, a tiny model through GGUF and HF folders,
and the typed errors."""

from __future__ import annotations

import hashlib
import json
import shutil
import time

import numpy as np
import pytest
import torch

from pocketpeft.errors import CorruptFileError, ModelFileNotFoundError, UnsupportedModelError
from pocketpeft.reference.loading import LoadedBase, default_model_path, load_base, sha256_files

CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "tie_word_embeddings",
    "head_dim",
    "bos_token_id",
    "eos_token_id",
)


def _assert_config_matches(ours, hf_config) -> None:
    for f in CONFIG_FIELDS:
        assert getattr(ours, f) == getattr(hf_config, f), f
    assert ours.rms_norm_eps == pytest.approx(hf_config.rms_norm_eps, rel=1e-6)
    assert ours.rope_theta == hf_config.rope_parameters["rope_theta"]


def _assert_same_weights(ours: dict, ref: dict, tied: bool, atol: float = 0.0) -> None:
    expect = set(ref) - ({"lm_head.weight"} if tied else set())
    assert set(ours) == expect
    for k in expect:
        assert ours[k].dtype == torch.float32 and ours[k].shape == ref[k].shape, k
        # torch.equal first: assert_close takes ~25 s over SmolLM2's 135M weights
        assert torch.equal(ours[k], ref[k].float()) or torch.allclose(ours[k], ref[k].float(), rtol=0, atol=atol), k


# ---- the real SmolLM2 ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_loaded(smollm2_path) -> tuple[LoadedBase, float]:
    t0 = time.perf_counter()
    loaded = load_base("smollm2")
    return loaded, time.perf_counter() - t0


@pytest.fixture(scope="module")
def hf_gguf_model(smollm2_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32
    ).eval()


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_loader(smollm2_loaded, hf_gguf_model, smollm2_path):
    loaded, _ = smollm2_loaded
    _assert_config_matches(loaded.config, hf_gguf_model.config)
    assert loaded.config.tie_word_embeddings and loaded.config.model_type == "llama"
    _assert_same_weights(loaded.state_dict, hf_gguf_model.state_dict(), tied=True, atol=1e-6)
    assert loaded.source == "smollm2" and default_model_path() == smollm2_path
    assert loaded.source_sha256 == hashlib.sha256(smollm2_path.read_bytes()).hexdigest()
    kinds = sorted(set(loaded.source_quant.values()))
    assert kinds == ["F32", "Q4_1", "Q8_0"] and set(loaded.source_quant) == set(loaded.state_dict)
    assert loaded.source_quant["model.layers.0.self_attn.q_proj.weight"] == "Q4_1"


@pytest.mark.slow
def test_smollm2_qk_are_unpermuted(smollm2_loaded, smollm2_reader):
    from gguf.quants import dequantize

    loaded, _ = smollm2_loaded
    raw = {t.name: t for t in smollm2_reader.tensors}
    for gname, key in (
        ("blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj.weight"),
        ("blk.3.attn_k.weight", "model.layers.3.self_attn.k_proj.weight"),
        ("blk.3.attn_v.weight", "model.layers.3.self_attn.v_proj.weight"),
    ):
        w = torch.from_numpy(dequantize(raw[gname].data, raw[gname].tensor_type).copy())
        ours = loaded.state_dict[key]
        if "attn_v" in gname:
            assert torch.equal(ours, w)
            continue
        assert not torch.equal(ours, w)  # the file's row order is not HF's
        # same rows, reordered within each head: file row 2j+h holds HF row h*d/2+j
        heads = 9 if "attn_q" in gname else 3
        d = ours.shape[0] // heads
        rows = torch.arange(ours.shape[0]).view(heads, 2, d // 2).transpose(1, 2).reshape(-1)
        assert torch.equal(ours[rows], w)


@pytest.mark.slow
def test_smollm2_generates_sensible_text(smollm2_loaded):
    transformers = pytest.importorskip("transformers")
    loaded, _ = smollm2_loaded
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**loaded.config.to_hf_dict())).eval()
    missing, unexpected = model.load_state_dict(loaded.state_dict, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    tk = loaded.tokenizer
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([tk.encode(prompt)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tk.pad_id)
    assert "Paris" in tk.decode(out[0, ids.shape[1] :].tolist())


@pytest.mark.slow
def test_tiny_gguf_writer_agrees_with_transformers(tiny_gguf_path, tiny_hf_model):
    """Cross-check of the test's own GGUF writer: transformers reads it back to the HF weights."""
    transformers = pytest.importorskip("transformers")
    m = transformers.AutoModelForCausalLM.from_pretrained(
        str(tiny_gguf_path.parent), gguf_file=tiny_gguf_path.name, dtype=torch.float32
    )
    _assert_same_weights(
        {k: v for k, v in m.state_dict().items() if k != "lm_head.weight"}, tiny_hf_model.state_dict(), tied=True
    )


# ---- tiny model, GGUF and HF folder -------------------------------------------------------
def test_tiny_gguf_gives_back_hf_weights(tiny_gguf_path, tiny_hf_model, smollm2_tokenizer):
    loaded = load_base(tiny_gguf_path)
    _assert_config_matches(loaded.config, tiny_hf_model.config)
    _assert_same_weights(loaded.state_dict, tiny_hf_model.state_dict(), tied=True)
    assert loaded.source == str(tiny_gguf_path.resolve())
    assert set(loaded.source_quant.values()) == {"F32"}
    assert loaded.tokenizer.to_json_str() == smollm2_tokenizer.to_json_str()
    assert loaded.source_sha256 == hashlib.sha256(tiny_gguf_path.read_bytes()).hexdigest()


def test_untied_f16_gguf_with_progress(tmp_path, tiny_hf_model, write_gguf, capsys):
    sd = dict(tiny_hf_model.state_dict())
    sd["lm_head.weight"] = torch.randn_like(sd["lm_head.weight"]) * 0.02
    path = write_gguf(tmp_path / "untied-f16.gguf", sd, dtype=np.float16, n_tokens=300)
    loaded = load_base(path, progress=True)
    out, err = capsys.readouterr()
    assert "untied-f16.gguf" in err and "21/21" in err and out == ""
    assert loaded.tokenizer.vocab_size == 300 and loaded.config.vocab_size == 49152
    assert not loaded.config.tie_word_embeddings
    _assert_same_weights(loaded.state_dict, {k: v.half().float() for k, v in sd.items()}, tied=False)
    assert loaded.source_quant["lm_head.weight"] == "F16" and loaded.source_quant["model.norm.weight"] == "F32"


def test_hf_dir_matches_transformers(tiny_hf_dir, tiny_hf_model, smollm2_tokenizer):
    loaded = load_base(tiny_hf_dir)
    _assert_config_matches(loaded.config, tiny_hf_model.config)
    _assert_same_weights(loaded.state_dict, tiny_hf_model.state_dict(), tied=True)
    assert loaded.source == str(tiny_hf_dir.resolve()) and loaded.source_quant == {}
    both = (tiny_hf_dir / "config.json").read_bytes() + (tiny_hf_dir / "model.safetensors").read_bytes()
    assert loaded.source_sha256 == hashlib.sha256(both).hexdigest()
    tk = loaded.tokenizer
    assert (tk.bos_id, tk.eos_id, tk.pad_id) == (1, 2, 2)
    assert tk.encode("hi there 42") == smollm2_tokenizer.encode("hi there 42")


def test_sharded_bf16_hf_dir(tmp_path, tiny_hf_model, tiny_hf_dir):
    bf16 = type(tiny_hf_model)(tiny_hf_model.config)
    bf16.load_state_dict(tiny_hf_model.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    bf16.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="2MB")
    shutil.copy(tiny_hf_dir / "tokenizer.json", tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = load_base(tmp_path, progress=False)
    _assert_same_weights(loaded.state_dict, bf16.state_dict(), tied=True)
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 1
    assert loaded.source_sha256 == sha256_files([tmp_path / "config.json", *shards])


def test_hf_progress_bar_goes_to_stderr(tiny_hf_dir, capsys):
    load_base(tiny_hf_dir, progress=True)
    out, err = capsys.readouterr()
    assert "20/20" in err and out == ""


def test_sha256_cache_follows_file_changes(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"a" * 3_000_000)
    assert sha256_files([p]) == hashlib.sha256(b"a" * 3_000_000).hexdigest() == sha256_files([p])
    p.write_bytes(b"b" * 10)
    assert sha256_files([p]) == hashlib.sha256(b"b" * 10).hexdigest()


# ---- errors -------------------------------------------------------------------------------
def _copy_dir_with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_unknown_model_type(tmp_path, tiny_hf_dir):
    d = _copy_dir_with_config(tiny_hf_dir, tmp_path / "m", model_type="gpt2")
    with pytest.raises(UnsupportedModelError, match=r"'gpt2'.*llama, mistral"):
        load_base(d)
    with pytest.raises(ValueError):
        load_base(d)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope_parameters"),
        ({"model_type": "mistral", "sliding_window": 512}, "sliding_window"),
    ],
)
def test_unrepresentable_config(tmp_path, tiny_hf_dir, change, field):
    d = _copy_dir_with_config(tiny_hf_dir, tmp_path / "m", **change)
    with pytest.raises(UnsupportedModelError, match=field):
        load_base(d)


def test_mistral_without_sliding_window_loads(tmp_path, tiny_hf_dir):
    d = _copy_dir_with_config(tiny_hf_dir, tmp_path / "m", model_type="mistral", sliding_window=None)
    assert load_base(d).config.model_type == "mistral"


def test_other_gguf_architecture(tmp_path, tiny_hf_model, write_gguf):
    path = write_gguf(tmp_path / "q.gguf", tiny_hf_model.state_dict(), arch="phi3", n_tokens=300)
    with pytest.raises(UnsupportedModelError, match=r"'phi3'.*llama.*qwen2.*qwen3.*gemma3"):
        load_base(path)
    # a supported family whose tensors don't fit it: qwen2 needs q/k/v biases
    path = write_gguf(tmp_path / "q2.gguf", tiny_hf_model.state_dict(), arch="qwen2", n_tokens=300)
    with pytest.raises(CorruptFileError, match=r"q_proj.bias"):
        load_base(path)


def test_unreadable_quant_type_names_tensor_and_type(tmp_path, tiny_hf_model, write_gguf):
    import gguf

    sd = {k: v for k, v in tiny_hf_model.state_dict().items() if k != "lm_head.weight"}
    path = write_gguf(
        tmp_path / "q81.gguf", sd, n_tokens=300, raw={"blk.1.ffn_up.weight": gguf.GGMLQuantizationType.Q8_1}
    )
    with pytest.raises(UnsupportedModelError, match=r"blk\.1\.ffn_up\.weight.*Q8_1"):
        load_base(path)


def test_truncated_gguf(tmp_path, smollm2_path, tiny_hf_model, write_gguf):
    head = tmp_path / "head.gguf"
    with open(smollm2_path, "rb") as fh:
        head.write_bytes(fh.read(1 << 20))
    with pytest.raises(CorruptFileError, match="head.gguf"):
        load_base(head)
    cut = tmp_path / "cut.gguf"
    data = write_gguf(tmp_path / "small.gguf", tiny_hf_model.state_dict(), n_tokens=300).read_bytes()
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CorruptFileError, match="cut.gguf"):
        load_base(cut)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError):
        load_base(empty)


def test_missing_paths(tmp_path, tiny_hf_dir):
    for bad in (tmp_path / "nope", tmp_path / "nope.gguf"):
        with pytest.raises(ModelFileNotFoundError, match="nope"):
            load_base(bad)
        with pytest.raises(FileNotFoundError):
            load_base(str(bad))
    with pytest.raises(ModelFileNotFoundError, match="config.json"):
        load_base(tmp_path)
    d = shutil.copytree(tiny_hf_dir, tmp_path / "no_tok")
    (d / "tokenizer.json").unlink()
    with pytest.raises(ModelFileNotFoundError, match="tokenizer.json is required"):
        load_base(d)
    d = shutil.copytree(tiny_hf_dir, tmp_path / "no_weights")
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelFileNotFoundError, match="safetensors"):
        load_base(d)


def test_not_a_model_file(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    with pytest.raises(UnsupportedModelError, match="neither a GGUF"):
        load_base(p)


def test_corrupt_safetensors(tmp_path, tiny_hf_dir):
    d = shutil.copytree(tiny_hf_dir, tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CorruptFileError, match="model.safetensors"):
        load_base(d)
