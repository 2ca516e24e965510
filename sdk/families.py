"""The model families pocketpeft runs, described as data.

Every family is the same decoder skeleton (embedding, N blocks of attention + gated MLP, final
norm, output projection) with the same linear-layer names; what differs is small and listed
here: the MLP's activation, q/k/v biases, RMSNorm on q and k, Gemma's extra norms around each
sub-block and its ``1 + weight`` norm convention, the embedding scale, and how llama.cpp's
converter stores q/k. The reference model (:mod:`pocketpeft.reference.model`), the loaders,
the GGUF writer and the transformers bridge all read a :class:`Family` rather than branching on
names, so a new family of this shape is one entry in :data:`FAMILIES`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class Family:
    """What one architecture family does differently from Llama."""

    #: ``model_type`` in a Hugging Face ``config.json`` (and in our bundle manifests)
    model_type: str
    #: the transformers causal-LM class and its config class (for the parity/peft bridge)
    hf_class: str
    hf_config_class: str
    #: ``general.architecture`` of a GGUF file of this family
    gguf_arch: str
    #: the MLP's gate activation: ``"silu"`` (SwiGLU) or ``"gelu_tanh"`` (GeGLU)
    activation: str = "silu"
    #: biases on q_proj/k_proj/v_proj (Qwen2)
    qkv_bias: bool = False
    #: RMSNorm over each head's q and k before RoPE (``self_attn.q_norm`` / ``k_norm``)
    qk_norm: bool = False
    #: norms on the output of attention and of the MLP too (Gemma's four norms per block)
    sandwich_norms: bool = False
    #: RMSNorm weights are stored as ``w`` and applied as ``1 + w`` (Gemma)
    norm_offset: float = 0.0
    #: embeddings are multiplied by ``sqrt(hidden_size)`` (Gemma)
    embed_scale: bool = False
    #: llama.cpp's converter reorders q/k rows for interleaved RoPE (Llama only)
    gguf_permuted_qk: bool = False
    #: alternating sliding-window and full attention layers with their own RoPE bases (Gemma 3)
    sliding_layers: bool = False

    def norm_names(self) -> tuple[str, ...]:
        """The per-block norm modules, in HF names (each ``[hidden]`` except q/k norms)."""
        names = ["input_layernorm", "post_attention_layernorm"]
        if self.sandwich_norms:
            names += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        return tuple(names)

    @property
    def mlp_norm(self) -> str:
        """The norm in front of the MLP: Llama calls it ``post_attention_layernorm``; Gemma has a
        norm by that name on the attention output and ``pre_feedforward_layernorm`` before the MLP."""
        return "pre_feedforward_layernorm" if self.sandwich_norms else "post_attention_layernorm"


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "LlamaForCausalLM", "LlamaConfig", "llama", gguf_permuted_qk=True),
        Family("mistral", "MistralForCausalLM", "MistralConfig", "llama", gguf_permuted_qk=True),
        Family("qwen2", "Qwen2ForCausalLM", "Qwen2Config", "qwen2", qkv_bias=True),
        Family("qwen3", "Qwen3ForCausalLM", "Qwen3Config", "qwen3", qk_norm=True),
        Family(
            "gemma3_text",
            "Gemma3ForCausalLM",
            "Gemma3TextConfig",
            "gemma3",
            activation="gelu_tanh",
            qk_norm=True,
            sandwich_norms=True,
            norm_offset=1.0,
            embed_scale=True,
            sliding_layers=True,
        ),
    )
}

#: GGUF ``general.architecture`` -> our model_type (llama.cpp writes Mistral as "llama")
GGUF_ARCHS: dict[str, str] = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}

#: other spellings of a model_type that describe the same text model
_ALIASES = {"gemma3": "gemma3_text"}


def family(model_type: str) -> Family:
    """The :class:`Family` of ``model_type``; raise :class:`UnsupportedModelError` naming it and
    the supported ones."""
    f = FAMILIES.get(_ALIASES.get(model_type, model_type))
    if f is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(FAMILIES)} "
            f"(GGUF architectures: {', '.join(GGUF_ARCHS)})"
        )
    return f
