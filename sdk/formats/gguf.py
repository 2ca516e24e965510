"""The GGUF contract: llama.cpp's names and layout for a llama model's tensors (shared by the GGUF
base writer and the GGUF LoRA converter), the bundle's GGUF file names, and a checked reader.
No torch here: the llamacpp backend reads and converts on the device.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from pocketpeft.errors import CorruptFileError, ModelFileNotFoundError, UnsupportedModelError

_MISSING = object()

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


class _FastGGUFReader(gguf.GGUFReader):
    # Parsing ~100k vocabulary strings slices the file map ~700k times; plain ndarray views skip
    # np.memmap's per-slice bookkeeping (5.5 s -> 2.3 s for SmolLM2).
    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._data = value.view(np.ndarray)


def open_gguf(path: str | os.PathLike) -> Any:
    """A ``gguf.GGUFReader`` over ``path``. Raises :class:`ModelFileNotFoundError` or
    :class:`CorruptFileError` (bad magic, truncated metadata or tensor data)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileNotFoundError(f"GGUF file {path} does not exist")
    try:
        reader = _FastGGUFReader(path)
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"GGUF file {path} is truncated or corrupt: {e}") from e
    if end > path.stat().st_size or any(t.data.nbytes != t.n_bytes for t in reader.tensors):
        raise CorruptFileError(f"GGUF file {path} is truncated: its tensors need {end} bytes, "
                               f"it has {path.stat().st_size}")
    return reader


def gguf_field(reader: Any, key: str, default: Any = _MISSING) -> Any:
    """Value of metadata ``key`` as Python (str, int, float, bool or list); ``default`` when
    absent, else :class:`CorruptFileError` naming the key."""
    f = reader.fields.get(key)
    if f is None:
        if default is _MISSING:
            raise CorruptFileError(f"GGUF metadata has no {key!r}")
        return default
    try:
        return f.contents()
    except (UnicodeDecodeError, IndexError, ValueError) as e:
        raise CorruptFileError(f"GGUF metadata {key!r} is unreadable: {e}") from e
