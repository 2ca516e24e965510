"""The gguf target and the llamacpp backend for the families besides Llama: Qwen2 (q/k/v biases),
Qwen3 (q/k norms, a head_dim apart from hidden / heads) and Gemma 3 (GeGLU, four norms per block
stored as ``1 + w``, embedding scale, q/k norms, sliding-window layers with their own RoPE base).

Each tiny family model is exported with a random adapter at f32, q8_0 and q4_0; llama.cpp (the
llamacpp backend) must give the torch backend's logits with the bundle's adapter, with the base
alone, after hot-swapping to a second adapter and back. 3 rows x 16 tokens: longer than the tiny
Gemma's window of 6, so its sliding layers really slide.

Tolerances (measured in brackets), relative to the torch logits.

- f32 (the llamacpp backend keeps an f32 KV cache for an f32 base): max |dlogit| / max |logit|
  <= 1e-4 for Qwen2 / Qwen3 [~1e-6];
  Gemma 3 5e-3 [~1e-3]: ggml's CPU GELU reads an fp16 lookup table (``fp16(gelu(fp16(x)))``)
  where torch computes in float32; with that table emulated in torch the error drops to
  [~1e-4] (asserted <= 1e-3).
- q8_0 / q4_0: max |dlogit| <= 10% of max |logit| [Qwen2 <= 0.009, Qwen3 <= 0.022, Gemma 3
  <= 0.055]; mean |dlogit| <= 3% of the torch logits' std [0.006, 0.011, 0.015]; top-1
  agreement >= 85% [>= 0.92] and llama.cpp's top-1 within torch's top-3 at >= 95% of positions
  [>= 0.98]. ggml quantizes the *activations* to q8_0 before every q8_0/q4_0 matmul (and keeps
  an f16 KV cache), which these noisy tiny models (every weight perturbed, see
  ``tiny_family_model``; near-flat logits over 49k tokens) amplify more than
  test_llamacpp_backend's tiny Llama (~0.004). That the residual is arithmetic and not layout
  is shown separately: the same quantized weights written as f32 (``linear_as="f32"``) give
  the f32 tolerance.
- the real Gemma 3 270M (slow): see :func:`test_real_gemma3_270m_llamacpp_matches_torch`.

Tests run llama.cpp on 1 thread unless POCKETPEFT_THREADS is set (see test_llamacpp_backend).
"""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (pip install 'pocketpeft[llamacpp]')")

import pocketpeft as pp  # noqa: E402
from pocketpeft.config import ModelConfig  # noqa: E402
from pocketpeft.errors import PocketPeftError, UnsupportedModelError  # noqa: E402
from pocketpeft.export.gguf_target import check_llamacpp_support, write_base_gguf  # noqa: E402
from pocketpeft.families import FAMILIES  # noqa: E402
from pocketpeft.formats.gguf import NO_PERMUTATION  # noqa: E402
from pocketpeft.formats.gguf_lora import adapter_to_gguf  # noqa: E402
from pocketpeft.reference.loading import gguf_field, load_base, open_gguf  # noqa: E402
from pocketpeft.reference.model import dequantized_state_dict  # noqa: E402
from pocketpeft.reference.quant import to_gguf_blocks  # noqa: E402
from pocketpeft.text import pack_rows  # noqa: E402
from tests.conftest import tiny_family_model  # noqa: E402
from tests.helpers import CHAT  # noqa: E402

FAMS = ("qwen2", "qwen3", "gemma3_text")
QUANTS = ("f32", "q8_0", "q4_0")
LORA = dict(
    r=4,
    lora_alpha=8,
    init_lora_weights=False,  # the bundle's initial adapter is random, not zero
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
)
#: conftest's tiny Gemma 3 (window 6; layers sliding, full, sliding) as llama.cpp can run it:
#: queries scaled by head_dim (llama.cpp reads no query_pre_attn_scalar), and a local RoPE base
#: apart from llama.cpp's default 10000, so that ``rope.freq_base_swa`` is exercised
GEMMA = dict(
    query_pre_attn_scalar=32,
    rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 100000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
    },
)
F32_TOL = {"qwen2": 1e-4, "qwen3": 1e-4, "gemma3_text": 5e-3}
Q_TOL, Q_MEAN_TOL, Q_TOP1, Q_TOP3 = 0.1, 0.03, 0.85, 0.95
Q = gguf.GGMLQuantizationType


