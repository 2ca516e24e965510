"""The gguf target: the base GGUF reads back (gguf-py and our loader) to the bundle's weights, its
q4_0 / q8_0 tensors are our quantized buffers byte for byte, nf4 and GGUF-source (tokenizer
copy, Q4_1 passthrough) handling, and the PEFT -> GGUF LoRA conversion's layout and metadata.
llama.cpp itself loading these files is tested in tests/runtime/test_llamacpp_backend.py."""

import json
from importlib.metadata import version

import gguf
import numpy as np
import pytest
import torch

import pocketpeft as pp
from pocketpeft.errors import AdapterShapeError, ConfigError
from pocketpeft.export.gguf_target import permute_rows, write_base_gguf
from pocketpeft.formats.gguf import GgufOptions
from pocketpeft.formats.gguf_lora import adapter_to_gguf, gguf_lora_name
from pocketpeft.reference.loading import gguf_field, load_base, open_gguf
from pocketpeft.reference.model import build_from_float, dequantized_state_dict
from pocketpeft.reference.quant import from_gguf_blocks, to_gguf_blocks
from tests.conftest import llamacpp_permute

LORA = dict(r=4, lora_alpha=8)
Q = gguf.GGMLQuantizationType


def _export(src, tmp_path_factory, quant, tag, gguf=None):
    return pp.export(
        src,
        tmp_path_factory.mktemp(tag) / "b",
        quant=quant,
        lora=pp.LoraConfig(**LORA),
        targets=["torch", "gguf"],
        seq_len=16,
        batch_size=2,
        gguf=gguf,
    )


@pytest.fixture(scope="module")
def q4_bundle(tiny_hf_dir, tmp_path_factory):
    return _export(tiny_hf_dir, tmp_path_factory, "q4_0", "gguf_q4")


@pytest.fixture(scope="module")
def tiny_loaded(tiny_hf_dir):
    return load_base(tiny_hf_dir)


def _info(bundle):
    return json.loads((bundle.root / "gguf" / "info.json").read_text())


def _torch_model(bundle):
    from safetensors.torch import load_file

    from pocketpeft.reference.model import build_quantized

    m = bundle.manifest
    return build_quantized(m.arch, m.quant, load_file(str(bundle.path_of("torch/model.safetensors"))))


def _tensors(reader):
    return {t.name: t for t in reader.tensors}


def test_bundle_records_the_gguf_target(q4_bundle):
    m = q4_bundle.manifest
    info = _info(q4_bundle)
    assert m.targets["gguf"]["files"] == ["gguf/base.q4_0.gguf", "gguf/info.json"]
    assert info["base"] == "gguf/base.q4_0.gguf" and info["linear_type"] == "q4_0"
    assert info["tensor_types"] == {"q4_0": 14, "f32": 5, "f16": 1}  # random embedding: not exact in q8_0
    assert info["embedding_type"] == "f16" and info["output"] == "tied" and not info["passthrough"]
    assert m.versions["gguf"] == version("gguf") and m.targets["gguf"]["toolchain"]["gguf.linear_type"] == "q4_0"
    q4_bundle.verify("gguf")


def test_metadata_is_what_llama_cpp_reads(q4_bundle, smollm2_reader):
    r = open_gguf(q4_bundle.root / "gguf" / "base.q4_0.gguf")
    a = q4_bundle.manifest.arch
    expect = {
        "general.architecture": "llama",
        "general.type": "model",
        "llama.block_count": 2,
        "llama.context_length": 2048,
        "llama.embedding_length": 64,
        "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16,
        "llama.vocab_size": 49152,
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q4_0),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
    }
    assert {k: gguf_field(r, k) for k in expect} == expect
    assert gguf_field(r, "llama.rope.freq_base") == pytest.approx(a.rope_theta)
    assert gguf_field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(a.rms_norm_eps)
    # the tiny model carries SmolLM2's tokenizer.json: rebuilt from it, the vocabulary is SmolLM2's GGUF one
    for k in ("tokens", "merges", "token_type"):
        assert gguf_field(r, f"tokenizer.ggml.{k}") == gguf_field(smollm2_reader, f"tokenizer.ggml.{k}"), k
    assert "output.weight" not in _tensors(r)  # tied


