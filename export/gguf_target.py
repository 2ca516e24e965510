"""Target ``gguf``: the quantized base as a llama.cpp model, ``gguf/base.<type>.gguf``.

What the file holds (``gguf/info.json`` records it per bundle):

- architecture ``Family.gguf_arch`` (``llama``, ``qwen2``, ``qwen3``, ``gemma3``) with every
  hyperparameter llama.cpp reads under that prefix (``<arch>.block_count``, ``context_length``,
  ``embedding_length``, ``feed_forward_length``, ``attention.head_count`` / ``head_count_kv``,
  ``rope.freq_base``, ``attention.layer_norm_rms_epsilon``, ``rope.dimension_count``,
  ``vocab_size``; ``attention.key_length`` / ``value_length`` when head_dim isn't
  hidden / heads, and always for Gemma 3, whose sliding layers add ``attention.sliding_window``,
  ``attention.sliding_window_pattern`` (the period of the full layers, or one bool per layer)
  and ``rope.freq_base_swa``), and the tokenizer: a GGUF
  source's ``tokenizer.*`` metadata copied verbatim, otherwise rebuilt from ``tokenizer.json``
  (gpt2 byte-level BPE: tokens, merges, token types, pre-tokenizer, special ids).
- the family's tensors under llama.cpp's names (:func:`pocketpeft.formats.gguf.block_stems`):
  Qwen2's q/k/v biases (``blk.N.attn_q.bias``, f32), the q/k norms (``attn_q_norm`` /
  ``attn_k_norm``) of Qwen3 and Gemma 3, Gemma's four norms (``attn_norm``,
  ``post_attention_norm``, ``ffn_norm``, ``post_ffw_norm``) written as ``1 + w`` as llama.cpp's
  converter does (we keep Gemma's ``w``).
- a model llama.cpp would run differently whatever the file says is refused with
  :class:`UnsupportedModelError` (:func:`check_llamacpp_support`: a Gemma 3 attention scale
  other than llama.cpp's fixed one).
- frozen linears in the bundle's own quantization where GGUF has it: ``q4_0`` / ``q8_0`` are
  *our* buffers laid out by :func:`pocketpeft.reference.quant.to_gguf_blocks` (byte-identical blocks, so
  llama.cpp and the torch backend run the same frozen bytes); ``f16`` / ``f32`` as such.
  ``nf4`` has no GGUF type: its dequantized weights are written as ``f16`` (default, closest to
  the torch backend's values) or ``q8_0`` (``GgufOptions(nf4="q8_0")``: half the size).
- for Llama only, Q and K rows permuted back into llama.cpp's interleaved-pair RoPE order (the
  inverse of what :mod:`pocketpeft.reference.loading` undoes on load), also on quantized rows:
  blocks run along a row. llama.cpp runs the other families' RoPE in HF's rotate-half order.
- ``token_embd`` (and ``output`` when untied; tied models have no ``output.weight``):
  ``q8_0`` when that reproduces our float32 embedding exactly (a base that came from a q8_0
  GGUF, like SmolLM2), else ``f32`` for f32 bundles and ``f16`` otherwise. Norms are ``f32``.
- optional passthrough (``export(..., gguf=GgufOptions(passthrough=True))``, or
  ``write_base_gguf(..., passthrough=True)``): when the base came from a GGUF, its own quantized
  tensors (e.g. SmolLM2's Q4_1) are copied through verbatim instead. llama.cpp then runs the
  source's bytes, no longer the bundle's, so llama.cpp/torch parity becomes approximate.

LoRA adapters are not part of the base: :func:`pocketpeft.formats.gguf_lora.adapter_to_gguf`
converts a PEFT adapter to a GGUF LoRA adapter, and the llamacpp backend hot-swaps those.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pocketpeft.config import ModelConfig, QuantFormat
from pocketpeft.errors import ConfigError, UnsupportedModelError
from pocketpeft.formats.gguf import (  # noqa: F401 (re-exported)
    ARCH,
    DIR,
    HF_TO_GGUF,
    INFO,
    INFO_BASE,
    NO_PERMUTATION,
    PERMUTATION,
    GgufOptions,
    base_path,
    block_stems,
    gguf_name,
    permute_rows,
    permuted_heads,
    writing_gguf,
)
from pocketpeft.reference.model import CausalLM, linear_names
from pocketpeft.reference.quant import QuantLinear, dequantize, quantize, to_gguf_blocks

from .protocol import ExportContext

_FILE_TYPE = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED = 1, 3, 4, 5


# ---- tensors --------------------------------------------------------------------------------
def _linear_tensor(layer: QuantLinear, nf4_as: str, linear_as: str = "native") -> tuple[np.ndarray, str]:
    """(array for GGUFWriter, type name) of a frozen linear: our bytes for q4_0/q8_0/f16/f32, or
    with ``linear_as="f32"`` the exact float32 values they dequantize to."""
    fmt = layer.fmt
    bufs = {k: getattr(layer, k) for k in ("qweight", "scales", "weight", "absmax") if hasattr(layer, k)}
    if fmt in (QuantFormat.Q4_0, QuantFormat.Q8_0) and linear_as == "native":
        return to_gguf_blocks(bufs, fmt), fmt.value
    w = layer.dequantized_weight(torch.float32).detach().cpu()
    if fmt is QuantFormat.F32 or linear_as == "f32":
        return w.numpy(), "f32"
    if fmt is QuantFormat.NF4 and nf4_as == "q8_0":
        return to_gguf_blocks(quantize(w, QuantFormat.Q8_0), QuantFormat.Q8_0), "q8_0"
    return w.to(torch.float16).numpy(), "f16"


def _embedding_tensor(w: torch.Tensor, linear_type: str, choice: str) -> tuple[np.ndarray, str]:
    """token_embd / output: f32 beside f32 linears; otherwise exact q8_0 when lossless ("auto"), else
    f16. (llama.cpp multiplies by a q8_0 output matrix with 8-bit activations: not for an f32 file.)"""
    w = w.detach().float().cpu().contiguous()
    if choice == "f32" or (choice == "auto" and linear_type == "f32"):
        return w.numpy(), "f32"
    if choice in ("auto", "q8_0") and w.shape[1] % 32 == 0:
        bufs = quantize(w, QuantFormat.Q8_0)
        if choice == "q8_0" or torch.equal(dequantize(bufs, QuantFormat.Q8_0, tuple(w.shape)), w):
            return to_gguf_blocks(bufs, QuantFormat.Q8_0), "q8_0"
    return w.to(torch.float16).numpy(), "f16"


def _norm(module: Any, offset: float) -> np.ndarray:
    """A norm's weight as llama.cpp applies it: ``w``, or ``offset + w`` for Gemma (whose norms we
    store as ``w`` and apply as ``1 + w``; llama.cpp's converter stores ``1 + w``)."""
    w = module.weight.detach().float()
    return (w + offset if offset else w).numpy()


