"""Target ``torch``: the quantized frozen base as one safetensors file.

LoRA tensors are not stored here (they live in the bundle's ``adapter/``); everything else —
quantized linear buffers, norms, embeddings — is, under HF-derived names.
"""

from __future__ import annotations

import torch

from pocketpeft.formats.torch import DIR, WEIGHTS
from pocketpeft.reference.lora import LoraLinear

from .protocol import ExportContext

__all__ = ["TARGET", "WEIGHTS", "base_state_dict"]


def base_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base tensors of a LoRA-injected model, with the ``base_layer.`` infix removed
    (so keys read like HF's: ``model.layers.0.self_attn.q_proj.qweight``)."""
    out = {}
    for k, v in model.state_dict().items():
        if ".lora_A." in k or ".lora_B." in k:
            continue
        out[k.replace(".base_layer.", ".")] = v.detach().cpu().contiguous()
    return out


class TorchTarget:
    name = "torch"

    def export(self, ctx: ExportContext) -> dict[str, str]:
        from safetensors.torch import save_file

        assert any(isinstance(m, LoraLinear) for m in ctx.model.modules())
        (ctx.stage / DIR).mkdir(parents=True, exist_ok=True)
        save_file(base_state_dict(ctx.model), str(ctx.stage / WEIGHTS), metadata={"format": "pt"})
        return {"torch": torch.__version__.split("+")[0]}


TARGET = TorchTarget()
