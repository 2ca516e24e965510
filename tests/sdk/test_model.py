"""Our Llama module against transformers' LlamaForCausalLM (the independent reference)."""

import pytest
import torch
import transformers

from pocketpeft.config import ModelConfig, QuantFormat
from pocketpeft.errors import SequenceTooLongError, UnsupportedModelError
from pocketpeft.reference.model import build_from_float, build_quantized, dequantized_state_dict


def _tiny_hf(tie: bool, seed: int = 0):
    torch.manual_seed(seed)
    hc = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
        rope_theta=100000.0,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
    )
    return transformers.LlamaForCausalLM(hc).eval(), ModelConfig.from_dict(hc.to_dict())


@pytest.mark.parametrize("tie", [True, False])
def test_f32_logits_match_transformers(tie):
    ref, cfg = _tiny_hf(tie)
    ours = build_from_float(cfg, ref.state_dict(), "f32")
    ids = torch.randint(0, cfg.vocab_size, (3, 33))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "nf4", "f16"])
def test_quantized_model_equals_transformers_on_dequantized_weights(fmt):
    ref, cfg = _tiny_hf(True)
    ours = build_from_float(cfg, ref.state_dict(), fmt)
    ref.load_state_dict(dequantized_state_dict(ours))
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-4, rtol=1e-4)


def test_quantized_state_dict_round_trip():
    ref, cfg = _tiny_hf(False)
    a = build_from_float(cfg, ref.state_dict(), "q4_0")
    b = build_quantized(cfg, QuantFormat.Q4_0, a.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))
    assert not any(p.requires_grad for p in b.parameters())


def test_kv_cache_matches_full_forward():
    ref, cfg = _tiny_hf(True)
    m = build_from_float(cfg, ref.state_dict(), "q8_0")
    ids = torch.randint(0, cfg.vocab_size, (1, 20))
    with torch.no_grad():
        full = m(ids)
        l1, kv = m.forward_cached(ids[:, :7], 0, None)
        l2, kv = m.forward_cached(ids[:, 7:8], 7, kv)
        l3, kv = m.forward_cached(ids[:, 8:], 8, kv)
    torch.testing.assert_close(torch.cat([l1, l2, l3], 1), full, atol=1e-5, rtol=1e-5)
    assert kv[0][0].shape[2] == 20


def test_context_overflow_and_bad_weights_are_typed_errors():
    ref, cfg = _tiny_hf(True)
    m = build_from_float(cfg, ref.state_dict(), "f32")
    with pytest.raises(SequenceTooLongError, match="context of 128"):
        m(torch.zeros(1, 129, dtype=torch.long))
    sd = dict(ref.state_dict())
    sd["model.layers.1.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"][:, :32]
    with pytest.raises(UnsupportedModelError, match="up_proj"):
        build_from_float(cfg, sd, "f32")


def test_model_exports_with_torch_export():
    ref, cfg = _tiny_hf(True)
    m = build_from_float(cfg, ref.state_dict(), "q4_0")
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    ep = torch.export.export(m, (ids,))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(ids), m(ids))


@pytest.mark.slow
def test_smollm2_logits_match_transformers_gguf_loader(smollm2_path):
    """SmolLM2 through our GGUF loader and model vs transformers loading the same GGUF."""
    import os

    from pocketpeft.reference.loading import load_base

    base = load_base("smollm2")
    ours = build_from_float(base.config, base.state_dict, "f32")
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path), dtype=torch.float32
    ).eval()
    ids = torch.tensor([base.tokenizer.encode("hey are you coming to the game tonight? i think we should leave at 6")])
    with torch.no_grad():
        a, b = ours(ids), ref(ids).logits
    torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
    assert torch.equal(a.argmax(-1), b.argmax(-1))