def _model_tensors(model: CausalLM, arch: ModelConfig, nf4_as: str, embedding: str, linear_as: str = "native"):
    """Yield (gguf name, array, type name) for every base tensor of ``arch``'s family: the
    linears (Q/K rows permuted for Llama) and their biases (Qwen2: f32), the norms (Gemma's
    ``1 + w``), the embedding and the untied output."""
    fam = arch.family
    lin_type = None
    for hf in linear_names(arch):
        mod = model.get_submodule(hf)
        layer = getattr(mod, "base_layer", mod)
        if not isinstance(layer, QuantLinear):
            raise UnsupportedModelError(f"{hf} is a {type(layer).__name__}, expected a frozen QuantLinear")
        arr, typ = _linear_tensor(layer, nf4_as, linear_as)
        lin_type = lin_type or typ
        name = gguf_name(hf, fam)
        heads = permuted_heads(name, arch)
        yield name, (permute_rows(arr, heads) if heads else arr), typ
        if layer.bias is not None:
            b = layer.bias.detach().float().cpu().numpy()
            yield gguf_name(hf, fam, "bias"), (permute_rows(b, heads) if heads else b), "f32"
    norms = [*fam.norm_names(), *(("self_attn.q_norm", "self_attn.k_norm") if fam.qk_norm else ())]
    for i, layer in enumerate(model.model.layers):
        for hf in norms:
            yield gguf_name(f"model.layers.{i}.{hf}", fam), _norm(layer.get_submodule(hf), fam.norm_offset), "f32"
    yield "output_norm.weight", _norm(model.model.norm, fam.norm_offset), "f32"
    arr, typ = _embedding_tensor(model.model.embed_tokens.weight, lin_type, embedding)
    yield "token_embd.weight", arr, typ
    if not arch.tie_word_embeddings:
        arr, typ = _embedding_tensor(model.lm_head.weight, lin_type, embedding)
        yield "output.weight", arr, typ


