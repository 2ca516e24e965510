"""PEFT LoRA adapter -> llama.cpp GGUF LoRA adapter, as llama.cpp's convert_lora_to_gguf.py writes one.

Layout llama.cpp expects (``llama-adapter.cpp``): ``general.type = "adapter"``,
``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32), ``general.architecture`` equal to
the base's (the family's ``gguf_arch``: ``llama``, ``qwen2``, ``qwen3``, ``gemma3``; llama.cpp
refuses an adapter of another architecture); per adapted weight ``blk.N.<stem>.weight.lora_a`` with ggml shape
``[in, r]`` and ``.lora_b`` with ``[r, out]``, i.e. exactly PEFT's ``lora_A.weight [r, in]`` and
``lora_B.weight [out, r]`` as numpy arrays. llama.cpp applies ``(alpha / r) * B @ A``; rsLoRA's
``alpha / sqrt(r)`` is carried by writing ``alpha = scaling * r``. For Llama, ``lora_b`` of
``attn_q`` / ``attn_k`` gets the same row permutation as the base's Q/K (its rows are the output
rows); ``lora_a`` acts on the input and is not permuted; the other families' Q/K are not
permuted at all. Tensors are float32. The tensor stems are the same for every family (the
linears' names don't differ).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pocketpeft.adapter import PEFT_PREFIX, Adapter, as_float32, check_adapter_shapes, load_adapter
from pocketpeft.config import LoraConfig, ModelConfig
from pocketpeft.errors import AdapterShapeError, ConfigError

from .gguf import LINEAR_STEMS, permute_rows, permuted_heads, writing_gguf

_PEFT_KEY = re.compile(
    re.escape(PEFT_PREFIX) + r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight"
)


def gguf_lora_name(peft_key: str) -> str:
    """``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` -> ``blk.0.attn_q.weight.lora_a``.
    The names are the same in every family. Raises :class:`AdapterShapeError` for a key that is
    not a LoRA tensor of a linear layer."""
    m = _PEFT_KEY.fullmatch(peft_key)
    stem = LINEAR_STEMS.get(f"{m.group(2)}.{m.group(3)}") if m else None
    if m is None or stem is None:
        raise AdapterShapeError(
            f"adapter tensor {peft_key!r} is not a LoRA tensor of a linear layer "
            f"(expected {PEFT_PREFIX}model.layers.N.self_attn.q_proj.lora_A.weight and the like)"
        )
    return f"blk.{int(m.group(1))}.{stem}.weight.lora_{m.group(4).lower()}"


def _as_adapter(adapter: Any, lora: LoraConfig | None) -> Adapter:
    if isinstance(adapter, Adapter):
        return adapter
    if isinstance(adapter, (str, os.PathLike)):
        return load_adapter(adapter)
    if isinstance(adapter, Mapping):
        if lora is None:
            raise ConfigError("a bare tensor mapping needs the LoRA config (pass the bundle manifest)")
        return Adapter(lora, dict(adapter))
    raise ConfigError(
        f"expected an Adapter, a PEFT adapter directory or a tensor mapping, got {type(adapter).__name__}"
    )


def adapter_to_gguf(
    adapter: "Adapter | str | os.PathLike | Mapping[str, Any]",
    out_path: "str | os.PathLike",
    manifest: Any = None,
    *,
    arch: ModelConfig | None = None,
    name: str = "pocketpeft-adapter",
) -> dict[str, Any]:
    """Convert a PEFT adapter (an :class:`Adapter`, an adapter directory, or a PEFT-keyed tensor
    mapping, which then takes the manifest's LoRA config) into a GGUF LoRA file at ``out_path``.

    ``manifest``: the bundle's :class:`~pocketpeft.manifest.Manifest` (or a :class:`Bundle`):
    gives the architecture (``general.architecture`` is the family's, as the base's must be),
    the head counts for Llama's Q/K permutation and the expected tensor shapes, which are
    checked. ``arch`` may replace it (no shape check then). Returns ``{"alpha", "r", "tensors"}``.
    Raises :class:`AdapterShapeError` for tensors that don't fit, :class:`ConfigError` for bad
    arguments, and the adapter loader's errors for a bad directory.
    """
    import gguf

    manifest = getattr(manifest, "manifest", manifest)  # a Bundle works too
    arch = arch or getattr(manifest, "arch", None)
    if arch is None:
        raise ConfigError("adapter_to_gguf needs the bundle manifest (or arch=) for the attention head counts")
    ad = _as_adapter(adapter, getattr(manifest, "lora", None))
    if manifest is not None and getattr(manifest, "trainable", None):
        check_adapter_shapes(ad, manifest.trainable, "for the GGUF conversion")
    ranks = {int(np.asarray(v).shape[0]) for k, v in ad.tensors.items() if ".lora_A" in k}
    if ranks != {ad.config.r}:
        raise AdapterShapeError(f"adapter lora_A ranks {sorted(ranks)} don't match its config r={ad.config.r}")
    alpha = float(ad.config.scaling * ad.config.r)
    out_path = Path(out_path)
    with writing_gguf(out_path, arch=arch.family.gguf_arch) as w:
        w.add_name(name)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for key in sorted(ad.tensors):
            t = ad.tensors[key]
            a = as_float32(t)
            gname = gguf_lora_name(key)
            heads = permuted_heads(gname, arch) if gname.endswith(".lora_b") else None
            if heads:
                a = permute_rows(a, heads)
            if not np.isfinite(a).all():
                raise AdapterShapeError(f"adapter tensor {key} holds NaN or inf values")
            w.add_tensor(gname, np.ascontiguousarray(a))
    return {"alpha": alpha, "r": ad.config.r, "tensors": len(ad.tensors)}
