"""LoRA injection over (quantized) frozen linear layers, with PEFT's module and tensor names.

After :func:`inject_lora`, ``model.layers.0.self_attn.q_proj`` is a :class:`LoraLinear` holding
``base_layer`` (the frozen layer), ``lora_A`` and ``lora_B`` — the structure ``peft`` builds,
so the adapter keys map one to one onto PEFT's ``adapter_model.safetensors``.
"""

from __future__ import annotations

import math
import re
from typing import Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pocketpeft.adapter import PEFT_PREFIX, peft_key
from pocketpeft.config import LoraConfig
from pocketpeft.errors import AdapterShapeError


class LoraLinear(nn.Module):
    """``base_layer(x) + scaling * lora_B(lora_A(dropout(x)))`` with a frozen base."""

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, cfg: LoraConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        self.r, self.scaling = cfg.r, cfg.scaling
        self.lora_dropout = nn.Dropout(cfg.lora_dropout) if cfg.lora_dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, cfg.r, bias=False)
        self.lora_B = nn.Linear(cfg.r, out_features, bias=False)
        # the frozen global adapter's slot (two-level adapters): buffers, never trained; ``None``
        # until :func:`set_global_lora` fills it, so a model without one is the plain LoRA graph
        self.register_buffer("global_A", None, persistent=False)
        self.register_buffer("global_B", None, persistent=False)
        self.reset_lora(cfg.init_lora_weights)

    @torch.no_grad()
    def reset_lora(self, init: bool | str = True) -> None:
        """Initialize as peft does: kaiming-uniform A (or gaussian 1/r) and zero B; ``False``
        keeps nn.Linear's random init for both (a non-identity adapter, for tests)."""
        if init is False:
            return
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = F.linear(F.linear(self.lora_dropout(x), self.lora_A.weight), self.lora_B.weight)
        if self.global_A is not None:  # peft applies its active adapters in turn, each on the undropped x
            delta = delta + F.linear(F.linear(x, self.global_A), self.global_B)
        return self.base_layer(x) + delta * self.scaling

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}"


#: the decoder-layer index in a module name such as ``model.layers.3.self_attn.q_proj``
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _in_chosen_layer(name: str, layers: list[int] | None) -> bool:
    """Whether the module ``name`` lies in one of ``layers`` (every module when ``None``), as peft
    decides for ``layers_to_transform``: a module outside any ``layers.N`` gets no LoRA then."""
    if layers is None:
        return True
    m = _LAYER_INDEX.search(name)
    return m is not None and int(m.group(1)) in layers


