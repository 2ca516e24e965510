"""Backend ``onnxruntime``: the bundle's ``onnx/`` training artifacts on ONNX Runtime training
(CPU, or the CUDA execution provider when it can run here). Semantics copy the torch reference.

ORT runs forward + backward (``loss_sum`` and gradients of the summed token loss, accumulated
over micro-batches in its in-graph buffers; a bundle whose training graph takes per-token
``weights`` sums ``weights * CE`` instead, see :attr:`OrtBackend.weighted_loss`) and the eval
model (``loss_sum`` + logits). The
optimizer step runs on the host, in float32 numpy, with exactly torch's arithmetic, because
ORT's optimizer graph can't reproduce torch's step: onnxblock's AdamW is the Hugging Face
variant (``adam_mode=1``: bias correction folded into the lr, weight decay after the update),
its clipping op (``InplaceClipGradNorm``) returns no norm, and nothing in it can skip a step
on a non-finite loss or gradient while leaving weights *and* moments untouched. LoRA tensors
are a fraction of a percent of the weights, so the gradient reads and weight writes cost
milliseconds per step (measured: ~10 us per tensor).

The training graph has static ``[batch_size, seq_len]`` inputs (ORT plans its memory ahead;
short batches and rows are padded with label -100) and recomputes dequantized weights in
backward; the session config that needs (no common-subexpression elimination) is read from the
bundle's ``onnx/io.json``. The eval model is dynamic. The CUDA path is untested here (no GPU):
weights and gradients cross to the host through ORT's own copies.

Rides on onnxruntime-training 1.19.2, its last release. Torch is not needed: where it isn't
installed (a device), the training API loads without the wheel's torch-only helpers
(:func:`training_api`), so neither this backend nor pocketpeft's runtime imports it.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Mapping

import numpy as np

from pocketpeft.adapter import peft_key
from pocketpeft.errors import (
    AdapterShapeError,
    BackendUnavailableError,
    ConfigError,
    CorruptFileError,
    MissingDependencyError,
    SequenceTooLongError,
)
from pocketpeft.formats import onnx as fmt
from pocketpeft.formats.onnx import CHECKPOINT, DIR, EVAL, IO_JSON, TRAIN
from pocketpeft.manifest import Bundle

from ..protocol import Capabilities, EvalSums, Probe, StepResult, TrainConfig
from .host_adamw import HostAdamW, clip_coef

#: ORT's CPU memory arena keeps every run's peak allocation (activations, dequantized weights)
#: for the session's lifetime; without it each run gives its memory back. Measured on SmolLM2's
#: split bundle: the prefix session holds 210 instead of 486 MiB, and the training session returns
#: to its resting size after each step and evaluation (benchmarks/loop_memory.py), at no
#: measurable cost in speed.
ARENA = False


@functools.lru_cache(maxsize=None)
def _cuda_usable() -> bool:
    """True when ORT's CUDA provider can run here. The wheel lists it even without a GPU, and
    asking a session for it without one logs errors, so check quietly: the provider library must
    load (it links cuBLAS/cuDNN) and the driver must report a device."""
    import ctypes
    import os
    import sys

    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    capi = os.path.join(os.path.dirname(ort.__file__), "capi")
    provider, driver = (
        ("onnxruntime_providers_cuda.dll", "nvcuda.dll")
        if sys.platform == "win32"
        else ("libonnxruntime_providers_cuda.so", "libcuda.so.1")
    )
    try:
        ctypes.CDLL(os.path.join(capi, provider))
        cuda = ctypes.CDLL(driver)
        count = ctypes.c_int(0)
        return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    except (OSError, AttributeError):
        return False


def training_api():
    """``(CheckpointState, Module)`` of ``onnxruntime.training.api``.

    The training wheel's package ``__init__`` imports its ``optim``/``amp`` helpers, which import
    torch (they serve ORTModule, the torch front end). The ``api`` classes are thin wrappers over
    the C++ training API and need none of it, so where torch is not installed the ``api``
    subpackage is loaded under a bare ``onnxruntime.training`` package instead. With torch
    installed the normal import runs. Raises :class:`MissingDependencyError` when
    onnxruntime-training isn't installed or fails to import.
    """
    import os
    import sys
    import types

    from pocketpeft._deps import require

    require("onnxruntime", "onnx")
    try:
        from onnxruntime.training.api import CheckpointState, Module
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "torch":
            raise MissingDependencyError(
                f"onnxruntime-training is not installed or broken ({e}); install it "
                "with: pip install 'pocketpeft[onnx]'"
            ) from e
        import onnxruntime

        pkg_dir = os.path.join(os.path.dirname(onnxruntime.__file__), "training")
        if not os.path.isdir(os.path.join(pkg_dir, "api")):
            raise MissingDependencyError(
                "onnxruntime has no training API (the inference wheel is installed); "
                "install it with: pip install 'pocketpeft[onnx]'"
            ) from e
        bare = types.ModuleType("onnxruntime.training")
        bare.__path__ = [pkg_dir]
        sys.modules["onnxruntime.training"] = bare
        from onnxruntime.training.api import CheckpointState, Module
    return CheckpointState, Module


def probe() -> Probe:
    """Available iff ONNX Runtime's training API loads; CPU always, ``cuda`` when usable."""
    try:
        training_api()
    except MissingDependencyError as e:
        return Probe("onnxruntime", False, (), str(e))
    import onnxruntime as ort

    ver = ort.__version__
    caps = {"cpu": Capabilities(train=True, infer=True, tier="cpu", notes=f"onnxruntime-training {ver}, CPU EP")}
    devices = ["cpu"]
    if _cuda_usable():
        devices.insert(0, "cuda")
        caps["cuda"] = Capabilities(train=True, infer=True, tier="gpu", notes=f"onnxruntime-training {ver}, CUDA EP")
    return Probe("onnxruntime", True, tuple(devices), "", caps)