def _f32_llama(path):
    """llama.cpp over ``path`` with every position's logits and a float32 K/V cache."""
    import llama_cpp

    return llama_cpp.Llama(
        str(path),
        n_ctx=64,
        n_threads=int(_threads()),
        logits_all=True,
        verbose=False,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
    )


def _threads():
    return os.environ.get("POCKETPEFT_THREADS", "1")


@pytest.fixture(scope="module")
def hf_dir(family_hf_dir, tmp_path_factory, smollm2_tokenizer):
    """``hf_dir(model_type)``: conftest's tiny model folder (Gemma 3: with :data:`GEMMA`)."""
    made = {}

    def make(mt):
        if mt != "gemma3_text":
            return family_hf_dir(mt)
        if mt not in made:
            d = tmp_path_factory.mktemp("tiny_gemma3_llamacpp")
            tiny_family_model(mt, **GEMMA).save_pretrained(d, safe_serialization=True)
            smollm2_tokenizer.save(d / "tokenizer.json")
            made[mt] = d
        return made[mt]

    return make


@pytest.fixture(scope="module")
def bundle(hf_dir, tmp_path_factory):
    """``bundle(model_type, quant)``: the tiny model exported with targets torch + gguf."""
    made = {}

    def make(mt, quant):
        if (mt, quant) not in made:
            made[mt, quant] = pp.export(
                hf_dir(mt),
                tmp_path_factory.mktemp(f"{mt}_{quant}") / "b",
                quant=quant,
                lora=pp.LoraConfig(**LORA),
                targets=["torch", "gguf"],
                seq_len=16,
                batch_size=2,
            )
        return made[mt, quant]

    return make


def _open(b, backend):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POCKETPEFT_THREADS", _threads())
        return pp.runtime.open(b, backend=backend, need_train=False)


def _ids(b, n=16):
    return pack_rows(b.tokenizer(), CHAT, n)[0][:3]


def _random_adapter(b, seed):
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * 0.1).astype(np.float32) for k, s in b.manifest.trainable.items()}


def _check(got, want, quant, mt):
    """Assert the tolerance of ``quant`` (see the module docstring); return max |d| / max |want|."""
    got, want = got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1])
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    if quant == "f32":
        assert rel <= F32_TOL[mt], f"{mt} {quant}: max |dlogit| / max |logit| = {rel:.3g} > {F32_TOL[mt]}"
        return rel
    mean = float(np.abs(got - want).mean() / want.std())
    top1 = float((got.argmax(-1) == want.argmax(-1)).mean())
    top3 = float(np.mean([g in t for g, t in zip(got.argmax(-1), np.argsort(-want, -1)[:, :3])]))
    what = f"{mt} {quant}: max {rel:.3g}, mean {mean:.3g}, top-1 {top1:.3f}, in top-3 {top3:.3f}"
    assert rel <= Q_TOL and mean <= Q_MEAN_TOL and top1 >= Q_TOP1 and top3 >= Q_TOP3, what
    return rel