def _passthrough_tensors(reader: Any, arch: ModelConfig) -> dict[str, Any]:
    """Quantized source tensors that can stand in for ours verbatim (already in llama.cpp's layout)."""
    import gguf

    from pocketpeft.reference.loading import expected_shapes

    float_types = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16)
    ours = {}
    for k, shape in expected_shapes(arch).items():
        if len(shape) == 2:
            ours[gguf_name(k[: -len(".weight")], arch.family)] = shape
    out = {}
    for t in reader.tensors:
        if (
            t.name in ours
            and t.tensor_type not in float_types
            and tuple(int(s) for s in reversed(t.shape.tolist())) == tuple(ours[t.name])
        ):
            out[t.name] = t
    return out


# ---- metadata -------------------------------------------------------------------------------
class _Packed(bytes):
    """A metadata value already in GGUF's encoding (type tag included), copied from a reader."""


def _writer(path: Path, arch: str = ARCH) -> Any:
    """A ``gguf.GGUFWriter`` that packs string / int32 arrays in one go (gguf-py packs the ~100k
    vocabulary entries one struct.pack at a time: seconds per export). Same bytes."""
    import struct

    import gguf

    V = gguf.GGUFValueType

    class _Writer(gguf.GGUFWriter):
        def _pack_val(self, val, vtype, add_vtype, sub_type=None):  # noqa: ANN001 - gguf-py's signature
            if isinstance(val, _Packed) and add_vtype:
                return bytes(val)
            if vtype == V.ARRAY and self.endianess == gguf.GGUFEndian.LITTLE and isinstance(val, (list, tuple)) and val:
                head = struct.pack("<I", V.ARRAY) if add_vtype else b""
                if sub_type in (None, V.STRING) and all(isinstance(v, str) for v in val):
                    enc = [v.encode("utf-8") for v in val]
                    body = b"".join(b for e in enc for b in (struct.pack("<Q", len(e)), e))
                    return head + struct.pack("<IQ", V.STRING, len(val)) + body
                if sub_type in (None, V.INT32) and all(type(v) is int for v in val):
                    return head + struct.pack("<IQ", V.INT32, len(val)) + np.asarray(val, dtype="<i4").tobytes()
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return _Writer(str(path), arch)


def _sliding(arch: ModelConfig) -> bool:
    """Whether ``arch`` has sliding-window layers (Gemma 3)."""
    return arch.family.sliding_layers and any(arch.is_sliding(i) for i in range(arch.num_hidden_layers))


def _swa_pattern(arch: ModelConfig) -> int | list[bool]:
    """``attention.sliding_window_pattern`` for ``arch``: the period ``p`` when every ``p``-th
    layer is full and the others slide (Gemma 3: 6; all sliding: one more than the layers), as
    llama.cpp's ``set_swa_pattern(p)`` lays it out and converters write it; otherwise one bool
    per layer (True: sliding), which llama.cpp reads too."""
    sliding = [arch.is_sliding(i) for i in range(arch.num_hidden_layers)]
    for p in range(2, len(sliding) + 2):
        if sliding == [(i + 1) % p != 0 for i in range(len(sliding))]:
            return p
    return sliding


