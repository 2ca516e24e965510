"""The ``coreml`` target's contract: the bundle's ``coreml/`` file names. Device-safe."""

from __future__ import annotations

DIR = "coreml"
#: the ML Program package (a directory): input_ids + LoRA tensors as inputs, logits out
PACKAGE = f"{DIR}/model.mlpackage"
#: Core ML input name -> PEFT key, shapes, dtypes, storage of the frozen weights
SIGNATURE = f"{DIR}/signature.json"


def coreml_name(key: str) -> str:
    """The Core ML feature name of a PEFT key (identifiers only: ``.`` -> ``_``)."""
    return key.replace(".", "_")