# ---- the files -------------------------------------------------------------------------------
def _tensors(reader):
    return {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("mt", FAMS)
def test_base_and_adapter_files_are_what_llama_cpp_reads(mt, bundle):
    """Architecture, hyperparameters under its prefix, exactly llama.cpp's tensor names for it;
    our q8_0 bytes unpermuted, Qwen2's biases, Gemma's norms as 1 + w; the file reads back to the
    bundle's weights; the LoRA adapter file has the base's architecture and no permutation."""
    b = bundle(mt, "q8_0")
    fam, a = FAMILIES[mt], b.manifest.arch
    arch = fam.gguf_arch
    info = json.loads((b.root / "gguf" / "info.json").read_text())
    assert info["architecture"] == arch and info["qk_permutation"] == NO_PERMUTATION and info["linear_type"] == "q8_0"
    path = b.root / info["base"]
    r = open_gguf(path)
    expect = {
        "general.architecture": arch,
        f"{arch}.block_count": a.num_hidden_layers,
        f"{arch}.context_length": 2048,
        f"{arch}.embedding_length": 64,
        f"{arch}.feed_forward_length": 128,
        f"{arch}.attention.head_count": 4,
        f"{arch}.attention.head_count_kv": 2,
        f"{arch}.rope.dimension_count": a.head_dim,
        f"{arch}.vocab_size": 49152,
    }
    if a.head_dim != 16 or fam.sliding_layers:  # qwen3 and gemma3: head_dim 32, apart from 64 / 4
        expect.update({f"{arch}.attention.key_length": a.head_dim, f"{arch}.attention.value_length": a.head_dim})
    if fam.sliding_layers:
        expect.update(
            {
                f"{arch}.attention.sliding_window": 6,
                f"{arch}.attention.sliding_window_pattern": 2,  # every 2nd layer full: sliding, full, sliding
            }
        )
        assert gguf_field(r, f"{arch}.rope.freq_base_swa") == pytest.approx(1000.0)
    assert {k: gguf_field(r, k) for k in expect} == expect
    assert gguf_field(r, f"{arch}.rope.freq_base") == pytest.approx(a.rope_theta)
    assert gguf_field(r, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(a.rms_norm_eps)

    # tensor names: llama.cpp's for this architecture (gguf-py's table of them), and all of them
    gg_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gg_arch]}
    ts = _tensors(r)
    stems = {n.rsplit(".", 1)[0].replace(f"blk.{n.split('.')[1]}.", "blk.{bid}.") for n in ts}
    assert stems <= known, stems - known
    want_stems = {"token_embd", "output_norm", "blk.{bid}.attn_norm", "blk.{bid}.ffn_norm"}
    want_stems |= {f"blk.{{bid}}.{s}" for s in ("attn_q", "attn_k", "attn_v", "attn_output")}
    want_stems |= {f"blk.{{bid}}.{s}" for s in ("ffn_gate", "ffn_up", "ffn_down")}
    if fam.qk_norm:
        want_stems |= {"blk.{bid}.attn_q_norm", "blk.{bid}.attn_k_norm"}
    if fam.sandwich_norms:
        want_stems |= {"blk.{bid}.post_attention_norm", "blk.{bid}.post_ffw_norm"}
    assert stems == want_stems
    n_bias = 3 * a.num_hidden_layers if fam.qkv_bias else 0
    assert sum(n.endswith(".bias") for n in ts) == n_bias

    # values: q8_0 blocks are ours, unpermuted; biases f32; Gemma's norms 1 + w
    from safetensors.torch import load_file

    from pocketpeft.reference.model import build_quantized

    model = build_quantized(a, "q8_0", load_file(str(b.path_of("torch/model.safetensors"))))
    for stem, hf in (("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("ffn_down", "mlp.down_proj")):
        mod = model.get_submodule(f"model.layers.1.{hf}")
        t = ts[f"blk.1.{stem}.weight"]
        assert t.tensor_type == Q.Q8_0
        assert np.array_equal(
            np.asarray(t.data), to_gguf_blocks({"qweight": mod.qweight, "scales": mod.scales}, "q8_0")
        )
        if fam.qkv_bias and stem != "ffn_down":
            bias = ts[f"blk.1.{stem}.bias"]
            assert bias.tensor_type == Q.F32 and np.array_equal(np.asarray(bias.data), mod.bias.numpy())
    layer = model.model.layers[-1]
    norms = {"attn_norm": layer.input_layernorm}
    if fam.sandwich_norms:
        norms.update(
            post_attention_norm=layer.post_attention_layernorm,
            ffn_norm=layer.pre_feedforward_layernorm,
            post_ffw_norm=layer.post_feedforward_layernorm,
        )
    else:
        norms["ffn_norm"] = layer.post_attention_layernorm
    if fam.qk_norm:
        norms.update(attn_q_norm=layer.self_attn.q_norm, attn_k_norm=layer.self_attn.k_norm)
    for stem, mod in norms.items():
        want = mod.weight.float().numpy() + np.float32(fam.norm_offset)
        assert np.array_equal(np.asarray(ts[f"blk.{a.num_hidden_layers - 1}.{stem}.weight"].data), want), stem
    assert np.array_equal(
        np.asarray(ts["output_norm.weight"].data), model.model.norm.weight.numpy() + np.float32(fam.norm_offset)
    )

    # our loader reads the file back to the bundle's weights (embedding through f16; Gemma's
    # norms through (1 + w) - 1 in float32)
    back = load_base(path)
    assert back.config.model_type == mt and back.config.layer_types == a.layer_types
    assert back.config.rope_local_base_freq == a.rope_local_base_freq
    ref = dequantized_state_dict(model)
    assert set(back.state_dict) == set(ref) - {"lm_head.weight"}
    for k, v in back.state_dict.items():
        want = ref[k].to(torch.float16).float() if k == "model.embed_tokens.weight" else ref[k]
        if fam.norm_offset and k.endswith("norm.weight"):
            torch.testing.assert_close(v, want, rtol=0, atol=1e-6)
        else:
            assert torch.equal(v, want), k

    # the LoRA adapter: the base's architecture, lora_b of q/k as they are (no permutation)
    tensors = _random_adapter(b, 3)
    out = adapter_to_gguf(tensors, b.root.parent / "a.gguf", b)
    ra = open_gguf(b.root.parent / "a.gguf")
    assert gguf_field(ra, "general.architecture") == arch and gguf_field(ra, "general.type") == "adapter"
    assert out["tensors"] == len(tensors) == 6 * 2 * a.num_hidden_layers
    ta = _tensors(ra)
    p = "base_model.model.model.layers.0.self_attn."
    for stem, hf in (("attn_q", "q_proj"), ("attn_k", "k_proj")):
        assert np.array_equal(ta[f"blk.0.{stem}.weight.lora_b"].data, tensors[p + hf + ".lora_B.weight"])
        assert np.array_equal(ta[f"blk.0.{stem}.weight.lora_a"].data, tensors[p + hf + ".lora_A.weight"])


# ---- llama.cpp vs torch ----------------------------------------------------------------------
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("mt", FAMS)
def test_llamacpp_matches_torch_with_hot_swapped_adapters(mt, quant, bundle):
    b = bundle(mt, quant)
    ids = _ids(b)
    t, lc = _open(b, "torch"), _open(b, "llamacpp")
    try:
        llm = lc.backend.llm
        assert lc.backend.adapter_attached  # the random initial adapter
        first = lc.backend.logits(ids)
        errs = {"adapter": _check(first, t.backend.logits(ids), quant, mt)}
        zero = {k: np.zeros(s, np.float32) for k, s in b.manifest.trainable.items()}
        for s in (t, lc):
            s.set_adapter_tensors(zero)
        assert not lc.backend.adapter_attached
        base = t.backend.logits(ids)
        errs["base"] = _check(lc.backend.logits(ids), base, quant, mt)
        a2 = _random_adapter(b, 2)
        for s in (t, lc):
            s.set_adapter_tensors(a2)
        want = t.backend.logits(ids)
        assert np.abs(want - base).max() > 0.5 * np.abs(want).max()  # the adapter really matters
        errs["second adapter"] = _check(lc.backend.logits(ids), want, quant, mt)
        lc.reset_adapter()  # back to the first: the same logits as before
        np.testing.assert_allclose(lc.backend.logits(ids), first, atol=1e-5 * np.abs(first).max())
        assert lc.backend.llm is llm  # hot-swapped, never reloaded
        print(f"\n{mt} {quant}: max |dlogit| / max |logit| " + ", ".join(f"{k} {v:.2g}" for k, v in errs.items()))
    finally:
        lc.backend.close()


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
@pytest.mark.parametrize("mt", FAMS)
def test_quantized_weights_as_f32_match_torch(mt, quant, bundle, tmp_path):
    """The bundle's quantized weights, written as the float32 they dequantize to: llama.cpp
    matches torch to the f32 tolerance, so what the quantized comparison leaves is ggml's
    activation quantization, not the layout."""

    b = bundle(mt, quant)
    t = _open(b, "torch")
    t.set_adapter_tensors({k: np.zeros(s, np.float32) for k, s in b.manifest.trainable.items()})  # base only
    info = write_base_gguf(t.backend.model, tmp_path / "x.f32.gguf", tokenizer=b.tokenizer(), linear_as="f32")
    assert set(info["tensor_types"]) == {"f32"}
    llm = _f32_llama(tmp_path / "x.f32.gguf")
    try:
        ids = _ids(b)[0].tolist()
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    _check(got, t.backend.logits(np.array([ids]))[0], "f32", mt)


def test_gemma3_f32_error_is_ggmls_fp16_gelu_table(bundle, monkeypatch):
    """With torch's GELU rounded the way ggml's fp16 lookup table rounds it, the f32 Gemma error
    falls from ~1e-3 to ~1e-4 of the logit scale: nothing else differs."""
    import torch.nn.functional as F

    b = bundle("gemma3_text", "f32")
    ids = _ids(b)
    t, lc = _open(b, "torch"), _open(b, "llamacpp")
    try:
        got = lc.backend.logits(ids)
    finally:
        lc.backend.close()
    plain = t.backend.logits(ids)
    gelu = F.gelu

    def gelu_fp16_table(x, approximate="none"):  # ggml_vec_gelu_f32 / ggml_vec_geglu_f32 on CPU
        y = gelu(x.half().float(), approximate=approximate).half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))

    monkeypatch.setattr(F, "gelu", gelu_fp16_table)
    emulated = t.backend.logits(ids)
    scale = np.abs(plain).max()
    e_plain, e_emul = np.abs(got - plain).max() / scale, np.abs(got - emulated).max() / scale
    print(f"\ngemma3 f32: plain {e_plain:.2g}, fp16 GELU emulated {e_emul:.2g}")
    assert e_emul <= 1e-3 and e_emul < e_plain


