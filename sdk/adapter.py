"""Adapters in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Key names are exactly those ``peft`` writes for ``transformers.LlamaForCausalLM``, so our
adapters load with ``peft.PeftModel.from_pretrained`` and peft's load into pocketpeft. The base
model's hash travels in the safetensors header metadata (peft ignores it) so an adapter for
another base is refused.

Tensors are float32 numpy arrays: this module is on the device runtime's path, which needs no
torch (the ONNX Runtime and llama.cpp backends run without it). Saving also takes torch tensors.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .config import LoraConfig
from .errors import BaseModelMismatchError, CorruptFileError, ModelFileNotFoundError
from .fsutil import atomic_dir

#: peft's key prefix for a LoRA tensor of a ``PeftModel`` around a causal LM
PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass
class Adapter:
    """A LoRA adapter in memory: its config, PEFT-named float32 arrays and metadata."""

    config: LoraConfig
    tensors: dict[str, np.ndarray]
    base_sha256: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def as_float32(value: Any) -> np.ndarray:
    """A contiguous float32 numpy copy-or-view of a numpy array, array-like or torch tensor."""
    if hasattr(value, "detach"):  # a torch tensor; converted without importing torch here
        value = value.detach().cpu().float().numpy()
    return np.ascontiguousarray(value, dtype=np.float32)


def peft_config_dict(cfg: LoraConfig, base_name: str | None = None) -> dict:
    """The ``adapter_config.json`` content peft expects for this LoRA config."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "revision": None,
        "inference_mode": True,
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": sorted(cfg.target_modules),
        "fan_in_fan_out": False,
        "bias": cfg.bias,
        "use_rslora": cfg.use_rslora,
        "modules_to_save": None,
        "init_lora_weights": cfg.init_lora_weights,
        "layers_to_transform": None if cfg.layers_to_transform is None else list(cfg.layers_to_transform),
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    }


def save_adapter(adapter: Adapter, path: str | os.PathLike, base_name: str | None = None) -> Path:
    """Write ``adapter`` to the directory ``path`` atomically (staged, fsynced, renamed).

    Returns the path. Raises :class:`StoreError` if the location isn't writable; an existing
    adapter at ``path`` is only replaced once the new one is complete.
    """
    from safetensors.numpy import save_file

    meta = {"format": "pt", **{k: str(v) for k, v in adapter.metadata.items()}}
    if adapter.base_sha256:
        meta["pocketpeft.base_sha256"] = adapter.base_sha256
    path = Path(path)
    with atomic_dir(path) as stage:
        (stage / CONFIG_NAME).write_text(json.dumps(peft_config_dict(adapter.config, base_name), indent=2) + "\n")
        tensors = {k: as_float32(v) for k, v in adapter.tensors.items()}
        save_file(tensors, str(stage / WEIGHTS_NAME), metadata=meta)
    return path


def load_adapter(path: str | os.PathLike, expect_base_sha256: str | None = None) -> Adapter:
    """Read a PEFT adapter directory (ours or peft's).

    Raises :class:`ModelFileNotFoundError` if a file is missing, :class:`CorruptFileError` if
    one can't be parsed, :class:`BaseModelMismatchError` if the adapter records a different base
    hash than ``expect_base_sha256``.
    """
    from safetensors import safe_open

    path = Path(path)
    cfg_path, w_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise ModelFileNotFoundError(
                f"adapter file {p} not found (a PEFT adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME})"
            )
    try:
        cfg_dict = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(cfg_dict, dict) or cfg_dict.get("peft_type", "LORA") != "LORA":
        raise CorruptFileError(
            f"{cfg_path} is not a LoRA adapter config (peft_type={cfg_dict.get('peft_type')!r})"
            if isinstance(cfg_dict, dict)
            else f"{cfg_path} is not a JSON object"
        )
    cfg = LoraConfig.from_dict(cfg_dict)
    try:
        with safe_open(str(w_path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            bf16 = [k for k in f.keys() if f.get_slice(k).get_dtype() == "BF16"]
            tensors = _bf16_entries(w_path, bf16) if bf16 else {}
            tensors.update({k: as_float32(f.get_tensor(k)) for k in f.keys() if k not in tensors})
    except Exception as e:  # safetensors raises its own SafetensorError / OSError variants
        raise CorruptFileError(f"{w_path} is not a readable safetensors file: {e}") from e
    base = meta.pop("pocketpeft.base_sha256", None)
    if expect_base_sha256 and base and base != expect_base_sha256:
        raise BaseModelMismatchError(
            f"adapter {path} was trained on base {base[:12]}…, but this bundle's base is {expect_base_sha256[:12]}…"
        )
    return Adapter(cfg, tensors, base, meta)


def _bf16_entries(path: Path, keys: list[str]) -> dict[str, np.ndarray]:
    """float32 arrays of the file's bfloat16 tensors ``keys``, which numpy has no dtype for (peft writes
    them for adapters trained in bf16). The header layout is safetensors' own: an 8-byte
    little-endian length, a JSON header, then the data block its offsets point into."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        out = {}
        for k in keys:
            info = header[k]
            start, end = info["data_offsets"]
            f.seek(8 + n + start)
            raw = np.frombuffer(f.read(end - start), dtype="<u2")
            out[k] = (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])
    return out


def peft_key(key: str) -> str:
    """A LoRA tensor key as peft saves it: the ``.default.`` adapter-name infix of a live
    ``PeftModel``'s state dict (``...lora_A.default.weight``) dropped."""
    return key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def check_adapter_shapes(adapter: Adapter, expected: Mapping[str, list[int]], where: str) -> None:
    """Raise :class:`AdapterShapeError` unless ``adapter`` has exactly the expected PEFT keys and shapes."""
    from .errors import AdapterShapeError

    given = {peft_key(k): list(v.shape) for k, v in adapter.tensors.items()}
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    if missing or extra:
        raise AdapterShapeError(
            f"adapter {where} doesn't fit this bundle's LoRA layers: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})"
        )
    for k, shape in expected.items():
        if given[k] != list(shape):
            raise AdapterShapeError(f"adapter {where}: {k} has shape {given[k]}, this bundle expects {list(shape)}")
