"""The ``onnx`` target's contract: the bundle's ``onnx/`` file names, the ``io.json`` keys and
graph names both the exporter (writer) and the onnxruntime backends (reader) use, and the
target's export options. Device-safe: no onnx, no torch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from pocketpeft.errors import ConfigError

DIR = "onnx"
#: forward + backward (ORT training artifacts)
TRAIN = "training_model.onnx"
#: forward only: ``loss_sum`` and ``logits``
EVAL = "eval_model.onnx"
#: ORT's AdamW graph, for other ORT clients (pocketpeft's runtime steps on the host)
OPTIMIZER = "optimizer_model.onnx"
#: the ORT checkpoint: LoRA tensors (trainable) and the frozen base
CHECKPOINT = "checkpoint"
#: forward only, base embedded, LoRA tensors as inputs, optional labels -> ``loss_sum``
INFER = "infer.onnx"
#: names, shapes and conventions of the graphs above
IO_JSON = "io.json"
#: a split bundle's frozen prefix: ``input_ids`` -> ``hidden`` (inference only, no LoRA); the
#: training/eval models and checkpoint then hold the suffix, which takes ``hidden``
PREFIX = "prefix.onnx"
#: the prefix's weights, beside it as ONNX external data: ORT then reads them once instead of
#: holding a parsed copy of the whole model while it builds the session
PREFIX_DATA = "prefix.onnx.data"

#: bundle-relative paths
TRAIN_PATH, EVAL_PATH, CHECKPOINT_PATH = f"{DIR}/{TRAIN}", f"{DIR}/{EVAL}", f"{DIR}/{CHECKPOINT}"
INFER_PATH, IO_JSON_PATH = f"{DIR}/{INFER}", f"{DIR}/{IO_JSON}"
PREFIX_PATH = f"{DIR}/{PREFIX}"

#: graph input / output names
INPUT_IDS, LABELS, LOGITS, LOSS = "input_ids", "labels", "logits", "loss_sum"
#: the training model's per-token loss weights, float32 [rows, seq_len] like ``labels``:
#: ``loss_sum`` = sum(weights * CE) over scored tokens. Bundles exported before it existed lack
#: it; io.json's ``training_model.inputs`` lists it when the graph takes it (the reader's test).
WEIGHTS = "weights"
#: the residual stream between a split model's prefix and suffix, float32 [batch, seq, hidden]
HIDDEN = "hidden"
#: label value that scores nothing (padding)
IGNORE_INDEX = -100

#: io.json keys
IO_FORMAT_VERSION = "format_version"
IO_TRAINING_MODEL = "training_model"
IO_EVAL_MODEL = "eval_model"
IO_INFER = "infer"
IO_INPUTS = "inputs"
IO_OUTPUTS = "outputs"
IO_SESSION_CONFIG = "session_config"
IO_Q4_STORAGE = "q4_0_storage"
IO_LORA = "lora"
#: the frozen global-adapter slot (two-level adapters): PEFT key -> ONNX name, when the bundle has one
IO_GLOBAL = "global"
#: io.json's ``infer`` entry: True when infer.onnx has the ``labels`` input and ``loss_sum`` output
IO_INFER_LOSS = "loss"
#: io.json's entry for a split bundle: ``{"layer", "prefix", "input", "session_config"}``
IO_SPLIT = "split"
IO_PREFIX_SESSION_CONFIG = "prefix_session_config"


class OnnxQ4(str, enum.Enum):
    """How q4_0 weights are stored in the onnx graphs."""

    PACKED = "packed"  # two nibbles per byte, as the bundle holds them
    INT8 = "int8"  # one int8 (nibble - 8) per weight: twice the bytes, cheaper to dequantize


@dataclass(frozen=True)
class OnnxOptions:
    """Export options of the ``onnx`` target.

    ``rows``: static rows of the training graph (``None``: the bundle's batch size); a bigger
    batch runs as micro-batches of ``rows`` whose gradients accumulate exactly.
    ``q4``: q4_0 storage, ``"packed"`` (default) or ``"int8"``.
    Raises :class:`ConfigError` naming the field and its allowed values.
    """

    rows: int | None = None
    q4: OnnxQ4 | str = OnnxQ4.PACKED

    def __post_init__(self) -> None:
        if self.rows is not None and (isinstance(self.rows, bool) or not isinstance(self.rows, int) or self.rows < 1):
            raise ConfigError(
                f"OnnxOptions.rows must be None or a positive integer (rows per training-graph run), got {self.rows!r}"
            )
        try:
            q4 = OnnxQ4(
                self.q4.strip().lower() if isinstance(self.q4, str) and not isinstance(self.q4, OnnxQ4) else self.q4
            )
        except ValueError:
            raise ConfigError(f"OnnxOptions.q4 must be one of {[q.value for q in OnnxQ4]}, got {self.q4!r}") from None
        object.__setattr__(self, "q4", q4)

    def rows_for(self, batch_size: int) -> int:
        """The training graph's rows for a bundle of ``batch_size``."""
        return batch_size if self.rows is None else self.rows

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "q4": self.q4.value}
