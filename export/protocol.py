"""The export target Protocol: one module per target, each exposing ``TARGET``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pocketpeft.config import LoraConfig, ModelConfig, QuantFormat
from pocketpeft.formats.gguf import GgufOptions
from pocketpeft.formats.onnx import OnnxOptions
from pocketpeft.reference.model import CausalLM


@dataclass
class ExportContext:
    """What every target gets: the quantized model with LoRA injected (initial adapter loaded),
    the shapes to export for, the staging directory to write into, and each target's options
    (validated dataclasses; the defaults when the caller gave none)."""

    model: CausalLM
    arch: ModelConfig
    quant: QuantFormat
    lora: LoraConfig
    seq_len: int
    batch_size: int
    stage: Path
    progress: bool = False
    onnx: OnnxOptions = field(default_factory=OnnxOptions)
    gguf: GgufOptions = field(default_factory=GgufOptions)
    #: split the model here (``None``: don't): the targets listed in ``export.SPLIT_TARGETS`` write
    #: the frozen prefix (layers below it) as an inference graph and train only the layers from it
    #: on (see :class:`pocketpeft.manifest.Split`)
    split_layer: int | None = None


class Target(Protocol):
    """An export target writes its files under ``ctx.stage / name`` and returns the versions
    of the toolchain it used (recorded in the manifest)."""

    name: str

    def export(self, ctx: ExportContext) -> dict[str, str]: ...
