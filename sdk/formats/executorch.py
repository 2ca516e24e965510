"""The ``executorch`` target's contract: the bundle's ``executorch/`` file names and the
``signature.json`` keys the exporter writes and the executorch backend reads. Device-safe."""

from __future__ import annotations

DIR = "executorch"
#: forward + backward program: ``forward(input_ids, labels)`` -> loss, grads, params
TRAIN = f"{DIR}/train.pte"
#: logits program: ``forward(input_ids, *lora)``
INFER = f"{DIR}/infer.pte"
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
