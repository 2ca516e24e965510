"""The ``torch`` target's contract: the bundle's ``torch/`` file names. Device-safe (no torch
import here; the name is the target's)."""

from __future__ import annotations

DIR = "torch"
#: the quantized frozen base (no LoRA tensors), safetensors with HF-derived names
WEIGHTS = f"{DIR}/model.safetensors"
