"""The bridge to transformers: the ``*ForCausalLM`` class and config of a model's family.

The reference model keeps HF's names, so a state dict moves between the two as it is; this
module only picks the right classes (``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
``Qwen3ForCausalLM``, ``Gemma3ForCausalLM``) and builds them. Needs ``transformers``.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from pocketpeft.config import ModelConfig
from pocketpeft.errors import UnsupportedModelError


def _transformers() -> Any:
    from pocketpeft._deps import require

    return require("transformers", extra="peft")


def hf_config(cfg: ModelConfig) -> Any:
    """The transformers config object describing ``cfg`` (eager attention, so results do not
    depend on which kernels this machine has)."""
    tf = _transformers()
    conf = getattr(tf, cfg.family.hf_config_class)(**cfg.to_hf_dict())
    conf._attn_implementation = "eager"
    return conf


def hf_class(cfg: ModelConfig) -> type:
    """The transformers causal-LM class of ``cfg``'s family."""
    return getattr(_transformers(), cfg.family.hf_class)


def hf_model(cfg: ModelConfig, state_dict: Mapping[str, torch.Tensor] | None = None) -> Any:
    """A transformers model of ``cfg`` in float32, eval mode, on the CPU: random-init, or holding
    ``state_dict`` (HF names, e.g. :func:`~pocketpeft.reference.model.dequantized_state_dict`).
    Raises :class:`UnsupportedModelError` when the weights don't fit the class."""
    cls = hf_class(cfg)
    if state_dict is None:
        return cls(hf_config(cfg)).float().eval()
    with torch.device("meta"):
        model = cls(hf_config(cfg))
    sd = dict(state_dict)
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise UnsupportedModelError(
            f"weights don't fit transformers' {cls.__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if cfg.tie_word_embeddings:
        model.tie_weights()
    restore_meta_buffers(model, cfg)
    return model.float().eval()


def restore_meta_buffers(model: Any, cfg: ModelConfig) -> None:
    """Rebuild the buffers a model built on the meta device lacks (they are not in a state
    dict): the RoPE tables (the rotary module is made again from the config) and Gemma's
    embedding scale. Raises :class:`UnsupportedModelError` if a parameter or buffer is left unset."""
    conf = model.config
    for name, mod in list(model.named_modules()):
        if not any(b is not None and b.is_meta for b in mod._buffers.values()):
            continue
        if "rotary" in type(mod).__name__.lower():
            model.set_submodule(name, type(mod)(config=conf))
        elif "embed_scale" in mod._buffers:
            mod._buffers["embed_scale"] = torch.tensor(conf.hidden_size**0.5)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise UnsupportedModelError(
            f"weights leave {left[:5]} unset in transformers' {type(model).__name__} ({cfg.model_type})"
        )
