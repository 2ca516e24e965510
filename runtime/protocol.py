"""The backend Protocol and the small value types it speaks in.

A backend runs one bundle on one device. Everything crosses the boundary as numpy arrays and
PEFT-named tensors, so no backend depends on another's internals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol, runtime_checkable

import numpy as np

from pocketpeft.manifest import Bundle

TIERS = ("gpu", "npu", "cpu")


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do on a device. ``tier`` orders auto-selection (gpu → npu → cpu);
    ``train`` means backpropagation; ``kv_cache``: its decoder keeps a KV cache (without one,
    each suggestion pass recomputes the whole message); shown by ``pocketpeft backends``."""

    train: bool
    infer: bool
    tier: str
    kv_cache: bool = False
    notes: str = ""
    #: Inference-only ("npu"-style) backends whose graph takes the LoRA tensors as inputs set this:
    #: they can't backpropagate, but :mod:`~pocketpeft.runtime.forward_only` can update an adapter
    #: on them from forward passes alone (``set_adapter`` + ``eval_batch``).
    forward_only: bool = False


@dataclass(frozen=True)
class Probe:
    """Result of asking a backend whether it can run here, on which devices, and why not."""

    name: str
    available: bool
    devices: tuple[str, ...] = ()
    reason: str = ""
    capabilities: Mapping[str, Capabilities] = field(default_factory=dict)  # device -> caps


