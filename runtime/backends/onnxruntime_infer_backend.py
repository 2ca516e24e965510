"""Backend ``onnxruntime-infer``: the bundle's ``onnx/infer.onnx`` on a plain ONNX Runtime
``InferenceSession``: inference only, the LoRA tensors fed as graph inputs on every call.

This is the NPU path: NPU execution providers (QNN, NNAPI, Core ML) run inference graphs and
cannot backpropagate, but a graph that takes the LoRA tensors as inputs can still be trained
with forward-only (SPSA) updates (:mod:`pocketpeft.runtime.forward_only`); its capabilities say
so (``forward_only=True``). Here the CPU provider stands in for them (the same graph runs on
them; an ``npu`` device is listed when onnxruntime offers one of those providers, untested here).

The exporter wrote infer.onnx with a summed cross-entropy (an optional ``labels`` input, a
``loss_sum`` output, the convention of the ``onnx`` target's training graphs), so a loss costs
one run and no logits copy; logits stay an output for eval and decoding. Nothing here edits the
graph (no ``onnx`` import). No ``onnxruntime.training`` import and no gradient graph: memory is
the inference graph's plus the LoRA tensors. Constant folding is
off, so the frozen weights stay 4-bit and are dequantized inside each run (see ``load``).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from pocketpeft.adapter import peft_key
from pocketpeft.errors import (
    AdapterShapeError,
    BackendUnavailableError,
    ConfigError,
    CorruptFileError,
    MissingDependencyError,
)
from pocketpeft.formats.onnx import IGNORE_INDEX, INPUT_IDS, LABELS, LOGITS, LOSS
from pocketpeft.formats.onnx import INFER_PATH as INFER
from pocketpeft.manifest import Bundle

from ..protocol import Capabilities, EvalSums, Probe, StepResult, TrainConfig

NAME = "onnxruntime-infer"
_NPU_PROVIDERS = ("QNNExecutionProvider", "NnapiExecutionProvider", "CoreMLExecutionProvider")


def probe() -> Probe:
    """Available iff ``onnxruntime`` imports: ``cpu`` always, ``npu`` when an NPU provider is offered."""
    from pocketpeft._deps import require

    try:
        require("onnxruntime", "onnx")
    except MissingDependencyError as e:
        return Probe(NAME, False, (), str(e))
    import onnxruntime as ort

    ver = ort.__version__.split("+")[0]
    note = f"onnxruntime {ver} InferenceSession over infer.onnx (LoRA tensors as inputs)"
    caps = {"cpu": Capabilities(train=False, infer=True, tier="cpu", forward_only=True, notes=f"{note}, CPU EP")}
    npu = [p for p in _NPU_PROVIDERS if p in ort.get_available_providers()]
    if npu:
        caps = {
            "npu": Capabilities(train=False, infer=True, tier="npu", forward_only=True, notes=f"{note}, {npu[0]}"),
            **caps,
        }
    return Probe(NAME, True, tuple(caps), "", caps)


class OrtInferBackend:
    """Inference-only ONNX Runtime backend; see the module docstring."""

    name = NAME

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.session = None  # onnxruntime.InferenceSession
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._lora: dict[str, np.ndarray] = {}
        self._global: dict[str, np.ndarray] = {}  # the frozen global slot's inputs (two-level adapters)

    def capabilities(self) -> Capabilities:
        return probe().capabilities[self.device]

    def load(self, bundle: Bundle) -> None:
        """Open ``onnx/infer.onnx`` (with its ``labels`` input and ``loss_sum`` output) and the
        bundle's initial adapter.

        Raises :class:`ModelFileNotFoundError` without an ``onnx`` target and
        :class:`CorruptFileError` for a file that fails its hash or ONNX Runtime can't load, or an
        infer.onnx exported before it carried the loss (re-export the bundle).
        """
        import onnxruntime as ort

        bundle.require_target("onnx", reader="onnxruntime-infer")
        path = bundle.path_of(INFER)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        # Constant folding would precompute every dequantized base weight (and its intermediates)
        # as float32 initializers: SmolLM2 q4_0 measured 4.9 GB RSS after load instead of 0.8 GB,
        # and slower runs. Dequantizing in-graph per run keeps the 4-bit bytes the only copy.
        so.add_session_config_entry("optimization.disable_specified_optimizers", "ConstantFolding")
        providers = ["CPUExecutionProvider"]
        if self.device == "npu":
            providers.insert(0, next(p for p in _NPU_PROVIDERS if p in ort.get_available_providers()))
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own pybind classes
            raise CorruptFileError(f"ONNX Runtime cannot load {path}: {e}") from e
        self._shapes = {k: tuple(v) for k, v in bundle.manifest.trainable.items()}
        graph_inputs = {i.name for i in (*self.session.get_inputs(), *self.session.get_overridable_initializers())}
        outputs = {o.name for o in self.session.get_outputs()}
        if not ({INPUT_IDS, LABELS} <= graph_inputs and {LOGITS, LOSS} <= outputs):
            self.session = None
            raise CorruptFileError(
                f"{path} has no {LABELS!r} input / {LOSS!r} output (exported by an older "
                f"pocketpeft); re-export the bundle: pocketpeft export ... --targets onnx"
            )
        if not set(self._shapes) <= graph_inputs:
            raise CorruptFileError(
                f"{path}: its inputs lack the manifest's LoRA tensors "
                f"(e.g. {sorted(set(self._shapes) - graph_inputs)[:2]})"
            )
        # a bundle exported with a global adapter has its slot as inputs: zeros until one is set
        self._slots = {k.replace(".global.", "."): k for k in graph_inputs if ".global." in k}
        self._global = {v: np.zeros(self._shapes[k], np.float32) for k, v in self._slots.items()}
        self.set_adapter(bundle.initial_adapter().tensors)

    def configure(self, cfg: TrainConfig) -> None:
        """Nothing to configure: this backend has no optimizer."""

    def train_step(self, input_ids: np.ndarray, labels: np.ndarray) -> StepResult:
        """Always raises :class:`BackendUnavailableError`: inference only (train it with
        ``update="forward-only"``, which wraps it in a ForwardOnlyTrainer)."""
        raise BackendUnavailableError(
            f"{NAME} is inference-only: it cannot backpropagate; train on it with "
            "forward-only updates (pocketpeft train --update forward-only)"
        )

    def _run(self, outputs: list[str], ids: np.ndarray, labels: np.ndarray | None = None) -> list[np.ndarray]:
        if self.session is None:
            raise RuntimeError("backend not loaded: call load(bundle) first")
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        feed = {INPUT_IDS: ids, **self._lora, **self._global}
        if labels is not None:  # without: infer.onnx's default scores nothing
            feed[LABELS] = np.ascontiguousarray(labels, dtype=np.int64)
        return self.session.run(outputs, feed)

    def loss_sum(self, input_ids: np.ndarray, labels: np.ndarray) -> float:
        """Summed cross-entropy over labels != -100 (no logits leave the session)."""
        return float(self._run([LOSS], input_ids, labels)[0])

    def eval_batch(self, input_ids: np.ndarray, labels: np.ndarray) -> EvalSums:
        lab = np.asarray(labels, dtype=np.int64)
        loss_sum, logits = self._run([LOSS, LOGITS], input_ids, lab)
        valid = lab != IGNORE_INDEX
        lg, tg = logits[valid], lab[valid]
        above = (lg > lg[np.arange(len(tg)), tg][:, None]).sum(-1)  # the target's rank
        return EvalSums(float(loss_sum), int(tg.size), int((lg.argmax(-1) == tg).sum()), int((above < 3).sum()))

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        return self._run([LOGITS], input_ids)[0]

    def get_adapter(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._lora.items()}

    def set_adapter(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Replace every LoRA tensor (PEFT keys, ``.default.`` accepted). Raises
        :class:`AdapterShapeError` for a missing, unexpected, misshapen or non-finite tensor;
        nothing changes unless all of them fit."""
        self._lora = self._checked(tensors, "adapter")

    def set_global(self, tensors: Mapping[str, np.ndarray] | None) -> None:
        """Feed the global adapter to infer.onnx's frozen global slot (zeros for ``None``); a
        bundle exported without the slot raises :class:`BackendUnavailableError` (see SupportsGlobal)."""
        if not self._slots:
            if tensors is None:
                return
            raise BackendUnavailableError(
                "this bundle's infer.onnx has no global-adapter slot (exported without a global adapter); "
                "re-export with `pocketpeft export --global-adapter DIR`"
            )
        given = self._checked(tensors, "global adapter") if tensors is not None else None
        self._global = {
            v: (given[k] if given else np.zeros(self._shapes[k], np.float32)) for k, v in self._slots.items()
        }

    def _checked(self, tensors: Mapping[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
        """Float32 copies of PEFT-keyed ``tensors`` after checking names, shapes and values."""
        given = {peft_key(k): v for k, v in tensors.items()}
        if set(given) != set(self._shapes):
            missing, extra = sorted(set(self._shapes) - set(given)), sorted(set(given) - set(self._shapes))
            raise AdapterShapeError(
                f"{what} tensors don't fit infer.onnx's LoRA inputs: {len(missing)} missing "
                f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})"
            )
        new = {}
        for k, shape in self._shapes.items():
            a = np.ascontiguousarray(given[k], dtype=np.float32)
            if a.shape != shape or not np.isfinite(a).all():
                raise AdapterShapeError(f"{what} tensor {k}: shape {a.shape} (expected {shape}) or NaN/inf values")
            new[k] = a.copy() if a is given[k] else a
        return new


def create(device: str = "cpu") -> OrtInferBackend:
    """A new, unloaded onnxruntime-infer backend on ``device`` (``cpu`` or ``npu``)."""
    if device not in ("cpu", "npu"):
        raise ConfigError(f"{NAME} backend: unknown device {device!r}; expected 'cpu' or 'npu'")
    return OrtInferBackend(device)
