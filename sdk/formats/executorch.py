"""The ``executorch`` target's contract: the bundle's ``executorch/`` file names and the
``signature.json`` keys the exporter writes and the executorch backend reads. Device-safe."""

from __future__ import annotations

DIR = "executorch"
#: forward + backward program: ``forward(input_ids, labels)`` -> loss, grads, params
#: (a split bundle's: ``forward(hidden, labels)`` over the suffix)
TRAIN = f"{DIR}/train.pte"
#: logits program: ``forward(input_ids, *lora)`` (the whole model, split bundle or not)
INFER = f"{DIR}/infer.pte"
#: a split bundle's frozen prefix: ``forward(input_ids)`` -> ``hidden`` float32 [B, T, hidden_size]
PREFIX = f"{DIR}/prefix.pte"
#: a split bundle's suffix logits program: ``forward(hidden, *lora)`` -> logits
SUFFIX = f"{DIR}/suffix.pte"
#: names every input/output and maps the train program's parameters to PEFT keys
SIGNATURE = f"{DIR}/signature.json"
#: The train program's parameter names are the wrapper's attribute (``model.``) + the HF name.
TRAIN_PREFIX = "model."

#: signature.json keys
SIG_TRAIN, SIG_INFER = "train", "infer"
SIG_METHOD, SIG_INPUTS, SIG_OUTPUTS, SIG_PARAMETERS = "method", "inputs", "outputs", "parameters"
SIG_BATCH_SIZE, SIG_SEQ_LEN = "batch_size", "seq_len"
SIG_MAX_BATCH, SIG_MAX_SEQ_LEN = "max_batch", "max_seq_len"
SIG_DELEGATES = "delegates"
#: a split bundle's entry: ``{"layer", "hidden_size", "prefix": {...}, "suffix": {...}}``
SIG_SPLIT, SIG_LAYER, SIG_HIDDEN_SIZE = "split", "layer", "hidden_size"
SIG_PREFIX, SIG_SUFFIX, SIG_FILE = "prefix", "suffix", "file"
#: the prefix program's kernels: ``"xnnpack"`` (lowered to XNNPACK) or ``"portable"`` (the fallback)
SIG_KERNELS = "kernels"
KERNELS_XNNPACK, KERNELS_PORTABLE = "xnnpack", "portable"