@dataclass
class TrainConfig:
    """Optimizer and schedule, identical across backends for parity.

    AdamW over the LoRA tensors, global-norm gradient clipping, linear warmup then cosine decay
    to ``min_lr_ratio * lr`` at ``total_steps``; ``grad_accum`` micro-batches per step.
    """

    lr: float = 2e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 2
    total_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_accum: int = 1
    seed: int = 0

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based)."""
        import math

        if step < self.warmup_steps:
            return self.lr * (step + 1) / (self.warmup_steps + 1)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class StepResult:
    """One optimizer step: the loss before the update, whether it was skipped (non-finite loss
    or gradient: the weights stay as they were), the gradient norm and the learning rate."""

    loss: float
    skipped: bool
    grad_norm: float
    lr: float
    tokens: int


@dataclass(frozen=True)
class EvalSums:
    """Sums over the scored (non-ignored) tokens of a batch."""

    loss_sum: float
    tokens: int
    top1: int
    top3: int


class Decoder(Protocol):
    """Incremental decoding over one growing token sequence, with a KV cache where the backend
    has one. ``extend`` appends tokens and returns their logits; ``truncate`` rolls the cache back
    so a new branch can be explored (suggestions reuse the cache across keystrokes)."""

    @property
    def n_tokens(self) -> int: ...

    def extend(self, ids: "list[int]") -> np.ndarray:
        """float32 log-softmax-ready logits [len(ids), vocab] for the appended tokens."""

    def truncate(self, n: int) -> None:
        """Keep only the first ``n`` tokens."""


class Backend(Protocol):
    """Runs a bundle on one device. Backends share no implementation; see runtime/backends/."""

    name: str
    device: str

    def capabilities(self) -> Capabilities: ...

    def load(self, bundle: Bundle) -> None:
        """Load the bundle's base and its initial adapter; raise typed errors for bad files."""

    def configure(self, cfg: TrainConfig) -> None:
        """(Re)create the optimizer and schedule; optimizer state starts from zero."""

    def train_step(self, input_ids: np.ndarray, labels: np.ndarray) -> StepResult:
        """One optimizer step on [B, T] int64 inputs and aligned labels (-100 ignored)."""

    def eval_batch(self, input_ids: np.ndarray, labels: np.ndarray) -> EvalSums: ...

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """float32 logits [B, T, vocab] with the current adapter applied."""

    def get_adapter(self) -> dict[str, np.ndarray]:
        """Current LoRA tensors under PEFT key names."""

    def set_adapter(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Replace the LoRA tensors (shapes checked); optimizer state is reset."""


# ---------------------------------------------------------------------- optional abilities
# Checked with ``isinstance`` (runtime_checkable: only the method's presence is checked).


@runtime_checkable
class SupportsDecoder(Protocol):
    """A backend with its own incremental decoder (a KV cache, typically). Backends without one
    get the predictor's recomputing decoder (:class:`~.predictor.RecomputeDecoder`)."""

    def decoder(self) -> Decoder:
        """A fresh incremental decoder using the current adapter (may raise
        ``NotImplementedError`` where the loaded files can't decode incrementally)."""


@runtime_checkable
class SupportsBranchLogits(Protocol):
    """A decoder that evaluates several branches at once (llamacpp: one K/V branch per sequence);
    the predictor batches its search through it."""

    def branch_logits(self, seqs: "list[list[int]]") -> np.ndarray:
        """float32 logits [len(seqs), vocab] after the last token of each full sequence,
        evaluated together in one forward pass."""


@runtime_checkable
class SupportsLossSum(Protocol):
    """A backend that computes the summed token loss alone (no logits, no top-k), cheaper than
    ``eval_batch``; forward-only training uses it."""

    def loss_sum(self, input_ids: np.ndarray, labels: np.ndarray) -> float:
        """Summed token cross-entropy over [B, T] inputs and aligned labels (-100 ignored)."""


@runtime_checkable
class SupportsSplit(Protocol):
    """A backend that runs a split bundle (``manifest.split``) in two parts: the frozen *prefix*
    (embedding + layers below the split) as inference, and the *suffix* (the layers with LoRA, the
    head, the loss) as the only training graph. ``split_layer`` is ``None`` when the loaded bundle
    isn't split (the other methods then raise). The session caches prefix outputs so training,
    replay and the gate's evaluations run the suffix alone; ``train_step`` / ``eval_batch`` on
    token ids still work (prefix, then suffix)."""

    @property
    def split_layer(self) -> "int | None": ...

    def prefix(self, input_ids: np.ndarray) -> np.ndarray:
        """float32 [B, T, hidden] residual stream entering layer ``split_layer`` (positions from 0)."""

    def train_step_hidden(self, hidden: np.ndarray, labels: np.ndarray) -> StepResult:
        """``train_step`` from prefix outputs [B, T, hidden] (any float dtype) and aligned labels;
        a backend with :class:`SupportsWeightedLoss` also takes ``weights=`` here."""

    def eval_hidden(self, hidden: np.ndarray, labels: np.ndarray) -> EvalSums:
        """``eval_batch`` from prefix outputs."""


@runtime_checkable
class SupportsWeightedLoss(Protocol):
    """A backend whose training step takes per-token loss weights (preference training, see
    :mod:`~pocketpeft.runtime.preference`). ``weighted_loss`` says whether the *loaded* files do:
    onnxruntime bundles exported before the training graph took weights load with it ``False``
    (re-export them), executorch has it ``False`` always, and passing weights then raises
    :class:`BackendUnavailableError`. torch has it ``True``.

    With ``weights`` (float32, shaped like ``labels``, negative values allowed) a step minimizes
    ``sum(weights * CE)`` over the scored tokens (labels -100 add nothing, whatever their weight),
    with no division by the token count: the caller normalizes. Clipping, the non-finite skip and
    AdamW are as without weights; ``weights=None`` is exactly the unweighted step."""

    @property
    def weighted_loss(self) -> bool: ...

    def train_step(self, input_ids: np.ndarray, labels: np.ndarray, weights: "np.ndarray | None" = None) -> StepResult:
        """``Backend.train_step`` with optional per-token loss weights."""


def weighted_loss_blocker(backend: object) -> str:
    """Why ``backend`` can't take a weighted training step ("" when it can)."""
    if not isinstance(backend, SupportsWeightedLoss):
        return "its training step takes no per-token loss weights"
    if not backend.weighted_loss:
        return (
            "its training step takes no per-token loss weights with the loaded files (an onnxruntime "
            "bundle exported before they existed: re-export it; executorch: not supported)"
        )
    return ""


@runtime_checkable
class SupportsGlobal(Protocol):
    """A backend that applies a frozen *global* adapter (the fleet's, see
    :mod:`pocketpeft.global_adapter`) under the trained one: the model computes
    ``W x + s·B_global A_global x + s·B A x``, training touches ``A``/``B`` only, and
    ``get_adapter``/``set_adapter`` keep speaking of the personal adapter alone."""

    def set_global(self, tensors: "Mapping[str, np.ndarray] | None") -> None:
        """Install the global adapter's PEFT-named tensors (the bundle's LoRA shapes) or remove it
        (``None``); raises :class:`AdapterShapeError` and keeps the current one if they don't fit."""
