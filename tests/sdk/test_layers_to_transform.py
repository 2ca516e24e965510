"""LoRA on chosen decoder layers (peft's ``layers_to_transform``): config validation, adapters that
move both ways between pocketpeft and the real peft, the exporter's ``layers`` and the CLI flags."""

import json

import numpy as np
import peft
import pytest
import torch

import pocketpeft as pp
from pocketpeft.adapter import CONFIG_NAME, load_adapter
from pocketpeft.config import LINEAR_MODULES, LoraConfig, as_lora_config, parse_layers, personal_lora
from pocketpeft.errors import AdapterShapeError, ConfigError
from tests.helpers import hf_model_from_backend, peft_logits

#: all seven linears of layer 1 only, with a random (non-zero) B so the adapter changes the logits
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=list(LINEAR_MODULES), init_lora_weights=False)
TEXT = "are you coming to the game tonight or not"


def _keys(layers, modules=LINEAR_MODULES):
    return {
        f"base_model.model.model.layers.{i}.{'self_attn' if m[0] in 'qkvo' else 'mlp'}.{m}.lora_{ab}.weight"
        for i in layers
        for m in modules
        for ab in "AB"
    }


# ---------------------------------------------------------------------------- config
def test_layers_are_normalized_and_round_trip():
    assert LoraConfig().layers_to_transform is None and LoraConfig().split_layer() == 0
    assert LoraConfig(layers_to_transform=3).layers_to_transform == [3]
    cfg = LoraConfig(layers_to_transform=(7, 2, 7, np.int64(5)))
    assert cfg.layers_to_transform == [2, 5, 7] and cfg.split_layer() == 2
    assert LoraConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    cfg.check_layers(8)
    back = cfg.to_peft()
    assert back.layers_to_transform == [2, 5, 7] and back.layers_pattern is None
    one = peft.LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=4)
    assert as_lora_config(one).layers_to_transform == [4]
    assert as_lora_config(back).layers_to_transform == [2, 5, 7]


@pytest.mark.parametrize("bad", [[], "1,2", [1.0], [-1], [True], {1: 2}])
def test_bad_layers_are_config_errors_naming_the_field(bad):
    with pytest.raises(ConfigError, match="LoraConfig.layers_to_transform"):
        LoraConfig(layers_to_transform=bad)


def test_check_layers_names_the_bad_indices_and_the_range():
    with pytest.raises(ConfigError, match=r"layers_to_transform.*\[30, 31\].*0\.\.29"):
        LoraConfig(layers_to_transform=[1, 30, 31]).check_layers(30)
    LoraConfig(layers_to_transform=[29]).check_layers(30)


def test_layers_pattern_other_than_llamas_is_refused():
    other = peft.LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="h")
    with pytest.raises(ConfigError, match="layers_pattern"):
        as_lora_config(other)
    with pytest.raises(ConfigError, match="layers_pattern"):
        LoraConfig.from_dict({"r": 2, "layers_to_transform": [0], "layers_pattern": "blocks"})
    same = peft.LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="layers")
    assert as_lora_config(same).layers_to_transform == [0]


@pytest.mark.parametrize(
    "spec, want",
    [
        (None, None),
        ("all", None),
        (" ALL ", None),
        ("top8", list(range(22, 30))),
        ("top:3", [27, 28, 29]),
        ("top40", list(range(30))),
        ("22-29", list(range(22, 30))),
        ("3,5,7", [3, 5, 7]),
        ("0-2,29", [0, 1, 2, 29]),
        ("7, 5,5", [5, 7]),
        (4, [4]),
        ([9, 1], [1, 9]),
    ],
)
def test_parse_layers(spec, want):
    assert parse_layers(spec, 30) == want


@pytest.mark.parametrize("spec", ["", "top0", "top", "30", "0-30", "5-3", "-1", "1,,2", "a", "1;2", "top-3"])
def test_parse_layers_rejects_bad_specs(spec):
    with pytest.raises(ConfigError, match="layers_to_transform") as e:
        parse_layers(spec, 30)
    assert repr(spec) in str(e.value)


