"""pocketpeft.export: turn a base model into a bundle (one module per target).

``export(base, out, ...)`` loads the base offline, quantizes the frozen linears, injects LoRA
with a fixed seed, writes the shared files (manifest, tokenizer, initial adapter) and each
target's files into a staging directory, then renames it into place: an export that fails or
is interrupted never leaves a half-written bundle where a good one was.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys
import time
import types
from pathlib import Path
from typing import Any, Iterable

from pocketpeft import __version__
from pocketpeft.config import LoraConfig, QuantFormat, as_lora_config
from pocketpeft.errors import ConfigError
from pocketpeft.manifest import MANIFEST_NAME, Bundle, Manifest
from pocketpeft.registry import TARGETS, load_module, target_entry

__all__ = ["export", "parse_targets"]


def parse_targets(targets: "str | Iterable[str] | None") -> list[str]:
    """Normalize ``"torch,onnx"`` or a list into known target names (``torch`` always included,
    it is the reference every other backend is checked against)."""
    if targets is None:
        names = ["torch"]
    elif isinstance(targets, str):
        names = [t.strip() for t in targets.split(",") if t.strip()]
    else:
        names = [str(t) for t in targets]
    for n in names:
        target_entry(n)
    return ["torch"] + [n for n in dict.fromkeys(names) if n != "torch"]


def export(base: "str | os.PathLike", out: "str | os.PathLike", quant: "str | QuantFormat" = "q4_0",
           lora: "LoraConfig | Any | None" = None, targets: "str | Iterable[str] | None" = None,
           seq_len: int = 64, batch_size: int = 8, seed: int = 0, progress: bool = False) -> Bundle:
    """Export ``base`` (``"smollm2"``, an HF model folder or a .gguf) to a bundle at ``out``.

    Returns the opened :class:`Bundle`. Raises :class:`ConfigError` for bad options (unknown
    quant/target, sequence length beyond the context), the loader's errors for a bad base, and
    leaves any existing bundle at ``out`` untouched if anything fails.
    """
    import torch

    from pocketpeft.adapter import Adapter, save_adapter
    from pocketpeft.fsutil import atomic_dir, sha256_file
    from pocketpeft.reference.loading import load_base
    from pocketpeft.reference.lora import inject_lora, lora_shapes, lora_state_dict
    from pocketpeft.reference.model import build_from_float

    from .protocol import ExportContext

    qfmt = QuantFormat.parse(quant)
    lcfg = as_lora_config(lora)
    names = parse_targets(targets)
    if not (isinstance(seq_len, int) and seq_len > 1) or not (isinstance(batch_size, int) and batch_size > 0):
        raise ConfigError(f"seq_len must be an integer > 1 and batch_size > 0, got {seq_len!r}, {batch_size!r}")
    t0 = time.perf_counter()
    loaded = load_base(base, progress=progress)
    if seq_len > loaded.config.max_position_embeddings:
        raise ConfigError(f"seq_len {seq_len} exceeds the base model's context of {loaded.config.max_position_embeddings}")
    with torch.no_grad():
        model = build_from_float(loaded.config, loaded.state_dict, qfmt, progress=progress)
    del loaded.state_dict
    inject_lora(model, lcfg, seed=seed)
    timings: dict[str, float] = {"load_quantize": time.perf_counter() - t0}
    out = Path(out)
    with atomic_dir(out) as stage:
        loaded.tokenizer.save(stage / "tokenizer.json")
        adapter = Adapter(lcfg, lora_state_dict(model), loaded.source_sha256, {"pocketpeft.seed": str(seed)})
        save_adapter(adapter, stage / "adapter", base_name=f"pocketpeft:{loaded.source}")
        ctx = ExportContext(model=model, arch=loaded.config, quant=qfmt, lora=lcfg, seq_len=seq_len,
                            batch_size=batch_size, stage=stage, progress=progress)
        target_info: dict[str, dict[str, Any]] = {}
        for name in names:
            t1 = time.perf_counter()
            toolchain = load_module(target_entry(name)).TARGET.export(ctx)
            timings[name] = time.perf_counter() - t1
            target_info[name] = {"toolchain": toolchain, "export_seconds": round(timings[name], 3)}
        files: dict[str, dict[str, Any]] = {}
        for p in sorted(stage.rglob("*")):
            if p.is_file():
                rel = p.relative_to(stage).as_posix()
                top = rel.split("/", 1)[0]
                files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size,
                              "target": top if top in target_info else "shared"}
        for name in target_info:
            target_info[name]["files"] = [r for r, i in files.items() if i["target"] == name]
        manifest = Manifest(
            base_source=loaded.source, base_sha256=loaded.source_sha256, arch=loaded.config, quant=qfmt,
            lora=lcfg, trainable=lora_shapes(model), seq_len=seq_len, batch_size=batch_size, files=files,
            targets=target_info, versions={"pocketpeft": __version__, **_toolchain_versions(target_info)},
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        )
        (stage / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    return Bundle(out)


def _toolchain_versions(target_info: dict[str, dict[str, Any]]) -> dict[str, str]:
    versions: dict[str, str] = {}
    for info in target_info.values():
        versions.update(info.get("toolchain", {}))
    return versions


def available_targets() -> list[str]:
    """Names of every registered export target."""
    return list(TARGETS)


class _ExportModule(types.ModuleType):
    """``pocketpeft.export`` is both this package and the function: calling the module calls
    :func:`export`, so ``pp.export(...)`` works without ``import pocketpeft`` loading the exporter."""

    __call__ = staticmethod(export)


sys.modules[__name__].__class__ = _ExportModule
