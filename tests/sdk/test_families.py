"""Every model family against transformers, and adapters both ways through the real peft.

Tiny random-init models of each family (Llama, Qwen2, Qwen3, Gemma 3; see ``tiny_family_model``:
every weight perturbed, Gemma's window shorter than the test text) are loaded the way a user's
HF folder is, and our logits must equal transformers' in float32; adapters trained by pocketpeft
load in peft with the same logits, and adapters made by peft load in pocketpeft.
"""

from __future__ import annotations

import json

import numpy as np
import peft
import pytest
import torch

import pocketpeft as pp
from pocketpeft.errors import UnsupportedModelError
from pocketpeft.reference.loading import load_base
from pocketpeft.reference.model import build_from_float
from tests.conftest import FAMILIES, tiny_family_model
from tests.helpers import CHAT, hf_model_from_backend, peft_logits, torch_threads

TEXT = "are you coming to the game tonight or not, i was going to bring snacks for everyone"
ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.mark.parametrize("model_type", FAMILIES)
def test_logits_equal_transformers(model_type, family_hf_dir, smollm2_tokenizer):
    folder = family_hf_dir(model_type)
    hf = tiny_family_model(model_type)
    base = load_base(folder)
    assert base.config.model_type == model_type
    ours = build_from_float(base.config, base.state_dict, "f32")
    ids = torch.tensor([smollm2_tokenizer.encode(TEXT)])
    if model_type == "gemma3_text":
        assert ids.shape[1] > 2 * base.config.sliding_window, "the text must be longer than the window"
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
        first, kv = ours.forward_cached(ids[:, :9], 0, None)
        rest, _ = ours.forward_cached(ids[:, 9:], 9, kv)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(torch.cat([first, rest], 1).numpy(), want.numpy(), atol=1e-4, rtol=0)


def test_each_family_part_matters(family_hf_dir, smollm2_tokenizer):
    """The parity above can fail: dropping Gemma's embedding scale, its window, or Qwen2's biases
    moves the logits far beyond the tolerance."""
    ids = torch.tensor([smollm2_tokenizer.encode(TEXT)])
    gemma = load_base(family_hf_dir("gemma3_text"))
    want = tiny_family_model("gemma3_text")(ids).logits.detach()
    model = build_from_float(gemma.config, gemma.state_dict, "f32")
    model.model.embed_scale = 1.0
    assert (model(ids) - want).abs().max() > 1e-2
    cfg = pp.ModelConfig.from_dict({**gemma.config.to_dict(), "sliding_window": 10_000})
    assert (build_from_float(cfg, gemma.state_dict, "f32")(ids) - want).abs().max() > 1e-2
    qwen2 = load_base(family_hf_dir("qwen2"))
    sd = {k: (torch.zeros_like(v) if k.endswith(".bias") else v) for k, v in qwen2.state_dict.items()}
    want = tiny_family_model("qwen2")(ids).logits.detach()
    assert (build_from_float(qwen2.config, sd, "f32")(ids) - want).abs().max() > 1e-2


@pytest.fixture(scope="module")
def bundles(family_hf_dir, tmp_path_factory):
    """A q8_0 torch bundle per family with LoRA on every linear of the top layer only (the split
    device path's layout)."""
    out = {}
    for mt in FAMILIES:
        lora = pp.LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEARS, layers_to_transform=[1])
        out[mt] = pp.export(
            family_hf_dir(mt), tmp_path_factory.mktemp(mt) / "bundle", quant="q8_0", lora=lora, seq_len=32
        )
    return out