def test_gemma3_sliding_window_through_the_kv_cache(bundle):
    """Decoding past the window on llama.cpp's (sliding-window) KV cache, truncating, another
    user of the context in between, and branches: each equals evaluating the whole sequence."""
    b = bundle("gemma3_text", "f32")
    lc = _open(b, "llamacpp")
    try:
        be = lc.backend
        ids = _ids(b, 24)
        row = ids[0].tolist()
        full = be.logits(ids[:1])[0]
        tol = 1e-3 * np.abs(full).max()
        d = be.decoder()
        np.testing.assert_allclose(d.extend(row[:10]), full[:10], atol=tol)
        d.truncate(4)
        step = np.concatenate([d.extend([tok]) for tok in row[4:20]])
        np.testing.assert_allclose(step, full[4:20], atol=tol)
        be.logits(ids[1:2])
        np.testing.assert_allclose(d.extend(row[20:24]), full[20:24], atol=tol)
        seqs = [row[:14] + [t] for t in range(300, 305)] + [row[:14] + [303, 400]]
        got = be.branch_logits(seqs)
        for s, g in zip(seqs, got):
            want = be.logits(np.array([s]))[0, -1]
            np.testing.assert_allclose(g, want, atol=1e-3 * np.abs(want).max())
    finally:
        be.close()


