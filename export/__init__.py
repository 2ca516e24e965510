"""pocketpeft.export: turn a base model into a bundle (one module per target).

``export(base, out, ...)`` loads the base offline, quantizes the frozen linears, injects LoRA
with a fixed seed, writes the shared files (manifest, tokenizer, initial adapter) and each
target's files into a staging directory, then renames it into place: an export that fails or
is interrupted never leaves a half-written bundle where a good one was.

Target options are typed: ``export(..., onnx=OnnxOptions(rows=2, q4="int8"),
gguf=GgufOptions(linear="f32"))``; the manifest records them under ``options``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import sys
import time
import types
from pathlib import Path
from typing import Any, Iterable, Sequence

from pocketpeft import __version__
from pocketpeft.config import LoraConfig, QuantFormat, as_lora_config, parse_layers
from pocketpeft.errors import ConfigError, MissingDependencyError
from pocketpeft.formats.gguf import GgufOptions
from pocketpeft.formats.onnx import OnnxOptions
from pocketpeft.manifest import GENERAL_TEXT, MANIFEST_NAME, Bundle, Manifest, Split
from pocketpeft.registry import load_module, target_entry

__all__ = ["GgufOptions", "OnnxOptions", "export", "parse_targets"]

#: the chitchat sample shipped as ``general.txt`` when the caller gives none
GENERAL_TEXT_SAMPLE = {"n": 120, "seed": 7}


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


def export(
    base: "str | os.PathLike",
    out: "str | os.PathLike",
    quant: "str | QuantFormat" = "q4_0",
    lora: "LoraConfig | Any | None" = None,
    targets: "str | Iterable[str] | None" = None,
    seq_len: int = 64,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = False,
    *,
    onnx: OnnxOptions | None = None,
    gguf: GgufOptions | None = None,
    general_text: Sequence[str] | None = None,
    split: bool | None = None,
    layers: "str | Sequence[int] | None" = None,
    global_adapter: "str | os.PathLike | None" = None,
    global_slot: bool = False,
) -> Bundle:
    """Export ``base`` (``"smollm2"``, an HF model folder or a .gguf) to a bundle at ``out``.

    ``onnx`` / ``gguf``: those targets' options (defaults when ``None``), recorded in the
    manifest's ``options`` for the targets exported. ``general_text``: other people's messages
    shipped as ``general.txt`` for the Personalizer's general-text check; ``None`` takes a fixed
    sample of the chitchat corpus when it is installed (nothing otherwise), an empty sequence
    ships none.

    ``layers``: the decoder layers that get LoRA, as :func:`pocketpeft.config.parse_layers` reads
    them (``"all"``, ``"top8"``, ``"22-29"``, ``"0,5,7"`` or a list of ints), resolved against the
    loaded base; when given it overrides ``lora.layers_to_transform``. Layers the base doesn't have
    raise :class:`ConfigError` before anything is written.

    ``split``: when LoRA leaves the lower layers frozen (``lora.layers_to_transform`` starts
    above layer 0), each target that can writes the model in two parts: the frozen prefix as an
    inference graph and the LoRA layers as the training graph (the manifest's ``split``).
    ``None`` (default) splits whenever the layers allow it; ``False`` never does; ``True`` raises
    :class:`ConfigError` when the layers don't allow it.

    ``global_adapter``: a global adapter directory (:mod:`pocketpeft.global_adapter`, made by
    ``pocketpeft fleet``) of this base and LoRA shape, shipped as the bundle's ``global/``:
    every backend applies it frozen under the personal adapter. The onnx target's graphs then carry
    a frozen global slot (manifest ``global_slot``; executorch too) that a device can refill with a newer global
    adapter (:func:`pocketpeft.global_adapter.install_global`) without re-exporting.
    ``global_slot=True`` gives the graphs that slot (zeros) without shipping a global adapter, for
    one installed later.

    Returns the opened :class:`Bundle`. Raises :class:`ConfigError` for bad options (unknown
    quant/target, sequence length beyond the context, options of the wrong type),
    :class:`InputTextError` for unusable ``general_text``, the loader's errors for a bad base, and
    leaves any existing bundle at ``out`` untouched if anything fails.
    """
    import torch

    from pocketpeft.adapter import Adapter, save_adapter
    from pocketpeft.fsutil import atomic_dir, sha256_file
    from pocketpeft.reference.loading import load_base
    from pocketpeft.reference.lora import inject_lora, lora_shapes, lora_state_dict, set_global_lora
    from pocketpeft.reference.model import build_from_float

    from .protocol import ExportContext

    qfmt = QuantFormat.parse(quant)
    lcfg = as_lora_config(lora)
    names = parse_targets(targets)
    onnx_opts, gguf_opts = _option(onnx, OnnxOptions, "onnx"), _option(gguf, GgufOptions, "gguf")
    general = _general_lines(general_text)
    if not (isinstance(seq_len, int) and seq_len > 1) or not (isinstance(batch_size, int) and batch_size > 0):
        raise ConfigError(f"seq_len must be an integer > 1 and batch_size > 0, got {seq_len!r}, {batch_size!r}")
    t0 = time.perf_counter()
    loaded = load_base(base, progress=progress)
    if seq_len > loaded.config.max_position_embeddings:
        raise ConfigError(
            f"seq_len {seq_len} exceeds the base model's context of {loaded.config.max_position_embeddings}"
        )
    if layers is not None:
        chosen = parse_layers(layers, loaded.config.num_hidden_layers)
        lcfg = dataclasses.replace(lcfg, layers_to_transform=chosen)
    lcfg.check_layers(loaded.config.num_hidden_layers)
    with torch.no_grad():
        model = build_from_float(loaded.config, loaded.state_dict, qfmt, progress=progress)
    del loaded.state_dict
    inject_lora(model, lcfg, seed=seed)
    split_layer = _split_layer(split, lcfg)
    glob = None
    if global_adapter is not None:  # checked against this base and LoRA shape before anything is written
        from pocketpeft.global_adapter import load_global

        glob = load_global(global_adapter, loaded.source_sha256, lora_shapes(model), lcfg)
        set_global_lora(model, glob[0].tensors)
    slot = glob is not None or bool(global_slot)
    timings: dict[str, float] = {"load_quantize": time.perf_counter() - t0}
    out = Path(out)
    with atomic_dir(out) as stage:
        loaded.tokenizer.save(stage / "tokenizer.json")
        if general:
            (stage / GENERAL_TEXT).write_text("\n".join(general) + "\n", encoding="utf-8")
        adapter = Adapter(lcfg, lora_state_dict(model), loaded.source_sha256, {"pocketpeft.seed": str(seed)})
        save_adapter(adapter, stage / "adapter", base_name=f"pocketpeft:{loaded.source}")
        if glob is not None:
            from pocketpeft.global_adapter import GLOBAL_DIR, save_global

            save_global(glob[0], glob[1], stage / GLOBAL_DIR, base_name=f"pocketpeft:{loaded.source}")
        ctx = ExportContext(
            model=model,
            arch=loaded.config,
            quant=qfmt,
            lora=lcfg,
            seq_len=seq_len,
            batch_size=batch_size,
            stage=stage,
            progress=progress,
            onnx=onnx_opts,
            gguf=gguf_opts,
            split_layer=split_layer,
        )
        target_info: dict[str, dict[str, Any]] = {}
        for name in names:
            t1 = time.perf_counter()
            if slot:  # only graphs with a global slot see it; the others export without
                if name not in GLOBAL_SLOT_TARGETS:
                    set_global_lora(model, None)
                else:
                    set_global_lora(model, glob[0].tensors if glob is not None else None, zeros=glob is None)
            toolchain = load_module(target_entry(name)).TARGET.export(ctx)
            timings[name] = time.perf_counter() - t1
            target_info[name] = {"toolchain": toolchain, "export_seconds": round(timings[name], 3)}
        files: dict[str, dict[str, Any]] = {}
        for p in sorted(stage.rglob("*")):
            if p.is_file() and not p.relative_to(stage).as_posix().startswith("global/"):  # replaceable later
                rel = p.relative_to(stage).as_posix()
                top = rel.split("/", 1)[0]
                files[rel] = {
                    "sha256": sha256_file(p),
                    "bytes": p.stat().st_size,
                    "target": top if top in target_info else "shared",
                }
        for name in target_info:
            target_info[name]["files"] = [r for r, i in files.items() if i["target"] == name]
        manifest = Manifest(
            base_source=loaded.source,
            base_sha256=loaded.source_sha256,
            arch=loaded.config,
            quant=qfmt,
            lora=lcfg,
            trainable=lora_shapes(model),
            seq_len=seq_len,
            batch_size=batch_size,
            files=files,
            targets=target_info,
            versions={"pocketpeft": __version__, **_toolchain_versions(target_info)},
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            options={t: o.to_dict() for t, o in (("onnx", onnx_opts), ("gguf", gguf_opts)) if t in target_info},
            split=None
            if split_layer is None
            else Split(split_layer, loaded.config.hidden_size, tuple(t for t in names if t in SPLIT_TARGETS)),
            global_slot=slot and any(t in GLOBAL_SLOT_TARGETS for t in names),
        )
        (stage / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    return Bundle(out)


#: targets whose files are split when the manifest is (the torch reference splits at run time)
SPLIT_TARGETS = ("onnx", "executorch")
#: targets whose graphs carry a frozen global-adapter slot when the export has a global adapter
#: (torch, gguf: the runtime applies it)
GLOBAL_SLOT_TARGETS = ("onnx", "executorch", "coreml")


def _split_layer(split: "bool | None", lcfg: LoraConfig) -> int | None:
    """The layer to split at, from ``export(..., split=)`` and the LoRA layers."""
    if split not in (None, True, False):
        raise ConfigError(f"export(..., split=...) must be True, False or None, got {split!r}")
    first = min(lcfg.layers_to_transform) if lcfg.layers_to_transform else 0
    if split is True and first == 0:
        raise ConfigError(
            "export(..., split=True) needs LoRA on the upper layers only: set "
            "LoraConfig.layers_to_transform (or --layers) to layers above 0"
        )
    return first if first > 0 and split is not False else None


def _option(value: Any, kind: type, name: str) -> Any:
    """``value`` if it is a ``kind`` (already validated), the defaults for ``None``."""
    if value is None:
        return kind()
    if not isinstance(value, kind):
        raise ConfigError(f"export(..., {name}=...) must be a {kind.__name__} or None, got {type(value).__name__}")
    return value


def _general_lines(texts: "Sequence[str] | None") -> list[str]:
    """The lines of ``general.txt``: one message per line (line breaks inside a message become
    spaces), blank messages dropped. ``None``: the chitchat sample when installed, else none."""
    from pocketpeft.text import validate_texts

    if texts is None:
        try:
            from pocketpeft.corpus import general_texts

            texts = general_texts(**GENERAL_TEXT_SAMPLE)
        except MissingDependencyError:
            return []
    elif isinstance(texts, (str, bytes)):
        raise ConfigError("export(..., general_text=...) takes a sequence of messages, not one string")
    texts = list(texts)
    if not texts:
        return []
    lines = [" ".join(t.splitlines()) for t in validate_texts(texts, what="general_text")]
    return [t for t in lines if t.strip()]


def _toolchain_versions(target_info: dict[str, dict[str, Any]]) -> dict[str, str]:
    versions: dict[str, str] = {}
    for info in target_info.values():
        versions.update(info.get("toolchain", {}))
    return versions


class _ExportModule(types.ModuleType):
    """``pocketpeft.export`` is both this package and the function: calling the module calls
    :func:`export`, so ``pp.export(...)`` works without ``import pocketpeft`` loading the exporter."""

    __call__ = staticmethod(export)


sys.modules[__name__].__class__ = _ExportModule