@pytest.mark.parametrize("model_type", FAMILIES)
def test_pocketpeft_adapter_loads_in_peft(model_type, bundles, tmp_path):
    sess = pp.runtime.open(bundles[model_type], backend="torch")
    assert sess.manifest.arch.model_type == model_type
    sess.train_config.lr = 1e-2
    rep = sess.train(CHAT, steps=4)
    assert not rep.skipped_steps and rep.losses[-1] < rep.losses[0]
    path = sess.save_adapter(tmp_path / "alice")
    ids = np.array(sess.tokenizer.encode(TEXT))
    ours = sess.logits(ids)
    hf = hf_model_from_backend(sess.backend)
    assert type(hf).__name__ == pp.families.FAMILIES[model_type].hf_class
    base, theirs, _ = peft_logits(hf, path, ids)
    assert np.abs(ours - base).max() > 1e-3, "the trained adapter should change the logits"
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    saved = json.loads((path / "adapter_config.json").read_text())
    assert saved["layers_to_transform"] == [1] and sorted(saved["target_modules"]) == sorted(ALL_LINEARS)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_peft_adapter_loads_in_pocketpeft(model_type, bundles, tmp_path):
    sess = pp.runtime.open(bundles[model_type], backend="torch")
    hf = hf_model_from_backend(sess.backend)
    torch.manual_seed(1)
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=ALL_LINEARS,
        layers_to_transform=[1],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    pm = peft.get_peft_model(hf, cfg).eval()
    pm.save_pretrained(str(tmp_path / "from_peft"))
    ids = np.array(sess.tokenizer.encode(TEXT))
    with torch.no_grad():
        theirs = pm(input_ids=torch.tensor(ids[None])).logits[0].numpy()
    before = sess.logits(ids)
    sess.load_adapter(tmp_path / "from_peft")
    assert np.abs(before - theirs).max() > 1e-3
    np.testing.assert_allclose(sess.logits(ids), theirs, atol=1e-4, rtol=0)


# ---- bad input ------------------------------------------------------------------------------
def _folder_with(tmp_path, family_hf_dir, source: str, changes: dict):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(family_hf_dir(source), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize(
    "model_type, changes, words",
    [
        ("qwen2", {"model_type": "phi3"}, ["'phi3'", "qwen3", "gemma3_text"]),
        ("gemma3_text", {"final_logit_softcapping": 30.0}, ["final_logit_softcapping=30.0"]),
        ("gemma3_text", {"hidden_activation": "relu"}, ["hidden_act='relu'"]),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 4}, ["sliding_window=4"]),
        ("qwen3", {"attention_bias": True}, ["attention_bias=True"]),
        ("gemma3_text", {"model_type": "gemma3", "text_config": {}}, ["multimodal", "gemma3_text"]),
    ],
)
def test_unsupported_options_name_themselves(model_type, changes, words, tmp_path, family_hf_dir):
    with pytest.raises(UnsupportedModelError) as e:
        load_base(_folder_with(tmp_path, family_hf_dir, model_type, changes))
    for w in words:
        assert w in str(e.value)


def test_stray_bias_is_refused(family_hf_dir):
    base = load_base(family_hf_dir("qwen3"))
    sd = dict(base.state_dict)
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(sd["model.layers.0.self_attn.q_proj.weight"].shape[0])
    with pytest.raises(UnsupportedModelError, match="biases a qwen3 model doesn't use"):
        build_from_float(base.config, sd, "f32")


def test_config_round_trips_to_transformers(family_hf_dir):
    """Our config of each family rebuilds the same transformers config (what peft sees)."""
    from pocketpeft.reference.hf import hf_config

    for mt in FAMILIES:
        cfg = load_base(family_hf_dir(mt)).config
        again = pp.ModelConfig.from_dict(hf_config(cfg).to_dict())
        assert again == cfg, mt


@pytest.mark.parametrize("model_type", FAMILIES)
def test_server_side_peft_backend_matches_device(model_type, bundles):
    """The server side (transformers + peft over the same bundle) computes what the device does."""
    dev = pp.runtime.open(bundles[model_type], backend="torch")
    server = pp.runtime.open(bundles[model_type], backend="peft")
    assert type(server.backend.model.base_model.model).__name__ == pp.families.FAMILIES[model_type].hf_class
    ids = np.array(dev.tokenizer.encode(TEXT))
    np.testing.assert_allclose(server.logits(ids), dev.logits(ids), atol=1e-4, rtol=0)