def check_llamacpp_support(arch: ModelConfig) -> None:
    """Raise :class:`UnsupportedModelError` when llama.cpp would run ``arch`` differently from
    the reference model whatever the file says.

    Gemma 3: llama.cpp scales queries by ``head_dim ** -0.5`` (``(hidden / heads) ** -0.5`` for a
    62-layer model, Gemma 3 27B) and reads no key that says otherwise, so
    ``query_pre_attn_scalar`` must be that number. (The window, which layers slide and their
    RoPE base are written as ``gemma3.attention.sliding_window`` / ``sliding_window_pattern`` /
    ``rope.freq_base_swa``, which llama.cpp reads.)"""
    if not arch.family.sliding_layers:
        return
    n = arch.num_hidden_layers
    assumed = arch.hidden_size // arch.num_attention_heads if n == 62 else arch.head_dim
    scalar = arch.query_pre_attn_scalar or arch.head_dim
    if scalar != assumed:
        why = "hidden_size / num_attention_heads for its 62-layer model" if n == 62 else "head_dim"
        raise UnsupportedModelError(
            f"the gguf target cannot carry this {arch.model_type} model: its query_pre_attn_scalar is {scalar:g}, "
            f"but llama.cpp's {arch.family.gguf_arch} scales attention by {assumed}**-0.5 ({why}) and reads no "
            "setting for it, so llama.cpp would compute different logits"
        )


def _add_hparams(w: Any, arch: ModelConfig, linear_type: str) -> None:
    import gguf

    fam = arch.family

    w.add_type(gguf.GGUFType.MODEL)
    w.add_block_count(arch.num_hidden_layers)
    w.add_context_length(arch.max_position_embeddings)
    w.add_embedding_length(arch.hidden_size)
    w.add_feed_forward_length(arch.intermediate_size)
    w.add_head_count(arch.num_attention_heads)
    w.add_head_count_kv(arch.num_key_value_heads)
    w.add_rope_freq_base(float(arch.rope_theta))
    w.add_layer_norm_rms_eps(float(arch.rms_norm_eps))
    w.add_rope_dimension_count(arch.head_dim)
    if arch.head_dim * arch.num_attention_heads != arch.hidden_size or fam.sliding_layers:
        w.add_key_length(arch.head_dim)
        w.add_value_length(arch.head_dim)
    if _sliding(arch):
        # the window, which layers slide and their RoPE base, all written out: llama.cpp's gemma3
        # defaults (every 6th layer full, local base 10000) are only what Gemma 3 happens to use
        w.add_sliding_window(arch.sliding_window)
        w.add_sliding_window_pattern(_swa_pattern(arch))
        w.add_rope_freq_base_swa(float(arch.rope_local_base_freq or arch.rope_theta))
    w.add_vocab_size(arch.vocab_size)
    if linear_type in _FILE_TYPE:
        w.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPE[linear_type]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
_STRING, _ARRAY = 8, 9


def _tokenizer_kv(path: Path) -> list[tuple[str, int, int | None, bytes]]:
    """Every ``tokenizer.*`` metadata entry of a GGUF as (key, type, item type, encoded value with
    its type tag). A direct walk over the KV section: gguf.GGUFReader takes seconds to parse
    a 49k-token vocabulary into numpy views, this takes milliseconds."""
    import mmap
    import struct

    from pocketpeft.errors import CorruptFileError

    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            if bytes(buf[:4]) != b"GGUF":
                raise CorruptFileError(f"{path} is not a GGUF file")
            (n_kv,) = struct.unpack_from("<Q", buf, 16)
            pos, out = 24, []

            def skip(vtype: int, pos: int) -> int:
                if vtype in _SCALAR_SIZE:
                    return pos + _SCALAR_SIZE[vtype]
                if vtype == _STRING:
                    return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
                if vtype == _ARRAY:
                    itype, n = struct.unpack_from("<IQ", buf, pos)
                    pos += 12
                    if itype in _SCALAR_SIZE:
                        return pos + n * _SCALAR_SIZE[itype]
                    for _ in range(n):
                        pos = skip(itype, pos)
                    return pos
                raise CorruptFileError(f"{path}: unknown GGUF metadata type {vtype}")

            for _ in range(n_kv):
                (klen,) = struct.unpack_from("<Q", buf, pos)
                key = bytes(buf[pos + 8 : pos + 8 + klen]).decode("utf-8")
                pos += 8 + klen
                (vtype,) = struct.unpack_from("<I", buf, pos)
                end = skip(vtype, pos + 4)
                if key.startswith("tokenizer."):
                    sub = struct.unpack_from("<I", buf, pos + 4)[0] if vtype == _ARRAY else None
                    out.append((key, vtype, sub, bytes(buf[pos:end])))
                pos = end
        except (struct.error, UnicodeDecodeError) as e:
            raise CorruptFileError(f"{path}: truncated or corrupt GGUF metadata: {e}") from e
        finally:
            buf.release()
    return out