def test_quantized_bytes_are_ours_and_read_back_to_the_same_weights(q4_bundle):
    """q4_0 tensors in the file = our buffers byte for byte (Q/K rows permuted); gguf-py and our
    loader both dequantize the file to the bundle's weights."""
    path = q4_bundle.root / "gguf" / "base.q4_0.gguf"
    r = open_gguf(path)
    ts = _tensors(r)
    model = _torch_model(q4_bundle)
    a = q4_bundle.manifest.arch
    for hf, stem, heads in (
        ("self_attn.q_proj", "attn_q", 4),
        ("self_attn.k_proj", "attn_k", 2),
        ("self_attn.v_proj", "attn_v", None),
        ("mlp.down_proj", "ffn_down", None),
    ):
        for i in range(2):
            mod = model.get_submodule(f"model.layers.{i}.{hf}")
            ours = to_gguf_blocks({"qweight": mod.qweight, "scales": mod.scales}, "q4_0")
            t = ts[f"blk.{i}.{stem}.weight"]
            assert t.tensor_type == Q.Q4_0
            raw = np.asarray(t.data)
            assert np.array_equal(raw, permute_rows(ours, heads) if heads else ours)
            if heads is None:  # and back into our buffers, bit for bit
                bufs = from_gguf_blocks(raw, "q4_0", (mod.out_features, mod.in_features))
                assert torch.equal(bufs["qweight"], mod.qweight) and torch.equal(
                    bufs["scales"].view(torch.int16), mod.scales.view(torch.int16)
                )
    # gguf-py's dequantization of the file, Q/K un-permuted, equals ours exactly
    q0 = gguf.quants.dequantize(ts["blk.0.attn_q.weight"].data, Q.Q4_0)
    want = model.get_submodule("model.layers.0.self_attn.q_proj").dequantized_weight().numpy()
    assert np.array_equal(q0, llamacpp_permute(want, a.num_attention_heads))
    # our loader: every tensor back to the bundle's weights (embedding through f16)
    back = load_base(path)
    ref = dequantized_state_dict(model)
    assert back.config.num_key_value_heads == 2 and back.config.tie_word_embeddings
    assert set(back.state_dict) == set(ref) - {"lm_head.weight"}
    for k, v in back.state_dict.items():
        want = ref[k].to(torch.float16).float() if k == "model.embed_tokens.weight" else ref[k]
        assert torch.equal(v, want), k
    assert back.source_quant["model.layers.0.self_attn.q_proj.weight"] == "Q4_0"


def test_q8_0_bytes_and_nf4_written_as_f16_or_q8_0(tiny_loaded, tmp_path):
    cfg, sd, tok = tiny_loaded.config, tiny_loaded.state_dict, tiny_loaded.tokenizer
    m8 = build_from_float(cfg, sd, "q8_0")
    info = write_base_gguf(m8, tmp_path / "q8.gguf", tokenizer=tok)
    assert info["linear_type"] == "q8_0" and info["tensor_types"]["q8_0"] == 14
    ts = _tensors(open_gguf(tmp_path / "q8.gguf"))
    up = m8.get_submodule("model.layers.1.mlp.up_proj")
    assert ts["blk.1.ffn_up.weight"].tensor_type == Q.Q8_0
    assert np.array_equal(
        np.asarray(ts["blk.1.ffn_up.weight"].data), to_gguf_blocks({"qweight": up.qweight, "scales": up.scales}, "q8_0")
    )
    k = m8.get_submodule("model.layers.0.self_attn.k_proj")
    assert np.array_equal(
        np.asarray(ts["blk.0.attn_k.weight"].data),
        permute_rows(to_gguf_blocks({"qweight": k.qweight, "scales": k.scales}, "q8_0"), 2),
    )

    m4 = build_from_float(cfg, sd, "nf4")
    want = m4.get_submodule("model.layers.0.self_attn.v_proj").dequantized_weight()
    info = write_base_gguf(m4, tmp_path / "nf4.gguf", tokenizer=tok)
    assert info["linear_type"] == "f16" and info["tensor_types"]["f16"] == 15  # 14 linears + embedding
    v = _tensors(open_gguf(tmp_path / "nf4.gguf"))["blk.0.attn_v.weight"]
    assert v.tensor_type == Q.F16 and np.array_equal(np.asarray(v.data), want.half().numpy())
    info = write_base_gguf(m4, tmp_path / "nf4q8.gguf", tokenizer=tok, nf4_as="q8_0", embedding="f32")
    assert info["linear_type"] == "q8_0" and info["tensor_types"] == {"q8_0": 14, "f32": 6}  # norms + embedding
    with pytest.raises(ConfigError, match="nf4_as"):
        write_base_gguf(m4, tmp_path / "x.gguf", tokenizer=tok, nf4_as="q4_1")
    with pytest.raises(ConfigError, match="source_gguf"):
        write_base_gguf(m4, tmp_path / "x.gguf", tokenizer=tok, passthrough=True)
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.gguf.partial").exists()