# ---- the big vocabulary -------------------------------------------------------------------
@pytest.mark.parametrize("weighted", [False, True])
def test_fused_head_loss_equals_full_logits(weighted, family_hf_dir, smollm2_tokenizer):
    """The sliced output projection + loss gives the same loss and LoRA gradients as
    cross-entropy over the full logits, with ignored labels and per-token weights; a 1% error
    in one token's coefficient shows."""
    from pocketpeft.reference.lora import inject_lora, lora_parameters
    from pocketpeft.reference.model import HeadInput, head_loss
    from pocketpeft.runtime.backends.step_graph import backward_loss

    base = load_base(family_hf_dir("gemma3_text"))
    model = build_from_float(base.config, base.state_dict, "f32")
    inject_lora(model, pp.LoraConfig(r=4, target_modules=ALL_LINEARS, init_lora_weights=False), seed=0)
    ids = torch.tensor([smollm2_tokenizer.encode(TEXT)[:16], smollm2_tokenizer.encode(CHAT[1] + " " + CHAT[2])[:16]])
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    labels[1, :3] = -100
    weights = torch.randn(labels.shape) if weighted else None
    n_tok = int((labels != -100).sum())
    results = []
    for fused in (False, True):
        model.fused_head = fused
        model.train()
        for p in lora_parameters(model):
            p.grad = None
        loss = backward_loss(model, ids, labels, 2, n_tok, weights)
        results.append((float(loss), [p.grad.clone() for p in lora_parameters(model)]))
    (l0, g0), (l1, g1) = results
    assert l0 == pytest.approx(l1, rel=1e-5)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    model.fused_head = True
    head = model(ids)
    assert isinstance(head, HeadInput)
    head = HeadInput(head.hidden.detach(), head.weight)
    with torch.no_grad():
        assert not isinstance(model(ids), HeadInput), "no gradients: logits"
        coeff = torch.ones(labels.shape) / n_tok
        exact = float(head_loss(head, labels, coeff, rows=5))
        coeff[0, 4] *= 1.01
        assert float(head_loss(head, labels, coeff, rows=5)) != pytest.approx(exact, rel=1e-6)
        model.eval()
        assert not isinstance(model(ids), HeadInput), "eval returns logits"


def test_q8_0_embedding_keeps_the_values(family_hf_dir, smollm2_tokenizer):
    """An embedding that came from Q8_0 blocks is kept as q8_0 (a quarter of the bytes) with the
    same logits; the built model's state dict rebuilds it (a bundle's weights), and transformers
    gets the same matrix back."""
    from pocketpeft.reference.model import build_quantized, dequantized_state_dict
    from pocketpeft.reference.quant import QuantEmbedding, dequantize, quantize

    base = load_base(family_hf_dir("gemma3_text"))
    sd = dict(base.state_dict)
    emb = sd["model.embed_tokens.weight"]
    assert not QuantEmbedding.holds_exactly(emb)
    sd["model.embed_tokens.weight"] = dequantize(quantize(emb, "q8_0"), "q8_0", tuple(emb.shape))
    assert QuantEmbedding.holds_exactly(sd["model.embed_tokens.weight"])
    plain = build_from_float(base.config, sd, "q8_0", quant_embedding=False)
    kept = build_from_float(base.config, sd, "q8_0", quant_embedding=True)
    assert isinstance(kept.model.embed_tokens, QuantEmbedding)
    state = kept.state_dict()
    assert state["model.embed_tokens.qweight"].dtype == torch.int8 and "model.embed_tokens.weight" not in state
    again = build_quantized(base.config, "q8_0", state)
    ids = torch.tensor([smollm2_tokenizer.encode(TEXT)])
    with torch.no_grad():
        want = plain(ids)
        torch.testing.assert_close(kept(ids), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(again(ids), want, atol=1e-5, rtol=0)
    back = dequantized_state_dict(again)
    assert torch.equal(back["model.embed_tokens.weight"], sd["model.embed_tokens.weight"])
    assert not any(k.startswith("model.embed_tokens.q") for k in back)


def test_torch_backend_with_fused_head_evaluates_and_trains_the_same(bundles):
    """A split torch session whose model uses the fused head (as 100k+ vocabularies do) gives the
    same eval before any step, the same training losses and the same eval after."""
    runs = []
    for fused in (False, True):
        sess = pp.runtime.open(bundles["gemma3_text"], backend="torch")
        sess.backend.model.fused_head = fused
        sess.train_config.lr = 1e-2
        before = sess.eval(CHAT[:6]).loss
        rep = sess.train(CHAT, steps=3)
        runs.append((before, rep.losses, sess.eval(CHAT[:6]).loss))
    (b0, l0, a0), (b1, l1, a1) = runs
    assert b0 == pytest.approx(b1, rel=1e-6) and a0 == pytest.approx(a1, rel=1e-5)
    assert l0 == pytest.approx(l1, rel=1e-5) and l0[-1] < l0[0]
