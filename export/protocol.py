"""The export target Protocol: one module per target, each exposing ``TARGET``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pocketpeft.config import LoraConfig, ModelConfig, QuantFormat
from pocketpeft.reference.model import CausalLM


@dataclass
class ExportContext:
    """What every target gets: the quantized model with LoRA injected (initial adapter loaded),
    the shapes to export for, and the staging directory to write into."""

    model: CausalLM
    arch: ModelConfig
    quant: QuantFormat
    lora: LoraConfig
    seq_len: int
    batch_size: int
    stage: Path
    progress: bool = False


class Target(Protocol):
    """An export target writes its files under ``ctx.stage / name`` and returns the versions
    of the toolchain it used (recorded in the manifest)."""

    name: str

    def export(self, ctx: ExportContext) -> dict[str, str]: ...