def inject_lora(model: nn.Module, cfg: LoraConfig, seed: int | None = 0) -> nn.Module:
    """Wrap every linear whose last name part is in ``cfg.target_modules`` in a :class:`LoraLinear`,
    only in the decoder layers ``cfg.layers_to_transform`` when that is set.

    Freezes everything else. ``seed`` makes the initialization reproducible (``None``: global RNG).
    Returns ``model`` (modified in place). Raises :class:`ConfigError` if ``cfg.layers_to_transform``
    names a layer the model (with a ``config.num_hidden_layers``) doesn't have.
    """
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if isinstance(num_layers, int):
        cfg.check_layers(num_layers)
    model.requires_grad_(False)
    gen_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        targets = [
            (name, mod)
            for name, mod in model.named_modules()
            if name.rsplit(".", 1)[-1] in cfg.target_modules
            and not isinstance(mod, LoraLinear)
            and _in_chosen_layer(name, cfg.layers_to_transform)
        ]
        for name, mod in targets:
            parent_name, child = name.rsplit(".", 1)
            parent = model.get_submodule(parent_name)
            setattr(parent, child, LoraLinear(mod, mod.in_features, mod.out_features, cfg))
    finally:
        if seed is not None:
            torch.random.set_rng_state(gen_state)
    return model


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """(name, module) for every LoRA layer, in model order."""
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLinear):
            yield name, mod


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors under PEFT's saved key names, e.g.
    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (detached, on CPU, float32)."""
    out = {}
    for name, mod in lora_modules(model):
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = mod.lora_A.weight.detach().float().cpu().contiguous()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = mod.lora_B.weight.detach().float().cpu().contiguous()
    return out


def lora_shapes(model: nn.Module) -> dict[str, list[int]]:
    """PEFT key -> shape for every LoRA tensor of ``model``."""
    return {k: list(v.shape) for k, v in lora_state_dict(model).items()}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy PEFT-named LoRA tensors into ``model``.

    Raises :class:`AdapterShapeError` naming the first missing, unexpected or misshapen key;
    nothing is copied unless every key matches.
    """
    expected = {}
    for name, mod in lora_modules(model):
        expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = mod.lora_A.weight
        expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = mod.lora_B.weight
    # peft writes keys without the adapter name; accept ".default." too (state dicts of a live PeftModel)
    given = {peft_key(k): v for k, v in tensors.items()}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise AdapterShapeError(
            f"adapter tensors don't match the model's LoRA layers: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    for k, p in expected.items():
        if tuple(given[k].shape) != tuple(p.shape):
            raise AdapterShapeError(
                f"adapter tensor {k} has shape {tuple(given[k].shape)}, the model expects {tuple(p.shape)}"
            )
        if not torch.isfinite(torch.as_tensor(given[k])).all():
            raise AdapterShapeError(f"adapter tensor {k} holds NaN or inf values")
    for k, p in expected.items():
        p.copy_(torch.as_tensor(given[k]).to(p.dtype))


#: the adapter name of the frozen global adapter's tensors: ``...q_proj.lora_A.global.weight`` is
#: peft's own key for an adapter named "global" in a live multi-adapter model
GLOBAL_NAME = "global"


def global_key(peft_key_: str) -> str:
    """The slot name of a global tensor: ``...lora_A.weight`` -> ``...lora_A.global.weight``."""
    return peft_key_.replace(".lora_A.weight", f".lora_A.{GLOBAL_NAME}.weight").replace(
        ".lora_B.weight", f".lora_B.{GLOBAL_NAME}.weight"
    )


@torch.no_grad()
def set_global_lora(model: nn.Module, tensors: Mapping[str, torch.Tensor] | None, zeros: bool = False) -> None:
    """Fill every LoRA layer's frozen global slot from PEFT-named ``tensors`` (the global adapter,
    same shapes as the trainable LoRA), or empty it (``None``); ``zeros=True`` makes zero-valued
    slots (a graph exported with a slot that a device fills later). Raises :class:`AdapterShapeError`
    naming the first key that doesn't fit; nothing changes unless every key fits."""
    mods = list(lora_modules(model))
    if tensors is None and not zeros:
        for _, mod in mods:
            mod.global_A = mod.global_B = None
        return
    new = {}
    given = {peft_key(k): v for k, v in (tensors or {}).items()}
    expected = {}
    for name, mod in mods:
        for part in ("lora_A", "lora_B"):
            expected[f"{PEFT_PREFIX}{name}.{part}.weight"] = getattr(mod, part).weight
    if tensors is not None:
        missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
        if missing or unexpected:
            raise AdapterShapeError(
                f"global adapter tensors don't match the model's LoRA layers: {len(missing)} missing "
                f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
            )
    for k, p in expected.items():
        if tensors is None:
            new[k] = torch.zeros_like(p)
            continue
        t = torch.as_tensor(np.asarray(given[k]) if not hasattr(given[k], "detach") else given[k])
        if tuple(t.shape) != tuple(p.shape):
            raise AdapterShapeError(
                f"global adapter tensor {k} has shape {tuple(t.shape)}, the model expects {tuple(p.shape)}"
            )
        if not torch.isfinite(t).all():
            raise AdapterShapeError(f"global adapter tensor {k} holds NaN or inf values")
        new[k] = t.to(device=p.device, dtype=p.dtype).clone()
    for name, mod in mods:
        mod.global_A = new[f"{PEFT_PREFIX}{name}.lora_A.weight"]
        mod.global_B = new[f"{PEFT_PREFIX}{name}.lora_B.weight"]


def global_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The filled global slots under PEFT's keys (``{}`` when the model has none)."""
    out = {}
    for name, mod in lora_modules(model):
        if mod.global_A is not None:
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = mod.global_A.detach().float().cpu()
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = mod.global_B.detach().float().cpu()
    return out


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA parameters, in a stable order (A then B per layer)."""
    params = []
    for _, mod in lora_modules(model):
        params += [mod.lora_A.weight, mod.lora_B.weight]
    return params
