"""Where ONNX Runtime should run a frozen *inference* graph: execution providers (EPs) in
preference order, each with why.

Used to place the frozen prefix of a split model (layers below the first trained one) on the
best accelerator here, while the trained suffix backpropagates on the training backend's device.
An inference graph has no backward, so any EP that runs its ops will do: NPU-class EPs first
(the reason a device has one), then GPUs, then optimized CPU kernels, and the default CPU EP,
which runs everything, always last.

Device-safe: imports neither torch nor onnx; ``onnxruntime`` is imported inside the functions.
"""

from __future__ import annotations

#: EP -> (tier, why), in preference order within a tier.
PROVIDERS: dict[str, tuple[str, str]] = {
    "QNNExecutionProvider": ("npu", "Qualcomm Hexagon NPU (QNN)"),
    "CoreMLExecutionProvider": ("npu", "Apple Neural Engine via Core ML"),
    "NnapiExecutionProvider": ("npu", "Android NNAPI (NPU/DSP where the phone has one)"),
    "OpenVINOExecutionProvider": ("npu", "Intel OpenVINO (NPU, iGPU or CPU)"),
    "VitisAIExecutionProvider": ("npu", "AMD Ryzen AI NPU (Vitis AI)"),
    "DmlExecutionProvider": ("gpu", "DirectML GPU (Windows)"),
    "CUDAExecutionProvider": ("gpu", "NVIDIA GPU (CUDA)"),
    "XnnpackExecutionProvider": ("cpu", "XNNPACK, optimized mobile CPU kernels"),
    "CPUExecutionProvider": ("cpu", "the default CPU EP, runs every op, always available"),
}
_TIERS = ("npu", "gpu", "cpu")
_OTHER_GPU = ("TensorrtExecutionProvider", "ROCMExecutionProvider", "MIGraphXExecutionProvider")


def tier_of(provider: str) -> str:
    """The device tier (``npu``, ``gpu`` or ``cpu``) an ONNX Runtime EP runs on; an EP this module
    doesn't know counts as ``cpu`` (the conservative guess)."""
    if provider in PROVIDERS:
        return PROVIDERS[provider][0]
    return "gpu" if provider in _OTHER_GPU else "cpu"


def inference_providers() -> list[tuple[str, str]]:
    """(EP name, why) for a frozen inference graph, best first: the NPU-class EPs this
    ``onnxruntime`` offers, then GPU EPs (CUDA only when it can actually run here: the wheel lists
    it without a GPU), then optimized CPU kernels, and ``CPUExecutionProvider`` always last.

    Raises :class:`MissingDependencyError` (naming the ``onnx`` extra) without onnxruntime."""
    from pocketpeft._deps import require

    ort = require("onnxruntime", "onnx")
    offered = set(ort.get_available_providers())
    out = []
    for tier in _TIERS:
        for name, (t, why) in PROVIDERS.items():
            if t != tier or name == "CPUExecutionProvider" or name not in offered:
                continue
            if name == "CUDAExecutionProvider":
                from .onnxruntime_backend import _cuda_usable

                if not _cuda_usable():
                    continue
            out.append((name, why))
    out.append(("CPUExecutionProvider", PROVIDERS["CPUExecutionProvider"][1]))
    return out