@pytest.fixture(scope="module")
def q4_1_gguf(tiny_gguf_path, tmp_path_factory):
    """The tiny F32 GGUF with every 2-D linear requantized to Q4_1 (a SmolLM2-like source)."""
    from pocketpeft.export import gguf_target

    src = open_gguf(tiny_gguf_path)
    path = tmp_path_factory.mktemp("q41") / "tiny-q4_1.gguf"
    w = gguf_target._writer(path)
    gguf_target._copy_tokenizer_kv(w, tiny_gguf_path)  # (quicker than f.contents() of 49k tokens)
    for key, f in src.fields.items():
        if key.startswith(("GGUF.", "tokenizer.")) or key == "general.architecture":
            continue
        sub = f.types[1] if f.types[0] == gguf.GGUFValueType.ARRAY and len(f.types) > 1 else None
        w.add_key_value(key, f.contents(), f.types[0], sub)
    for t in src.tensors:
        a = np.asarray(t.data)
        if a.ndim == 2 and t.name.startswith("blk."):
            q = gguf.quants.quantize(a, Q.Q4_1)
            w.add_tensor(t.name, q, raw_shape=q.shape, raw_dtype=Q.Q4_1)
        else:
            w.add_tensor(t.name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_linear_as_f32_writes_the_exact_dequantized_weights(tiny_loaded, tmp_path):
    """linear_as="f32": every linear is the float32 its q4_0 bytes dequantize to (Q/K permuted)."""
    cfg, sd, tok = tiny_loaded.config, tiny_loaded.state_dict, tiny_loaded.tokenizer
    m4 = build_from_float(cfg, sd, "q4_0")
    info = write_base_gguf(m4, tmp_path / "f32.gguf", tokenizer=tok, linear_as="f32")
    assert info["linear_type"] == "f32" and info["embedding_type"] == "f32" and set(info["tensor_types"]) == {"f32"}
    ts = _tensors(open_gguf(tmp_path / "f32.gguf"))
    for hf, stem, heads in (
        ("self_attn.q_proj", "attn_q", 4),
        ("self_attn.k_proj", "attn_k", 2),
        ("mlp.down_proj", "ffn_down", None),
    ):
        want = m4.get_submodule(f"model.layers.1.{hf}").dequantized_weight().numpy()
        t = ts[f"blk.1.{stem}.weight"]
        assert t.tensor_type == Q.F32
        assert np.array_equal(np.asarray(t.data), permute_rows(want, heads) if heads else want)
    with pytest.raises(ConfigError, match="linear_as"):
        write_base_gguf(m4, tmp_path / "x.gguf", tokenizer=tok, linear_as="bf16")


def test_gguf_source_tokenizer_copied_and_q4_1_passthrough(q4_1_gguf, tmp_path_factory):
    """A GGUF source's tokenizer metadata is copied byte for byte; with passthrough its own Q4_1
    linears are copied verbatim (the default, the bundle's own bytes, is tested above)."""
    from pocketpeft.export.gguf_target import _tokenizer_kv

    pt = _export(q4_1_gguf, tmp_path_factory, "q4_0", "gguf_pt", gguf=GgufOptions(passthrough=True))
    assert pt.manifest.options["gguf"] == {"linear": "native", "nf4": "f16", "passthrough": True}
    info = _info(pt)
    assert info["base"] == "gguf/base.mixed.gguf" and info["passthrough"] and info["passthrough_tensors"] == 14
    assert info["tokenizer"] == "copied from tiny-q4_1.gguf"
    src_kv = _tokenizer_kv(q4_1_gguf)
    assert len(src_kv) >= 8 and _tokenizer_kv(pt.root / info["base"]) == src_kv
    src_t = _tensors(open_gguf(q4_1_gguf))
    ts = _tensors(open_gguf(pt.root / info["base"]))
    for name in ("blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.1.ffn_down.weight"):
        assert ts[name].tensor_type == Q.Q4_1
        assert np.array_equal(np.asarray(ts[name].data), np.asarray(src_t[name].data)), name
    assert ts["blk.0.attn_norm.weight"].tensor_type == Q.F32 and ts["token_embd.weight"].tensor_type == Q.F16


def test_passthrough_needs_a_gguf_source(q4_bundle, tiny_hf_dir, tmp_path):
    with pytest.raises(ConfigError, match="GGUF"):
        pp.export(
            tiny_hf_dir,
            tmp_path / "b",
            quant="q4_0",
            targets=["torch", "gguf"],
            seq_len=16,
            batch_size=2,
            gguf=GgufOptions(passthrough=True),
        )
    assert not (tmp_path / "b").exists()


def test_gguf_options_are_validated():
    for field, bad in (("linear", "q2"), ("nf4", "q4_0"), ("passthrough", "yes")):
        with pytest.raises(ConfigError, match=rf"GgufOptions\.{field}"):
            GgufOptions(**{field: bad})
    assert GgufOptions(linear="F32").linear.value == "f32"


def _random_adapter(manifest, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in manifest.trainable.items()}


def test_adapter_to_gguf_layout_and_metadata(q4_bundle, tmp_path):
    m = q4_bundle.manifest
    tensors = _random_adapter(m)
    out = adapter_to_gguf(tensors, tmp_path / "a.gguf", q4_bundle)
    assert out == {"alpha": 8.0, "r": 4, "tensors": 16}
    r = open_gguf(tmp_path / "a.gguf")
    assert gguf_field(r, "general.architecture") == "llama" and gguf_field(r, "general.type") == "adapter"
    assert gguf_field(r, "adapter.type") == "lora" and gguf_field(r, "adapter.lora.alpha") == 8.0
    ts = _tensors(r)
    assert len(ts) == 16 and all(t.tensor_type == Q.F32 for t in ts.values())
    p = "base_model.model.model.layers.1.self_attn."
    # ggml shapes: lora_a [in, r], lora_b [r, out], i.e. PEFT's arrays as they are
    assert list(ts["blk.1.attn_q.weight.lora_a"].shape) == [64, 4]
    assert list(ts["blk.1.attn_k.weight.lora_b"].shape) == [4, 32]
    assert np.array_equal(ts["blk.1.attn_q.weight.lora_a"].data, tensors[p + "q_proj.lora_A.weight"])
    assert np.array_equal(ts["blk.1.attn_v.weight.lora_b"].data, tensors[p + "v_proj.lora_B.weight"])
    assert np.array_equal(ts["blk.1.attn_output.weight.lora_b"].data, tensors[p + "o_proj.lora_B.weight"])
    # Q/K: lora_b rows permuted like the base's rows (n_head for q, n_head_kv for k)
    assert np.array_equal(
        ts["blk.1.attn_q.weight.lora_b"].data, llamacpp_permute(tensors[p + "q_proj.lora_B.weight"], 4)
    )
    assert np.array_equal(
        ts["blk.1.attn_k.weight.lora_b"].data, llamacpp_permute(tensors[p + "k_proj.lora_B.weight"], 4, 2)
    )
    assert gguf_lora_name(p + "k_proj.lora_A.default.weight") == "blk.1.attn_k.weight.lora_a"


def test_adapter_to_gguf_from_a_peft_dir_with_rslora_and_errors(q4_bundle, tmp_path):
    from pocketpeft.adapter import Adapter, save_adapter

    m = q4_bundle.manifest
    cfg = pp.LoraConfig(**LORA, use_rslora=True)
    save_adapter(Adapter(cfg, {k: torch.from_numpy(v) for k, v in _random_adapter(m).items()}), tmp_path / "ad")
    out = adapter_to_gguf(tmp_path / "ad", tmp_path / "a.gguf", m)
    assert out["alpha"] == pytest.approx(8 / 2 * 4)  # llama.cpp applies alpha / r: carries alpha / sqrt(r)
    bad = _random_adapter(m)
    bad.pop(next(iter(bad)))
    with pytest.raises(AdapterShapeError, match="missing"):
        adapter_to_gguf(bad, tmp_path / "b.gguf", m)
    with pytest.raises(AdapterShapeError, match="not a LoRA tensor"):
        gguf_lora_name("base_model.model.lm_head.lora_A.weight")
    with pytest.raises(ConfigError, match="manifest"):
        adapter_to_gguf(tmp_path / "ad", tmp_path / "c.gguf")
    assert not any(p.name.startswith(("b.gguf", "c.gguf")) for p in tmp_path.iterdir())
