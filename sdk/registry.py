"""Name -> lazily imported module registries for export targets and runtime backends.

Adding a target or backend = one module + one line here. Nothing heavy is imported until a
name is used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from .errors import BackendNotFoundError, ConfigError


@dataclass(frozen=True)
class Entry:
    """One registered implementation: its module, the pip extra it needs (None: core), and for a
    backend the bundle ``target`` it reads (None for export targets: they are their own target)."""

    name: str
    module: str
    extra: str | None
    summary: str
    target: str | None = None


#: Runtime backends, in order of preference within a device tier (see runtime.selection).
BACKENDS: dict[str, Entry] = {
    "torch": Entry(
        "torch",
        "pocketpeft.runtime.backends.torch_backend",
        None,
        "reference backend: eager PyTorch, CPU or CUDA, train + infer",
        "torch",
    ),
    "executorch": Entry(
        "executorch",
        "pocketpeft.runtime.backends.executorch_backend",
        "executorch",
        "ExecuTorch training module (.pte): on-device train + infer",
        "executorch",
    ),
    "onnxruntime": Entry(
        "onnxruntime",
        "pocketpeft.runtime.backends.onnxruntime_backend",
        "onnx",
        "ONNX Runtime training artifacts: on-device train + infer (CPU/CUDA providers)",
        "onnx",
    ),
    "llamacpp": Entry(
        "llamacpp",
        "pocketpeft.runtime.backends.llamacpp_backend",
        "llamacpp",
        "llama.cpp over the GGUF base, adapters hot-swapped as GGUF LoRA: infer only",
        "gguf",
    ),
    "peft": Entry(
        "peft",
        "pocketpeft.runtime.backends.peft_backend",
        "peft,bnb",
        "server side: transformers + peft + bitsandbytes (nf4 base as Linear4bit), CUDA or CPU",
        "torch",
    ),
    "onnxruntime-infer": Entry(
        "onnxruntime-infer",
        "pocketpeft.runtime.backends.onnxruntime_infer_backend",
        "onnx",
        "ONNX Runtime InferenceSession on infer.onnx (LoRA as inputs): infer + forward-only updates",
        "onnx",
    ),
}

#: Export targets.
TARGETS: dict[str, Entry] = {
    "torch": Entry(
        "torch", "pocketpeft.export.torch_target", None, "quantized base as safetensors for the torch reference backend"
    ),
    "executorch": Entry(
        "executorch",
        "pocketpeft.export.executorch_target",
        "executorch",
        "train.pte (forward+backward, loss first) and infer.pte",
    ),
    "onnx": Entry(
        "onnx",
        "pocketpeft.export.onnx_target",
        "onnx",
        "ORT training artifacts and infer.onnx with LoRA weights as inputs",
    ),
    "gguf": Entry(
        "gguf",
        "pocketpeft.export.gguf_target",
        None,
        "llama.cpp base GGUF (our q4_0/q8_0 bytes); adapters convert to GGUF LoRA",
    ),
    "coreml": Entry(
        "coreml",
        "pocketpeft.export.coreml_target",
        "coreml",
        "Core ML .mlpackage: 4/8-bit weights, LoRA tensors as inputs (runs on macOS/iOS)",
    ),
}


#: Model families every backend and target runs (pocketpeft.families), and where one holds less.
FAMILY_SUPPORT = "llama (and mistral), qwen2, qwen3, gemma3_text: every backend and target"
FAMILY_LIMITS: dict[str, str] = {
    "llamacpp": "Gemma 3 only with llama.cpp's attention scale (query_pre_attn_scalar = head_dim, as Gemma 3 "
    "270M-12B; 27B: hidden/heads); other values are refused at export",
    "coreml": "Gemma 3's tanh GELU relies on coremltools 9.0 internals to keep its mode; checked on Linux by "
    "reading the program back, not yet run on macOS",
}


def backend_entry(name: str) -> Entry:
    """The registered backend ``name``; raise :class:`BackendNotFoundError` listing the known ones."""
    if name not in BACKENDS:
        raise BackendNotFoundError(
            f"unknown backend {name!r}; registered backends: {', '.join(BACKENDS)} "
            "(`pocketpeft backends` shows which of them run on this machine)"
        )
    return BACKENDS[name]


def backend_target(name: str) -> str:
    """The bundle target backend ``name`` reads (``llamacpp`` -> ``gguf``, ``peft`` -> ``torch``, ...).

    ``name`` may carry a device (``NAME:DEVICE``). Raises :class:`BackendNotFoundError` for an
    unknown backend."""
    entry = backend_entry(name.partition(":")[0])
    assert entry.target is not None, f"backend {entry.name} names no bundle target"
    return entry.target


def target_entry(name: str) -> Entry:
    """The registered export target ``name``; raise :class:`ConfigError` listing the known ones."""
    if name not in TARGETS:
        raise ConfigError(f"unknown export target {name!r}; available targets: {', '.join(TARGETS)}")
    return TARGETS[name]


def load_module(entry: Entry) -> ModuleType:
    """Import the module of ``entry`` (its heavy dependencies are imported inside it)."""
    return importlib.import_module(entry.module)