@pytest.mark.parametrize(
    ("layers", "pattern"),
    [(("full", "sliding", "sliding"), [False, True, True]), (("sliding",) * 3, 4), (("full",) * 3, None)],
    ids=["per-layer-pattern", "all-sliding", "no-window"],
)
def test_gemma3_layer_layouts(layers, pattern, tmp_path, smollm2_tokenizer):
    """Other Gemma 3 layer layouts llama.cpp must run as written: no period (the pattern as one
    bool per layer), every layer sliding (period 4 for 3 layers) and none (no window keys at
    all: llama.cpp's plain-attention Gemma 3 graph). f32, straight from the reference model."""

    from pocketpeft.reference.model import build_from_float

    tiny_family_model("gemma3_text", **GEMMA, layer_types=[f"{t}_attention" for t in layers]).save_pretrained(
        tmp_path / "hf", safe_serialization=True
    )
    smollm2_tokenizer.save(tmp_path / "hf" / "tokenizer.json")
    loaded = load_base(tmp_path / "hf")
    model = build_from_float(loaded.config, loaded.state_dict, "f32")
    write_base_gguf(model, tmp_path / "g.f32.gguf", tokenizer=smollm2_tokenizer, embedding="f32")
    r = open_gguf(tmp_path / "g.f32.gguf")
    assert gguf_field(r, "gemma3.attention.sliding_window_pattern", None) == pattern
    assert (gguf_field(r, "gemma3.attention.sliding_window", None) is None) == (pattern is None)
    del r
    llm = _f32_llama(tmp_path / "g.f32.gguf")
    try:
        ids = list(range(1000, 1020))
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0].numpy()
    _check(got, want, "f32", "gemma3_text")


