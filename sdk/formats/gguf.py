"""The GGUF contract: llama.cpp's names and layout for the tensors of each model family's
architecture (``llama``, ``qwen2``, ``qwen3``, ``gemma3``; shared by the GGUF base writer and the
GGUF LoRA converter), the bundle's GGUF file names, and a checked reader.
No torch here: the llamacpp backend reads and converts on the device.
"""

from __future__ import annotations

import contextlib
import enum
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np

from pocketpeft.errors import ConfigError, CorruptFileError, ModelFileNotFoundError, UnsupportedModelError
from pocketpeft.families import FAMILIES, Family

_MISSING = object()

#: the bundle's gguf folder, and the file in it that describes the base (written by the gguf target)
DIR = "gguf"
INFO = f"{DIR}/info.json"
#: info.json key: bundle-relative path of the base GGUF (``gguf/base.<type>.gguf``)
INFO_BASE = "base"


def base_path(kind: str) -> str:
    """Bundle-relative path of the base GGUF whose linears are of type ``kind`` (``mixed`` for
    passthrough)."""
    return f"{DIR}/base.{kind}.gguf"


class GgufLinear(str, enum.Enum):
    """How the gguf target stores frozen linears."""

    NATIVE = "native"  # the bundle's own q4_0/q8_0 bytes
    F32 = "f32"  # their exact float32 values (llama.cpp then computes as torch does)


class GgufNf4(str, enum.Enum):
    """GGUF type for nf4 linears (GGUF has no nf4)."""

    F16 = "f16"
    Q8_0 = "q8_0"


def _enum_field(owner: str, field: str, kind: type[enum.Enum], value: Any) -> Any:
    try:
        return kind(value.strip().lower() if isinstance(value, str) and not isinstance(value, kind) else value)
    except ValueError:
        raise ConfigError(f"{owner}.{field} must be one of {[k.value for k in kind]}, got {value!r}") from None


@dataclass(frozen=True)
class GgufOptions:
    """Export options of the ``gguf`` target.

    ``linear``: ``"native"`` (default: the bundle's q4_0/q8_0 bytes) or ``"f32"``.
    ``nf4``: GGUF type of nf4 linears, ``"f16"`` (default) or ``"q8_0"``.
    ``passthrough``: copy a GGUF source's own quantized tensors verbatim (needs a GGUF base).
    Raises :class:`ConfigError` naming the field and its allowed values.
    """

    linear: GgufLinear | str = GgufLinear.NATIVE
    nf4: GgufNf4 | str = GgufNf4.F16
    passthrough: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "linear", _enum_field("GgufOptions", "linear", GgufLinear, self.linear))
        object.__setattr__(self, "nf4", _enum_field("GgufOptions", "nf4", GgufNf4, self.nf4))
        if not isinstance(self.passthrough, bool):
            raise ConfigError(f"GgufOptions.passthrough must be True or False, got {self.passthrough!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"linear": self.linear.value, "nf4": self.nf4.value, "passthrough": self.passthrough}


ARCH = "llama"  # the default architecture (Llama's); other families write ``Family.gguf_arch``
PERMUTATION = (
    "convert_hf_to_gguf LlamaModel.permute on attn_q (n_head) and attn_k (n_head_kv) rows: "
    "HF rotate-half order -> llama.cpp interleaved pairs"
)
#: what ``info.json`` records for the families whose RoPE llama.cpp runs in HF's order
NO_PERMUTATION = "none: llama.cpp runs this architecture's RoPE in HF's rotate-half (NEOX) order"

#: HF module suffix -> GGUF tensor stem of the linear layers, the same in every family
LINEAR_STEMS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def block_stems(fam: Family | None = None) -> dict[str, str]:
    """HF module suffix -> GGUF tensor stem of one block of family ``fam`` (default Llama), as
    llama.cpp names them: the linears, the norms (Llama's pre-MLP norm is ``ffn_norm``; Gemma's
    four are ``attn_norm``, ``post_attention_norm``, ``ffn_norm`` before the MLP and
    ``post_ffw_norm``) and the q/k norms (``attn_q_norm`` / ``attn_k_norm``)."""
    fam = fam or FAMILIES["llama"]
    out = {**LINEAR_STEMS, "input_layernorm": "attn_norm"}
    if fam.sandwich_norms:
        out.update(
            {
                "post_attention_layernorm": "post_attention_norm",
                "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm",
            }
        )
    else:
        out["post_attention_layernorm"] = "ffn_norm"
    if fam.qk_norm:
        out.update({"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"})
    return out


#: HF module suffix -> GGUF tensor stem, as llama.cpp names a llama block (:func:`block_stems`).
HF_TO_GGUF = block_stems()
_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(hf_module: str, fam: Family | None = None, kind: str = "weight") -> str:
    """GGUF tensor name of an HF module of family ``fam`` (default Llama):
    ``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q.weight`` (``kind="bias"``: ``.bias``)."""
    stems = HF_TO_GGUF if fam is None else block_stems(fam)
    if hf_module in _GLOBAL:
        return f"{_GLOBAL[hf_module]}.{kind}"
    parts = hf_module.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in stems:
        return f"blk.{int(parts[2])}.{stems[parts[3]]}.{kind}"
    arch = (fam or FAMILIES["llama"]).gguf_arch
    raise UnsupportedModelError(f"{hf_module!r} has no GGUF tensor name in a {arch} model")


def permuted_heads(gguf_tensor: str, arch: Any) -> int | None:
    """The head count whose rows llama.cpp's converter reorders in GGUF tensor ``gguf_tensor``
    (``blk.N.attn_q.*``: n_head, ``attn_k``: n_head_kv) for a model of config ``arch`` (a
    :class:`~pocketpeft.config.ModelConfig`); ``None`` for other tensors and for families whose
    RoPE llama.cpp runs in HF's order (every family but Llama)."""
    if not arch.family.gguf_permuted_qk:
        return None
    stem = gguf_tensor.split(".")[2] if gguf_tensor.startswith("blk.") and gguf_tensor.count(".") >= 3 else ""
    if stem == "attn_q":
        return arch.num_attention_heads
    if stem == "attn_k":
        return arch.num_key_value_heads
    return None


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp's interleaved pairs, per head (rows of any dtype:
    float weights or quantized block bytes, whose blocks run along a row)."""
    return np.ascontiguousarray(
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


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
        raise CorruptFileError(
            f"GGUF file {path} is truncated: its tensors need {end} bytes, it has {path.stat().st_size}"
        )
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


@contextlib.contextmanager
def writing_gguf(out_path: Path, make: Any = None, arch: str = ARCH) -> Iterator[Any]:
    """A ``gguf.GGUFWriter`` of architecture ``arch`` (or ``make(path, arch)``'s writer) over
    ``out_path``'s ``.partial`` sibling:
    the ``with`` body adds metadata and tensors; on leaving it the file is written and renamed over
    ``out_path``. If the body or the write fails, the partial file is deleted and ``out_path`` is
    left as it was."""
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".partial")
    w = make(tmp, arch) if make is not None else gguf.GGUFWriter(str(tmp), arch)
    try:
        yield w
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out_path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
