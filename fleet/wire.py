"""What travels between the fleet's ServerApp and ClientApps, as Flower records.

Plain rounds (Flower's Message API):

- server → device: ``fleet.global`` (ArrayRecord: every tensor of the global adapter, PEFT names,
  float32) and ``fleet.config`` (ConfigRecord: the round's training settings, see
  :func:`round_config`);
- device → server: ``fleet.delta`` (ArrayRecord: the clipped, noised change of the shared tensors)
  and ``fleet.metrics`` (MetricRecord: numbers only — examples, steps, mean loss, the base model as
  a number). No text, no strings.

Secure-aggregation rounds use Flower's SecAgg+ workflow, which speaks the legacy ``FitIns`` /
``FitRes`` records (``fitins.parameters`` / ``fitres.parameters``: unnamed arrays). Their order is
the sorted tensor names of the round's shared tensors on both sides (:func:`~.updates.shared_names`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

GLOBAL = "fleet.global"
CONFIG = "fleet.config"
DELTA = "fleet.delta"
METRICS = "fleet.metrics"
#: a node's context state: its own lora_B under FedSA
LOCAL_B = "fleet.lora_B"


def to_array_record(tensors: Mapping[str, np.ndarray]):
    """An ArrayRecord of float32 numpy arrays under their names."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in tensors.items()})


def from_array_record(record) -> dict[str, np.ndarray]:
    """The numpy arrays of an ArrayRecord by name."""
    return {k: v.numpy() for k, v in record.items()}


def payload_bytes(tensors: Mapping[str, np.ndarray]) -> int:
    """Bytes of tensor data (what an update costs on the wire, framing aside)."""
    return int(sum(np.asarray(v).nbytes for v in tensors.values()))


def to_parameters(tensors: Mapping[str, np.ndarray], names: Sequence[str]):
    """Legacy ``Parameters`` of ``tensors`` in ``names`` order (SecAgg+ rounds)."""
    from flwr.common import ndarrays_to_parameters

    return ndarrays_to_parameters([np.ascontiguousarray(tensors[n], dtype=np.float32) for n in names])


def from_parameters(parameters, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Named arrays of legacy ``Parameters`` laid out in ``names`` order; raises ValueError on a count mismatch."""
    from flwr.common import parameters_to_ndarrays

    arrays = parameters_to_ndarrays(parameters)
    if len(arrays) != len(names):
        raise ValueError(f"expected {len(names)} arrays, got {len(arrays)}")
    return dict(zip(names, arrays))


#: the settings a round sends to devices: (config key, type)
ROUND_KEYS: dict[str, type] = {
    "round": int,
    "bundle": str,
    "backend": str,
    "steps": int,
    "seconds": float,
    "lr": float,
    "batch-size": int,
    "clip-norm": float,
    "noise-std": float,
    "fedsa": bool,
    "secagg": bool,  # the round is securely aggregated: devices report no per-device numbers
    "share-b": bool,
    "weighted": bool,
    "max-weight": float,
    "max-texts": int,
    "seed": int,
    "sim-senders": str,  # simulation: comma-separated chitchat sender ids by partition id
}


def round_config(**values: Any) -> dict[str, Any]:
    """A round's settings with ``None`` values left out (Flower records hold no None); keys as in
    :data:`ROUND_KEYS` with ``_`` for ``-``."""
    out = {}
    for k, v in values.items():
        key = k.replace("_", "-")
        if key not in ROUND_KEYS:
            raise KeyError(f"unknown round setting {k!r}")
        if v is not None:
            out[key] = ROUND_KEYS[key](v)
    return out
