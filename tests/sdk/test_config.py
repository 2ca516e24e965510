import json

import peft
import pytest

from pocketpeft.config import LoraConfig, ModelConfig, QuantFormat, as_lora_config
from pocketpeft.errors import ConfigError


def test_lora_config_mirrors_peft_and_round_trips():
    pc = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["v_proj", "q_proj"], use_rslora=True)
    ours = as_lora_config(pc)
    assert (ours.r, ours.lora_alpha, ours.lora_dropout, ours.use_rslora) == (4, 8, 0.1, True)
    assert sorted(ours.target_modules) == ["q_proj", "v_proj"]
    assert ours.scaling == pytest.approx(8 / 2)
    back = ours.to_peft()
    assert isinstance(back, peft.LoraConfig) and back.r == 4 and set(back.target_modules) == {"q_proj", "v_proj"}
    assert LoraConfig.from_dict(json.loads(json.dumps(ours.to_dict()))) == ours
    assert as_lora_config({"r": 2, "target_modules": "q_proj,k_proj"}).target_modules == ["q_proj", "k_proj"]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"r": 0}, "positive integer"),
        ({"lora_alpha": float("nan")}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "dropout"),
        ({"target_modules": ["attn"]}, "unknown module"),
        ({"target_modules": []}, "empty"),
        ({"bias": "all"}, "bias"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ],
)
def test_lora_config_rejects_bad_values(kw, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(**kw)
    with pytest.raises(ValueError):
        LoraConfig(**kw)


def test_unsupported_peft_options_are_named():
    with pytest.raises(ConfigError, match="use_dora"):
        as_lora_config(peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ConfigError, match="regex"):
        as_lora_config(peft.LoraConfig(r=4, target_modules=".*proj"))


def test_quant_format_and_model_config_validation():
    assert QuantFormat.parse("Q4_0") is QuantFormat.Q4_0
    with pytest.raises(ConfigError, match="q4_0"):
        QuantFormat.parse("int3")
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        ModelConfig(
            vocab_size=10,
            hidden_size=64,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=3,
        )