# ---- what llama.cpp cannot run, and what we cannot read ---------------------------------------
def test_gemma3_query_scale_llamacpp_cannot_express_is_refused(family_hf_dir, tmp_path):
    """conftest's tiny Gemma scales queries by 24 ** -0.5 (query_pre_attn_scalar=24, head_dim
    32): llama.cpp hard-codes head_dim ** -0.5 for gemma3, so the gguf target refuses it rather
    than write a file llama.cpp would run differently; the export leaves nothing behind."""
    with pytest.raises(UnsupportedModelError, match=r"query_pre_attn_scalar is 24.*llama\.cpp"):
        pp.export(family_hf_dir("gemma3_text"), tmp_path / "b", quant="f32", targets=["torch", "gguf"], seq_len=16)
    assert not (tmp_path / "b").exists()
    # the 27B's 62 layers: llama.cpp scales by (hidden / heads) ** -0.5 instead
    kw = dict(vocab_size=256, hidden_size=5376, intermediate_size=64, num_attention_heads=32, num_key_value_heads=16)
    check_llamacpp_support(
        ModelConfig(**kw, num_hidden_layers=62, head_dim=128, query_pre_attn_scalar=168, model_type="gemma3_text")
    )
    with pytest.raises(UnsupportedModelError, match="62-layer"):
        check_llamacpp_support(ModelConfig(**kw, num_hidden_layers=62, head_dim=128, model_type="gemma3_text"))
    check_llamacpp_support(ModelConfig(**kw, num_hidden_layers=2, head_dim=128, model_type="qwen3"))


def test_gguf_of_an_unsupported_architecture_is_refused(tmp_path):
    path = tmp_path / "tiny-phi3.gguf"
    w = gguf.GGUFWriter(str(path), "phi3")
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match=r"'phi3'.*supported: llama, qwen2, qwen3, gemma3"):
        load_base(path)


# ---- the real Gemma 3 270M --------------------------------------------------------------------
def _gemma3_270m() -> "str | Path":
    """``"gemma3-270m"`` when the named base can be had (pocketpeft.modelpkg), else the GGUF
    that ``POCKETPEFT_TEST_GEMMA3_GGUF`` names (the same file), else skip saying why."""
    try:
        from pocketpeft.modelpkg import gemma3_270m_path

        gemma3_270m_path()
        return "gemma3-270m"
    except (ImportError, PocketPeftError) as e:
        why = f"the gemma3-270m base is not available ({e})"
    alt = os.environ.get("POCKETPEFT_TEST_GEMMA3_GGUF")
    if alt and Path(alt).is_file():
        return Path(alt)
    pytest.skip(f"{why}; or set POCKETPEFT_TEST_GEMMA3_GGUF to the Gemma 3 270M GGUF")


def _gemma3_270m_file() -> Path:
    src = _gemma3_270m()
    if isinstance(src, Path):
        return src
    from pocketpeft.modelpkg import gemma3_270m_path

    return Path(gemma3_270m_path())