class OrtBackend:
    """ONNX Runtime training backend; see the module docstring."""

    name = "onnxruntime"

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.cfg = TrainConfig()
        self.step = 0
        self._state = self._module = None
        self._shapes: dict[str, tuple[int, ...]] = {}  # PEFT key -> shape
        self._static = (0, 0)  # the training model's [rows, seq_len]
        self._opt = HostAdamW(self.cfg)  # the host optimizer: AdamW moments per PEFT key
        self._split: dict | None = None  # io.json's split entry when the bundle is split
        self._prefix_path = None
        self._prefix_session = None  # loaded on first use; release_prefix() frees it
        self.prefix_provider = ""  # the execution provider the prefix runs on, once loaded
        self._global_slot: dict[str, str] = {}  # PEFT key -> the frozen global slot's checkpoint parameter
        self._weighted = False  # the training graph takes per-token loss weights

    def capabilities(self) -> Capabilities:
        return probe().capabilities[self.device]

    def load(self, bundle: Bundle) -> None:
        """Open the bundle's ORT artifacts and its initial adapter.

        Raises :class:`ModelFileNotFoundError` (no ``onnx`` target / missing file) and
        :class:`CorruptFileError` (hash mismatch, or a file ORT cannot read).
        """
        import onnxruntime as ort

        CheckpointState, Module = training_api()
        bundle.require_target(DIR, reader=self.name)
        paths = {f: bundle.path_of(f"{DIR}/{f}") for f in (TRAIN, EVAL, CHECKPOINT, IO_JSON)}
        try:
            io = json.loads(paths[IO_JSON].read_text(encoding="utf-8"))
            config = dict(io.get(fmt.IO_SESSION_CONFIG, {}))
            inputs = io[fmt.IO_TRAINING_MODEL][fmt.IO_INPUTS]
            rows, seq = (int(x) for x in (inputs[fmt.HIDDEN] if fmt.IO_SPLIT in io else inputs[fmt.INPUT_IDS])[:2])
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError, ValueError) as e:
            raise CorruptFileError(f"{paths[IO_JSON]} is not a valid io.json: {e}") from e
        so = ort.SessionOptions()
        so.log_severity_level = 3  # warnings only restate that dynamic shapes are planned at run time
        so.enable_cpu_mem_arena = ARENA
        for key, value in config.items():  # what the exported graphs need, e.g. no CSE (see onnx_target)
            so.add_session_config_entry(str(key), str(value))
        try:
            state = CheckpointState.load_checkpoint(str(paths[CHECKPOINT]))
        except Exception as e:  # noqa: BLE001 - ORT raises RuntimeError or its own pybind classes
            raise CorruptFileError(f"{paths[CHECKPOINT]} is not a readable ORT checkpoint: {e}") from e
        try:
            module = Module(str(paths[TRAIN]), state, str(paths[EVAL]), device=self.device, session_options=so)
        except Exception as e:  # noqa: BLE001
            raise CorruptFileError(f"ONNX Runtime cannot load {paths[TRAIN]} / {paths[EVAL]}: {e}") from e
        expected = {k: tuple(v) for k, v in bundle.manifest.trainable.items()}
        trainable = {n: tuple(p.data.shape) for n, p in state.parameters if p.requires_grad}
        if trainable != expected:
            raise CorruptFileError(
                f"{paths[CHECKPOINT]}: its trainable tensors don't match the manifest's "
                f"({len(trainable)} vs {len(expected)} LoRA tensors)"
            )
        self._state, self._module, self._shapes, self._static = state, module, expected, (rows, seq)
        self._split, self._prefix_session = io.get(fmt.IO_SPLIT), None
        self._weighted = fmt.WEIGHTS in inputs
        self._global_slot = dict(io.get(fmt.IO_GLOBAL) or {})  # PEFT key -> frozen checkpoint parameter
        if set(self._global_slot) - set(expected):
            raise CorruptFileError(f"{paths[IO_JSON]}: its global slot names tensors the manifest's LoRA doesn't have")
        if self._split is not None:
            if bundle.manifest.split is None or bundle.manifest.split.layer != self._split.get("layer"):
                raise CorruptFileError(
                    f"{paths[IO_JSON]}: its split {self._split!r} doesn't match the manifest's field 'split'"
                )
            self._prefix_path = bundle.path_of(f"{DIR}/{fmt.PREFIX}")
            bundle.path_of(f"{DIR}/{fmt.PREFIX_DATA}")  # its weights: verified before ORT reads them
        self.set_adapter(bundle.initial_adapter().tensors)

    @property
    def weighted_loss(self) -> bool:
        """Whether the loaded bundle's training graph takes per-token loss weights (its io.json's
        ``training_model.inputs`` lists ``weights``); bundles exported before that don't: re-export
        them to train with weights (``SupportsWeightedLoss``)."""
        return self._weighted

    # ------------------------------------------------------------------ split bundles
    @property
    def split_layer(self) -> int | None:
        """The first trained layer of a split bundle (``None``: not split)."""
        return None if self._split is None else int(self._split["layer"])

    def _prefix_sess(self):
        """The prefix's InferenceSession on the best execution provider present (an NPU-class EP
        where ORT has one, else CPU; see :mod:`.ort_providers`), loaded on first use."""
        if self._split is None:
            raise RuntimeError("the loaded bundle is not split (io.json has no 'split')")
        if self._prefix_session is None:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.log_severity_level = 3
            so.enable_cpu_mem_arena = ARENA  # see ARENA
            for key, value in dict(self._split.get(fmt.IO_PREFIX_SESSION_CONFIG, {})).items():
                so.add_session_config_entry(str(key), str(value))
            errors = []
            for provider in _prefix_providers(self.device):
                try:
                    self._prefix_session = ort.InferenceSession(str(self._prefix_path), so, providers=[provider])
                    self.prefix_provider = provider
                    break
                except Exception as e:  # noqa: BLE001 - an EP that fails to initialize: try the next
                    errors.append(f"{provider}: {e}")
            else:
                raise CorruptFileError(f"ONNX Runtime cannot load {self._prefix_path}: {'; '.join(errors)}")
        return self._prefix_session

    def prefix(self, input_ids: np.ndarray) -> np.ndarray:
        """The frozen prefix's output, float32 [B, T, hidden] (see ``SupportsSplit``)."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        return self._prefix_sess().run([fmt.HIDDEN], {fmt.INPUT_IDS: ids})[0]

    def release_prefix(self) -> None:
        """Free the prefix session (its weights); the next :meth:`prefix` loads it again."""
        self._prefix_session = None

    def train_step_hidden(
        self, hidden: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None
    ) -> StepResult:
        """:meth:`train_step` of the suffix from prefix outputs [B, T, hidden]."""
        if self._split is None:
            raise RuntimeError("the loaded bundle is not split (io.json has no 'split')")
        return self._train(np.asarray(hidden, dtype=np.float32), labels, weights)

    def eval_hidden(self, hidden: np.ndarray, labels: np.ndarray) -> EvalSums:
        """:meth:`eval_batch` of the suffix from prefix outputs."""
        if self._split is None:
            raise RuntimeError("the loaded bundle is not split (io.json has no 'split')")
        return self._eval(np.asarray(hidden, dtype=np.float32), labels)

    def _input(self, input_ids: np.ndarray) -> np.ndarray:
        """What the training/eval models take for ``input_ids``: the ids, or for a split bundle
        the prefix's output."""
        return self.prefix(input_ids) if self._split is not None else np.asarray(input_ids, dtype=np.int64)

    def configure(self, cfg: TrainConfig) -> None:
        """Set the optimizer config; the step count and AdamW moments start from zero."""
        if not isinstance(cfg.grad_accum, int) or cfg.grad_accum < 1:
            raise ConfigError(f"TrainConfig.grad_accum must be a positive integer, got {cfg.grad_accum!r}")
        self.cfg, self.step, self._opt = cfg, 0, HostAdamW(cfg)

    @property
    def _mod(self):
        if self._module is None:
            raise RuntimeError("backend not loaded: call load(bundle) first")
        return self._module

    def _run(self, train: bool, x: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None):
        """One run of the training (``train``) or eval model on ids or, split, hidden states;
        ``weights`` feeds the training graph's per-token loss weights (weighted bundles only)."""
        mod = self._mod.train(train)
        extra = () if weights is None else (np.ascontiguousarray(weights, dtype=np.float32),)
        return mod(np.ascontiguousarray(x), np.ascontiguousarray(labels, dtype=np.int64), *extra)

    def _padded(self, x: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None):
        """``(x, labels, weights)`` filling the training model's static [rows, seq_len] with label
        -100 (scores nothing), weight 0 and token 0 (or zero hidden states); padding sits after the
        real tokens, which causal attention never lets them see."""
        rows, seq = self._static
        if x.shape[:2] == (rows, seq):
            return x, labels, weights
        px = np.zeros((rows, seq, *x.shape[2:]), x.dtype)
        plab = np.full((rows, seq), fmt.IGNORE_INDEX, np.int64)
        px[: x.shape[0], : x.shape[1]], plab[: x.shape[0], : x.shape[1]] = x, labels
        pw = None
        if weights is not None:
            pw = np.zeros((rows, seq), np.float32)
            pw[: x.shape[0], : x.shape[1]] = weights
        return px, plab, pw

    def train_step(self, input_ids: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> StepResult:
        """See :meth:`_train`; a split bundle runs the prefix first (backward stops there)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        self._check_rows(ids)
        self._check_weights(weights, ids.shape[:2])
        return self._train(self._input(ids), labels, weights)

    def _check_weights(self, weights: np.ndarray | None, shape: tuple[int, ...]) -> None:
        """Raise :class:`BackendUnavailableError` when ``weights`` are given to a bundle whose
        training graph takes none, :class:`ConfigError` when they aren't shaped like the labels."""
        if weights is None:
            return
        if not self._weighted:
            raise BackendUnavailableError(
                "onnxruntime: this bundle's training graph takes no per-token loss weights (exported "
                "before they existed); re-export the bundle (`pocketpeft export ... --targets onnx`) "
                "to train with weights, e.g. preferences"
            )
        if np.shape(weights) != tuple(shape):
            raise ConfigError(f"weights have shape {np.shape(weights)}; expected the labels' shape {tuple(shape)}")

    def _check_rows(self, x: np.ndarray) -> None:
        if x.ndim < 2 or x.shape[1] > self._static[1]:
            raise SequenceTooLongError(
                f"train_step: input of shape {x.shape}; the ONNX training graph "
                f"takes rows of at most {self._static[1]} tokens (re-export with a larger seq_len)"
            )

    def _train(self, x: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> StepResult:
        """One AdamW step exactly as the torch backend takes it: loss = summed CE / scored tokens
        (with per-token ``weights`` shaped like ``labels``: sum(weights * CE), no division; labels
        -100 add nothing), global-norm clipping, skip on a non-finite loss or gradient norm
        (weights and moments untouched). Rows run through the static training graph ``rows`` at a
        time, padded; the summed loss makes that equal to any micro-batching, so ``grad_accum``
        changes only float rounding here (and no memory: the graph's batch is fixed at export).

        Raises :class:`SequenceTooLongError` for rows longer than the exported ``seq_len``,
        :class:`BackendUnavailableError` for weights on a bundle exported without them and
        :class:`ConfigError` for weights of another shape.
        """
        cfg, mod, state = self.cfg, self._mod, self._state
        ids, lab = x, np.asarray(labels, dtype=np.int64)
        self._check_rows(ids)
        self._check_weights(weights, lab.shape)
        rows = self._static[0]
        n_tok = int((lab != -100).sum())
        if weights is not None:  # the caller normalized: no division
            w, denom = np.where(lab != -100, np.asarray(weights, dtype=np.float32), np.float32(0)), np.float32(1)
        else:  # weight 1 per token: the plain summed cross-entropy (the graph's original loss)
            w, denom = (np.ones(lab.shape, np.float32) if self._weighted else None), np.float32(max(n_tok, 1))
        lr = cfg.lr_at(self.step)
        mod.lazy_reset_grad()
        total = 0.0
        for s in range(0, len(ids), rows):
            chunk = self._padded(ids[s : s + rows], lab[s : s + rows], None if w is None else w[s : s + rows])
            total += float(np.float32(self._run(True, *chunk)) / denom)
        grads = {k: state.parameters[k].grad / denom for k in self._shapes}  # copies, also when denom is 1
        grad_norm, coef = clip_coef(grads.values(), cfg.grad_clip)  # torch.nn.utils.clip_grad_norm_
        if not (math.isfinite(total) and math.isfinite(float(grad_norm))):
            return StepResult(total, True, float(grad_norm), lr, n_tok)
        params = {k: state.parameters[k].data.copy() for k in grads}  # ORT's buffers: update copies
        self._opt.step(params, grads, coef, lr)  # torch.optim.AdamW, in float32
        for k, p in params.items():
            state.parameters[k] = p
        self.step += 1
        return StepResult(total, False, float(grad_norm), lr, n_tok)

    def eval_batch(self, input_ids: np.ndarray, labels: np.ndarray) -> EvalSums:
        """Summed loss, scored-token count, top-1 and top-3 hits over labels != -100."""
        return self._eval(self._input(input_ids), labels)

    def _eval(self, x: np.ndarray, labels: np.ndarray) -> EvalSums:
        lab = np.asarray(labels, dtype=np.int64)
        loss_sum, logits = self._run(False, x, lab)
        valid = lab != -100
        lg, tg = logits[valid], lab[valid]
        target = lg[np.arange(len(tg)), tg]
        above = (lg > target[:, None]).sum(-1)  # rank of the target among the vocabulary
        return EvalSums(float(loss_sum), int(tg.size), int((lg.argmax(-1) == tg).sum()), int((above < 3).sum()))

    def row_losses(self, input_ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Each row's summed cross-entropy over labels != -100, float64 [B] (one eval run)."""
        return self.row_losses_hidden(self._input(np.asarray(input_ids, dtype=np.int64)), labels)

    def row_losses_hidden(self, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """:meth:`row_losses` from the eval model's input (prefix outputs on a split bundle)."""
        from ..evalsums import row_losses

        lab = np.asarray(labels, dtype=np.int64)
        return row_losses(self._run(False, np.asarray(x), lab)[1], lab)

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """float32 logits [B, T, vocab] through the eval model (no label is scored)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        return self._run(False, self._input(ids), np.full(ids.shape, -100, dtype=np.int64))[1]

    def get_adapter(self) -> dict[str, np.ndarray]:
        """Copies of the current LoRA tensors under PEFT keys."""
        return {k: np.array(self._state.parameters[k].data, dtype=np.float32, copy=True) for k in self._shapes}

    def set_adapter(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Replace every LoRA tensor (PEFT keys; ``.default.`` accepted); the optimizer restarts.

        Raises :class:`AdapterShapeError` for a missing, unexpected, misshapen or non-finite
        tensor; nothing is written unless all of them fit.
        """
        given = self._checked(tensors, "adapter")
        for k in self._shapes:
            self._state.parameters[k] = given[k]
        self.configure(self.cfg)

    def set_global(self, tensors: Mapping[str, np.ndarray] | None) -> None:
        """Write the global adapter into the graphs' frozen global slot (zeros for ``None``: no
        global). Raises :class:`BackendUnavailableError` for a bundle exported without the slot
        and :class:`AdapterShapeError` (slot unchanged) for tensors that don't fit."""
        if self._state is None:
            raise RuntimeError("backend not loaded: call load(bundle) first")
        if not self._global_slot:
            if tensors is None:
                return
            raise BackendUnavailableError(
                "this bundle's onnx graphs have no global-adapter slot (exported without a global adapter); "
                "re-export with `pocketpeft export --global-adapter DIR` to apply one on onnxruntime"
            )
        given = (
            self._checked(tensors, "global adapter")
            if tensors is not None
            else {k: np.zeros(s, np.float32) for k, s in self._shapes.items()}
        )
        for k, name in self._global_slot.items():
            self._state.parameters[name] = given[k]
        self.configure(self.cfg)

    def _checked(self, tensors: Mapping[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
        """PEFT-keyed contiguous float32 copies of ``tensors`` after checking every name, shape and
        value against the bundle's LoRA layers; raises :class:`AdapterShapeError` naming the first misfit."""
        if self._state is None:
            raise RuntimeError("backend not loaded: call load(bundle) first")
        given = {peft_key(k): np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
        missing, extra = sorted(set(self._shapes) - set(given)), sorted(set(given) - set(self._shapes))
        if missing or extra:
            raise AdapterShapeError(
                f"{what} tensors don't match the bundle's LoRA layers: {len(missing)} missing "
                f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})"
            )
        for k, shape in self._shapes.items():
            if given[k].shape != shape:
                raise AdapterShapeError(f"{what} tensor {k} has shape {given[k].shape}, the bundle expects {shape}")
            if not np.isfinite(given[k]).all():
                raise AdapterShapeError(f"{what} tensor {k} holds NaN or inf values")
        return given


def _prefix_providers(device: str) -> list[str]:
    """Execution providers to try for a split bundle's prefix, best first (CPU last)."""
    try:
        from .ort_providers import inference_providers
    except ImportError:  # pragma: no cover - the module ships with the package
        return ["CPUExecutionProvider"]
    providers = [p for p, _ in inference_providers()]
    return providers if device == "cuda" else [p for p in providers if p != "CUDAExecutionProvider"]


def create(device: str = "cpu") -> OrtBackend:
    """A new, unloaded onnxruntime backend on ``device`` (``cpu`` or ``cuda``)."""
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"onnxruntime backend: unknown device {device!r}; expected 'cpu' or 'cuda'")
    return OrtBackend(device)