def _copy_tokenizer_kv(w: Any, path: Path) -> None:
    """Copy every ``tokenizer.*`` field of the GGUF at ``path`` verbatim (types and bytes)."""
    import gguf

    for key, vtype, sub, raw in _tokenizer_kv(path):
        w.add_key_value(key, _Packed(raw), gguf.GGUFValueType(vtype), None if sub is None else gguf.GGUFValueType(sub))


def _detect_pre(tok: Any) -> str | None:
    """The llama.cpp pre-tokenizer name whose splitting matches ``tok``'s, or None."""
    from pocketpeft.tokenizer import _PRE_TOKENIZERS

    pre = tok.hf.pre_tokenizer
    if pre is None:
        return None
    sample = "Hello world! It's 2024:  123456 cats\n\n\tdon't   stop… Ünïcödé 北京 x1y22 ' ok'"
    got = [p for p, _ in pre.pre_tokenize_str(sample)]
    for name in ("smollm", "gpt-2", "llama-bpe"):
        if [p for p, _ in _PRE_TOKENIZERS[name][0]().pre_tokenize_str(sample)] == got:
            return name
    return None


def _add_tokenizer_from_json(w: Any, tok: Any, vocab_size: int) -> dict[str, Any]:
    """gpt2 tokenizer metadata from a ``tokenizers`` BPE, the way convert_hf_to_gguf lays it out."""
    spec = json.loads(tok.to_json_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise UnsupportedModelError(
            f"the bundle tokenizer is a {model.get('type')!r} model; the gguf target "
            "writes byte-level BPE (gpt2) tokenizers only"
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    vocab = tok.hf.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    added = tok.hf.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(max(vocab_size, tok.vocab_size)):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(_TOKEN_UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(
                _TOKEN_NORMAL if i not in added else _TOKEN_CONTROL if added[i].special else _TOKEN_USER_DEFINED
            )
    pre = _detect_pre(tok)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre or "default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for add, v in (
        (w.add_bos_token_id, tok.bos_id),
        (w.add_eos_token_id, tok.eos_id),
        (w.add_unk_token_id, tok.unk_id),
        (w.add_pad_token_id, tok.pad_id),
    ):
        if v is not None:
            add(v)
    with_special = tok.hf.encode("a", add_special_tokens=True).ids
    w.add_add_bos_token(bool(tok.bos_id is not None and with_special[:1] == [tok.bos_id]))
    return {
        "tokenizer": "rebuilt from tokenizer.json",
        "tokenizer_pre": pre or "default",
        **(
            {}
            if pre
            else {
                "tokenizer_note": "pre-tokenizer not recognised; llama.cpp's own text "
                "tokenization may differ (pocketpeft feeds token ids)"
            }
        ),
    }


# ---- the writer -----------------------------------------------------------------------------
def write_base_gguf(
    model: CausalLM,
    out_path: "str | os.PathLike",
    *,
    tokenizer: Any = None,
    source_gguf: "str | os.PathLike | None" = None,
    passthrough: bool = False,
    nf4_as: str = "f16",
    embedding: str = "auto",
    name: str = "pocketpeft-base",
    linear_as: str = "native",
) -> dict[str, Any]:
    """Write ``model`` (a :class:`CausalLM`, LoRA-injected or not; LoRA is left out) as a llama.cpp
    GGUF at ``out_path``, atomically (written beside it, then renamed).

    ``tokenizer``: a :class:`pocketpeft.tokenizer.Tokenizer`, used unless ``source_gguf`` (the GGUF
    the base was loaded from) is given, whose tokenizer metadata is then copied verbatim.
    ``passthrough``: copy ``source_gguf``'s own quantized tensors through (see the module doc).
    ``nf4_as``: ``"f16"`` or ``"q8_0"``, the GGUF type for nf4 linears. ``linear_as``: ``"native"``
    (the bundle's own q4_0/q8_0 bytes) or ``"f32"`` (the exact values they dequantize to: llama.cpp
    then multiplies in float32 rather than against 8-bit-quantized activations, as the torch
    backend does, at 4-8x the bytes read per token). ``embedding``: ``"auto"``,
    ``"f32"``, ``"f16"`` or ``"q8_0"``. Returns the info recorded in ``gguf/info.json``: tensor
    types and counts, embedding / linear types, tokenizer origin, passthrough, permutation.
    Raises :class:`ConfigError` for bad options, :class:`UnsupportedModelError` for a model or
    tokenizer the format can't carry.
    """
    import gguf

    from pocketpeft.reference.loading import open_gguf

    if nf4_as not in ("f16", "q8_0"):
        raise ConfigError(f"nf4_as must be 'f16' or 'q8_0', got {nf4_as!r}")
    if linear_as not in ("native", "f32"):
        raise ConfigError(f"linear_as must be 'native' or 'f32', got {linear_as!r}")
    if embedding not in ("auto", "f32", "f16", "q8_0"):
        raise ConfigError(f"embedding must be 'auto', 'f32', 'f16' or 'q8_0', got {embedding!r}")
    if passthrough and source_gguf is None:
        raise ConfigError(
            "passthrough=True needs source_gguf: only a base that came from a GGUF has tensors to pass through"
        )
    if tokenizer is None and source_gguf is None:
        raise ConfigError("write_base_gguf needs a tokenizer or the source_gguf to copy one from")
    arch = model.config
    check_llamacpp_support(arch)
    extra = _passthrough_tensors(open_gguf(source_gguf), arch) if passthrough else {}
    out_path = Path(out_path)
    counts: dict[str, int] = {}
    types: dict[str, str] = {}
    fam = arch.family
    with writing_gguf(out_path, make=_writer, arch=fam.gguf_arch) as w:
        w.add_name(name)
        tensors = list(_model_tensors(model, arch, nf4_as, embedding, linear_as))
        lin_type = tensors[0][2]
        _add_hparams(w, arch, lin_type if not extra else "")
        if source_gguf is not None:
            _copy_tokenizer_kv(w, Path(source_gguf))
            tok_info: dict[str, Any] = {"tokenizer": f"copied from {Path(source_gguf).name}"}
        else:
            tok_info = _add_tokenizer_from_json(w, tokenizer, arch.vocab_size)
        for tname, arr, typ in tensors:
            if tname in extra:
                t = extra[tname]
                arr, typ = np.asarray(t.data), t.tensor_type.name.lower()
                w.add_tensor(tname, arr, raw_shape=arr.shape, raw_dtype=t.tensor_type)
            elif typ in ("q4_0", "q8_0"):
                w.add_tensor(tname, arr, raw_shape=arr.shape, raw_dtype=gguf.GGMLQuantizationType[typ.upper()])
            else:
                w.add_tensor(tname, np.ascontiguousarray(arr))
            types[tname] = typ
            counts[typ] = counts.get(typ, 0) + 1
    embd = types["token_embd.weight"]
    return {
        "architecture": fam.gguf_arch,
        "linear_type": lin_type if not extra else "passthrough",
        "embedding_type": embd,
        "output": "tied" if arch.tie_word_embeddings else types["output.weight"],
        "norm_type": "f32",
        "tensor_types": counts,
        "qk_permutation": PERMUTATION if fam.gguf_permuted_qk else NO_PERMUTATION,
        "passthrough": bool(extra),
        "passthrough_tensors": len(extra),
        **tok_info,
    }


def _named_base_path(name: str) -> Path | None:
    """The GGUF file behind a named base (``"smollm2"``, ``"gemma3-270m"``), or None when it
    can't be had (the load that preceded the export found it, so this is the same file)."""
    from pocketpeft.errors import PocketPeftError
    from pocketpeft.reference.loading import default_model_path

    try:
        if name.lower() == "smollm2":
            return default_model_path()
        if name.lower() == "gemma3-270m":
            from pocketpeft.modelpkg import gemma3_270m_path

            return Path(gemma3_270m_path())
    except (ImportError, PocketPeftError):
        return None
    return None


def _source_gguf(ctx: ExportContext) -> Path | None:
    """The GGUF file the base was loaded from, when it was one (and still has the recorded hash).

    ExportContext carries no source, so it is read from what export() already staged: the
    initial adapter records the source and its sha256."""
    from safetensors import safe_open

    from pocketpeft.reference.loading import NAMED_BASES, sha256_files

    src = getattr(ctx, "source", None)
    want = None
    staged = ctx.stage / "adapter"
    cfg_path, w_path = staged / "adapter_config.json", staged / "adapter_model.safetensors"
    if cfg_path.is_file() and w_path.is_file():
        if src is None:
            name = json.loads(cfg_path.read_text(encoding="utf-8")).get("base_model_name_or_path") or ""
            src = name[len("pocketpeft:") :] if name.startswith("pocketpeft:") else None
        with safe_open(str(w_path), framework="pt") as f:
            want = (f.metadata() or {}).get("pocketpeft.base_sha256")
    if not src:
        return None
    path = _named_base_path(src) if src.lower() in NAMED_BASES else Path(src)
    if path is None or not path.is_file():
        return None
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            return None
    if want and sha256_files([path]) != want:
        return None
    return path


class GgufTarget:
    name = "gguf"

    def export(self, ctx: ExportContext) -> dict[str, str]:
        """Write ``gguf/base.<type>.gguf`` and ``gguf/info.json``; return the gguf-py version and
        the GGUF types used. Options: ``ctx.gguf`` (:class:`GgufOptions`: ``linear``, ``nf4``,
        ``passthrough``; see :func:`write_base_gguf`)."""
        from importlib.metadata import version

        from pocketpeft.tokenizer import Tokenizer

        opts = getattr(ctx, "gguf", None) or GgufOptions()
        passthrough, nf4_as, linear_as = opts.passthrough, opts.nf4.value, opts.linear.value
        source = _source_gguf(ctx)
        if passthrough and source is None:
            raise ConfigError("GgufOptions.passthrough=True needs a base that came from a GGUF file")
        (ctx.stage / DIR).mkdir(parents=True, exist_ok=True)
        tmp = ctx.stage / DIR / "base.gguf"
        info = write_base_gguf(
            ctx.model,
            tmp,
            tokenizer=Tokenizer.from_file(ctx.stage / "tokenizer.json"),
            source_gguf=source,
            passthrough=passthrough,
            nf4_as=nf4_as,
            linear_as=linear_as,
        )
        kind = "mixed" if passthrough else info["linear_type"]
        rel = base_path(kind)
        tmp.rename(ctx.stage / rel)
        info = {
            INFO_BASE: rel,
            "bundle_quant": ctx.quant.value,
            **info,
            "adapters": "PEFT adapters convert with pocketpeft.formats.gguf_lora.adapter_to_gguf",
        }
        if ctx.quant is QuantFormat.NF4:
            info["note"] = (
                f"nf4 has no GGUF type: linears are the nf4 weights dequantized and stored as {info['linear_type']}"
            )
        (ctx.stage / INFO).write_text(json.dumps(info, indent=2) + "\n")
        return {
            "gguf": version("gguf"),
            "gguf.linear_type": info["linear_type"],
            "gguf.embedding_type": info["embedding_type"],
        }


TARGET = GgufTarget()