def test_k_quant_tensors_read_as_ggml_dequantizes_them():
    """load_base dequantizes GGUF tensors with gguf-py; for the real Gemma's k-quants (Q4_K,
    Q6_K) and Q5_0 that is bit for bit what ggml's own C dequantization gives."""
    import llama_cpp

    from pocketpeft.reference.loading import _hf_name

    libs = sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.*"))
    if not libs:
        pytest.skip("llama-cpp-python ships no libggml-base library here to compare with")
    r = open_gguf(_gemma3_270m_file())
    lib = ctypes.CDLL(str(libs[0]))
    for typ in (Q.Q4_K, Q.Q6_K, Q.Q5_0):
        t = next(t for t in r.tensors if t.tensor_type == typ)
        assert _hf_name(t.name, FAMILIES["gemma3_text"]).startswith("model.layers.")
        ours = gguf.quants.dequantize(t.data, typ).astype(np.float32)  # what _load_gguf does
        raw = np.ascontiguousarray(np.asarray(t.data))
        c = np.empty(ours.size, np.float32)
        fn = getattr(lib, f"dequantize_row_{typ.name.lower().replace('_k', '_K')}")
        fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
        fn(raw.ctypes.data, c.ctypes.data, ours.size)
        assert np.array_equal(c.reshape(ours.shape), ours), t.name


GEMMA_TEXT = (
    "The quick brown fox jumps over the lazy dog. Gemma is a family of lightweight, state-of-the-art "
    "open models built from the same research and technology used to create the Gemini models."
)


def _kl_top1(got, want):
    def logsoftmax(x):
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lw, lg = logsoftmax(want), logsoftmax(got)
    kl = (np.exp(lw) * (lw - lg)).sum(-1)
    return float(kl.mean()), float((got.argmax(-1) == want.argmax(-1)).mean())


@pytest.mark.slow
def test_real_gemma3_270m_llamacpp_matches_torch(tmp_path):
    """Gemma 3 270M exported at q4_0 with an adapter on its top two layers: llama.cpp vs torch
    on a 40-token text, with the bundle's adapter, the base alone and a second adapter.

    llama.cpp runs the bundle's q4_0 bytes against q8_0-quantized activations (torch: float32),
    so agreement is statistical. Measured: mean KL(torch || llama.cpp) 0.030-0.042 nats per
    position, top-1 agreement 82.5-90% (the second adapter itself moves the distribution by KL
    1.1). For scale, our f32-dequantized model vs llama.cpp on the original Q4_K_M file: 0.005,
    92%. Asserted: mean KL <= 0.1, top-1 >= 75%. (The same weights written as f32 match torch to
    0.2% of the logit scale over 700 tokens, past the 512-token window.)"""
    b = pp.export(
        _gemma3_270m(),
        tmp_path / "b",
        quant="q4_0",
        lora=pp.LoraConfig(
            r=4,
            lora_alpha=8,
            init_lora_weights=False,
            target_modules=["q_proj", "v_proj"],
            layers_to_transform=[16, 17],
        ),
        targets=["torch", "gguf"],
        seq_len=16,
        batch_size=1,
    )
    info = json.loads((b.root / "gguf" / "info.json").read_text())
    assert info["architecture"] == "gemma3" and info["tokenizer"].startswith("copied from")
    t, lc = _open(b, "torch"), _open(b, "llamacpp")
    try:
        ids = t.tokenizer.encode(GEMMA_TEXT)
        assert 30 <= len(ids) <= 50
        stats = {"initial adapter": _kl_top1(lc.logits(ids), t.logits(ids))}
        zero = {k: np.zeros(s, np.float32) for k, s in b.manifest.trainable.items()}
        for s in (t, lc):
            s.set_adapter_tensors(zero)
        base = t.logits(ids)
        stats["base"] = _kl_top1(lc.logits(ids), base)
        rng = np.random.default_rng(1)
        a2 = {k: (rng.standard_normal(s) * 0.2).astype(np.float32) for k, s in b.manifest.trainable.items()}
        for s in (t, lc):
            s.set_adapter_tensors(a2)
        want = t.logits(ids)
        stats["second adapter"] = _kl_top1(lc.logits(ids), want)
        effect = _kl_top1(base, want)[0]
        print("\ngemma3-270m q4_0, KL / top-1: " + ", ".join(f"{k} {v[0]:.3g} / {v[1]:.3f}" for k, v in stats.items()))
        print(f"second adapter's own effect: KL {effect:.3g}")
        assert all(kl <= 0.1 and top1 >= 0.75 for kl, top1 in stats.values()), stats
        assert effect > 10 * stats["second adapter"][0]  # the adapter changes the distribution
    finally:
        lc.backend.close()