def test_parse_layers_rejects_out_of_range_lists():
    with pytest.raises(ConfigError, match=r"layers_to_transform.*\[30\]"):
        parse_layers([3, 30], 30)


def test_personal_preset():
    cfg = personal_lora(30)
    assert (cfg.r, cfg.lora_alpha, cfg.target_modules) == (16, 32, list(LINEAR_MODULES))
    assert cfg.layers_to_transform == list(range(22, 30)) and cfg.split_layer() == 22
    assert personal_lora(4).layers_to_transform == [0, 1, 2, 3]
    assert personal_lora(30, top=2).layers_to_transform == [28, 29]
    with pytest.raises(ConfigError, match="top"):
        personal_lora(30, top=0)


def test_inject_lora_only_in_chosen_layers_and_deterministic(tiny_hf_dir):
    from pocketpeft.reference.loading import load_base
    from pocketpeft.reference.lora import inject_lora, lora_state_dict
    from pocketpeft.reference.model import build_from_float

    loaded = load_base(tiny_hf_dir)

    def injected(cfg):
        return inject_lora(build_from_float(loaded.config, loaded.state_dict, "f32"), cfg, seed=3)

    one = LoraConfig(**{**LORA.to_dict(), "layers_to_transform": [1]})
    a, b = lora_state_dict(injected(one)), lora_state_dict(injected(one))
    assert set(a) == _keys([1])
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="layers_to_transform"):
        injected(LoraConfig(layers_to_transform=[2]))


# ---------------------------------------------------------------------------- peft interop
@pytest.fixture(scope="module")
def bundle(tiny_hf_dir, tmp_path_factory):
    return pp.export(tiny_hf_dir, tmp_path_factory.mktemp("b") / "b", quant="q8_0", lora=LORA, layers=[1], seq_len=16)


def test_pocketpeft_adapter_on_one_layer_loads_in_peft_with_same_logits(bundle, tmp_path):
    sess = pp.runtime.open(bundle, backend="torch")
    path = sess.save_adapter(tmp_path / "ours")
    assert json.loads((path / CONFIG_NAME).read_text())["layers_to_transform"] == [1]
    ids = np.array(sess.tokenizer.encode(TEXT))
    ours = sess.logits(ids)
    hf = hf_model_from_backend(sess.backend)
    base, theirs, pm = peft_logits(hf, path, ids)
    assert pm.peft_config["default"].layers_to_transform == [1]
    adapted = {n.split(".lora_A")[0] for n, _ in pm.named_parameters() if ".lora_A." in n}
    assert len(adapted) == 7 and all(".layers.1." in n for n in adapted)
    assert np.abs(ours - base).max() > 1e-3, "the adapter should change the logits"
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_peft_adapter_on_one_layer_loads_in_pocketpeft_with_same_logits(bundle, tmp_path):
    sess = pp.runtime.open(bundle, backend="torch")
    hf = hf_model_from_backend(sess.backend)
    torch.manual_seed(1)
    pcfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=list(LINEAR_MODULES),
        layers_to_transform=[1],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    ours = as_lora_config(pcfg)
    assert ours.layers_to_transform == [1] and set(ours.target_modules) == set(bundle.manifest.lora.target_modules)
    pm = peft.get_peft_model(hf, pcfg).eval()
    pm.save_pretrained(str(tmp_path / "from_peft"))
    assert load_adapter(tmp_path / "from_peft").config.layers_to_transform == [1]
    ids = np.array(sess.tokenizer.encode(TEXT))
    with torch.no_grad():
        theirs = pm(input_ids=torch.tensor(ids[None])).logits[0].numpy()
    before = sess.logits(ids)
    sess.load_adapter(tmp_path / "from_peft")
    ours = sess.logits(ids)
    assert np.abs(before - theirs).max() > 1e-3
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)

    # an adapter on every layer doesn't fit a bundle with LoRA on layer 1 only
    every = peft.get_peft_model(
        hf_model_from_backend(sess.backend), peft.LoraConfig(**{**pcfg.to_dict(), "layers_to_transform": None})
    )
    every.save_pretrained(str(tmp_path / "every"))
    with pytest.raises(AdapterShapeError, match="unexpected"):
        sess.load_adapter(tmp_path / "every")


