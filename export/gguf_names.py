"""llama.cpp's names and layout for a llama model's tensors: what the GGUF base writer and the
GGUF LoRA converter share. No torch here: the llamacpp backend converts adapters on the device.
"""

from __future__ import annotations

import numpy as np

from pocketpeft.errors import UnsupportedModelError

ARCH = "llama"
PERMUTATION = ("convert_hf_to_gguf LlamaModel.permute on attn_q (n_head) and attn_k (n_head_kv) rows: "
               "HF rotate-half order -> llama.cpp interleaved pairs")

#: HF module suffix -> GGUF tensor stem, as llama.cpp names a llama block.
HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(hf_module: str) -> str:
    """GGUF tensor name of an HF module (``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q.weight``)."""
    if hf_module in _GLOBAL:
        return _GLOBAL[hf_module] + ".weight"
    parts = hf_module.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in HF_TO_GGUF:
        return f"blk.{int(parts[2])}.{HF_TO_GGUF[parts[3]]}.weight"
    raise UnsupportedModelError(f"{hf_module!r} has no GGUF tensor name in a llama model")


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp's interleaved pairs, per head (rows of any dtype:
    float weights or quantized block bytes, whose blocks run along a row)."""
    return np.ascontiguousarray(
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))