# ---------------------------------------------------------------------------- export
def test_export_layers_spec_and_gguf_adapter(tiny_hf_dir, tmp_path):
    pytest.importorskip("gguf")
    from pocketpeft.formats.gguf_lora import adapter_to_gguf

    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], layers_to_transform=[0])
    b = pp.export(tiny_hf_dir, tmp_path / "b", quant="q8_0", lora=lora, layers="top1", targets="torch,gguf", seq_len=16)
    m = b.manifest
    assert m.lora.layers_to_transform == [1] and lora.layers_to_transform == [0], "the caller's config is untouched"
    assert set(m.trainable) == _keys([1], ["q_proj", "down_proj"])
    assert json.loads((b.root / "adapter" / CONFIG_NAME).read_text())["layers_to_transform"] == [1]
    assert set(load_adapter(b.root / "adapter").tensors) == set(m.trainable)
    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in m.trainable.items()}
    info = adapter_to_gguf(tensors, tmp_path / "a.gguf", b)
    assert info["tensors"] == 4
    import gguf

    names = {t.name for t in gguf.GGUFReader(str(tmp_path / "a.gguf")).tensors}
    assert names == {f"blk.1.{s}.weight.lora_{ab}" for s in ("attn_q", "ffn_down") for ab in "ab"}
    all_layers = pp.export(tiny_hf_dir, tmp_path / "c", quant="q8_0", lora=lora, layers="all", seq_len=16)
    assert all_layers.manifest.lora.layers_to_transform is None
    assert set(all_layers.manifest.trainable) == _keys([0, 1], ["q_proj", "down_proj"])


def test_export_rejects_missing_layers_before_writing(tiny_hf_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"layers_to_transform.*\[2\].*0\.\.1"):
        pp.export(tiny_hf_dir, tmp_path / "x", lora=LoraConfig(layers_to_transform=[0, 2]), seq_len=16)
    with pytest.raises(ConfigError, match="'5-6'"):
        pp.export(tiny_hf_dir, tmp_path / "y", layers="5-6", seq_len=16)
    assert list(tmp_path.iterdir()) == [], "nothing written, no staging directory left"


# ---------------------------------------------------------------------------- CLI
def test_cli_layers_and_personal_preset(tiny_hf_dir, tmp_path, capsys):
    from pocketpeft.apps.cli import main
    from pocketpeft.manifest import Bundle

    def export(*flags):
        code = main(["export", str(tiny_hf_dir), "--quant", "q8_0", "--seq-len", "16", "--json", *map(str, flags)])
        return code, json.loads(capsys.readouterr().out)

    code, out = export("--out", tmp_path / "p", "--preset", "personal")
    lora = Bundle(tmp_path / "p").manifest.lora
    assert code == 0 and out["trainable_tensors"] == 28  # top 8 of 2 layers: both, 7 linears each
    assert (lora.r, lora.lora_alpha, lora.target_modules, lora.layers_to_transform) == (
        16,
        32,
        list(LINEAR_MODULES),
        [0, 1],
    )
    code, out = export("--out", tmp_path / "q", "--preset", "personal", "--layers", "1", "--r", "4")
    lora = Bundle(tmp_path / "q").manifest.lora
    assert code == 0 and out["trainable_tensors"] == 14 and (lora.r, lora.lora_alpha) == (4, 32)
    code, out = export("--out", tmp_path / "r", "--layers", "0", "--target-modules", "v_proj")
    lora = Bundle(tmp_path / "r").manifest.lora
    assert code == 0 and out["trainable_tensors"] == 2 and (lora.r, lora.lora_alpha) == (8, 16)
    code, out = export("--out", tmp_path / "s", "--layers", "top2:")
    assert code == 2 and out["type"] == "ConfigError" and "top2:" in out["error"]
    assert not (tmp_path / "s").exists()
