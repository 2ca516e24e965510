"""Global adapters: the shared half of the two-level (global + personal) adapters.

A global adapter is a PEFT adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``, loadable by ``peft``) plus ``global.json``: its version, the
sha256 of its weights file, the base model it belongs to, and how it was made (fleet rounds and
clients, aggregation, the differential-privacy guarantee with its accountant, or host training
on public text). It is learned once for everyone — across the fleet with Flower or on a host —
and every backend applies it *frozen*; each device trains its personal adapter on top of it.

A global adapter has the bundle's LoRA shape (same target modules, layers and rank): every
backend then holds exactly one frozen slot of known shape next to the trainable one, so a device
can install a newer global adapter without re-exporting anything.

Files from elsewhere are untrusted: :func:`load_global` checks the hash, the base, every tensor's
name, shape and finiteness before anything uses it, and :func:`install_global` replaces a
bundle's ``global/`` directory atomically, so a refused adapter leaves the previous one in place.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .adapter import CONFIG_NAME, WEIGHTS_NAME, Adapter, check_adapter_shapes, load_adapter, save_adapter
from .errors import (
    AdapterShapeError,
    BaseModelMismatchError,
    CorruptFileError,
    ModelFileNotFoundError,
    PocketPeftError,
)
from .fsutil import atomic_dir, sha256_file

#: the global adapter's directory inside a bundle
GLOBAL_DIR = "global"
INFO_NAME = "global.json"
INFO_FORMAT = 1


@dataclass
class GlobalInfo:
    """What ``global.json`` records about a global adapter."""

    version: int
    sha256: str = ""  # of adapter_model.safetensors; filled by save_global
    base_sha256: str | None = None
    #: "fleet" (federated), "host" (trained on a host from public text), or another producer's name
    source: str = "host"
    rounds: int = 0
    clients: int = 0
    aggregation: str = "fedavg"
    #: {"epsilon", "delta", "noise_multiplier", "clip_norm", "sampling_rate", "rounds", "accountant"} or None
    dp: dict[str, Any] | None = None
    created: float = field(default_factory=time.time)
    notes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": INFO_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "GlobalInfo":
        if not isinstance(d, dict):
            raise CorruptFileError(f"{where} is not a JSON object")
        if d.get("format") != INFO_FORMAT:
            raise CorruptFileError(f"{where}: field 'format' must be {INFO_FORMAT}, got {d.get('format')!r}")
        version = d.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise CorruptFileError(f"{where}: field 'version' must be a positive integer, got {version!r}")
        sha = d.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64:
            raise CorruptFileError(f"{where}: field 'sha256' must be a 64-character hex digest, got {sha!r}")
        dp = d.get("dp")
        if dp is not None and not isinstance(dp, dict):
            raise CorruptFileError(f"{where}: field 'dp' must be an object or null, got {dp!r}")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def save_global(adapter: Adapter, info: GlobalInfo, path: str | os.PathLike, base_name: str | None = None) -> Path:
    """Write a global adapter directory atomically: the PEFT adapter, then ``global.json`` with
    the weights' sha256. ``info.base_sha256`` defaults to the adapter's. Returns the path."""
    path = Path(path)
    with atomic_dir(path) as stage:
        save_adapter(adapter, stage / "peft", base_name)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            os.replace(stage / "peft" / name, stage / name)
        (stage / "peft").rmdir()
        info.sha256 = sha256_file(stage / WEIGHTS_NAME)
        info.base_sha256 = info.base_sha256 or adapter.base_sha256
        (stage / INFO_NAME).write_text(json.dumps(info.to_dict(), indent=1) + "\n")
    return path


def load_global(
    path: str | os.PathLike,
    expect_base_sha256: str | None = None,
    expect_shapes: Mapping[str, list[int]] | None = None,
    expect_lora: Any = None,
) -> tuple[Adapter, GlobalInfo]:
    """Read and check a global adapter directory.

    Raises :class:`ModelFileNotFoundError` (no such directory or file), :class:`CorruptFileError`
    (bad ``global.json``, weights that don't match its sha256, NaN/inf tensors),
    :class:`BaseModelMismatchError` (made for another base) and :class:`AdapterShapeError`
    (tensor names or shapes other than ``expect_shapes``, a LoRA scaling other than ``expect_lora``'s).
    """
    path = Path(path)
    ipath = path / INFO_NAME
    if not path.is_dir():
        raise ModelFileNotFoundError(f"global adapter directory {path} not found")
    if not ipath.is_file():
        raise ModelFileNotFoundError(f"{ipath} not found: {path} is not a global adapter (made by `pocketpeft fleet`)")
    try:
        raw = json.loads(ipath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{ipath} is not valid JSON: {e}") from e
    info = GlobalInfo.from_dict(raw, str(ipath))
    wpath = path / WEIGHTS_NAME
    if wpath.is_file() and sha256_file(wpath) != info.sha256:
        raise CorruptFileError(f"{wpath} does not match the sha256 in {ipath} (corrupt or replaced)")
    adapter = load_adapter(path, expect_base_sha256=expect_base_sha256)
    for base in (info.base_sha256, adapter.base_sha256):
        if expect_base_sha256 and base and base != expect_base_sha256:
            raise BaseModelMismatchError(
                f"global adapter {path} was made for base {base[:12]}…, this bundle's base is {expect_base_sha256[:12]}…"
            )
    if expect_base_sha256 and not (info.base_sha256 or adapter.base_sha256):
        raise BaseModelMismatchError(f"global adapter {path} does not say which base model it was made for")
    if expect_shapes is not None:
        check_adapter_shapes(adapter, expect_shapes, f"{path} (global)")
    if expect_lora is not None and not math.isclose(adapter.config.scaling, expect_lora.scaling):
        raise AdapterShapeError(
            f"global adapter {path} has LoRA scaling {adapter.config.scaling:g} (r={adapter.config.r}, "
            f"alpha={adapter.config.lora_alpha}); this bundle's LoRA uses {expect_lora.scaling:g}"
        )
    for k, v in adapter.tensors.items():
        if not np.isfinite(v).all():
            raise CorruptFileError(f"global adapter {path}: tensor {k} holds NaN or inf values")
    return adapter, info


def install_global(bundle: Any, src: str | os.PathLike) -> GlobalInfo:
    """Check the global adapter at ``src`` against ``bundle`` (a :class:`~pocketpeft.manifest.Bundle`)
    and put it in the bundle's ``global/`` directory atomically.

    Refuses (typed error, the installed one untouched) an adapter for another base, of another
    LoRA shape, corrupt, or not newer than the installed one. Returns the installed info.
    """
    from .manifest import Bundle

    if not isinstance(bundle, Bundle):
        bundle = Bundle(bundle)
    m = bundle.manifest
    adapter, info = load_global(src, m.base_sha256, m.trainable, m.lora)
    try:
        current = bundle.global_info()
    except PocketPeftError:  # a corrupt installed one must not stop a good one from replacing it
        current = None
    if current is not None and info.version <= current.version and info.sha256 != current.sha256:
        raise CorruptFileError(
            f"global adapter {src} has version {info.version}, not newer than the installed version {current.version}"
        )
    dest = Path(bundle.root) / GLOBAL_DIR
    with atomic_dir(dest) as stage:
        for name in (CONFIG_NAME, WEIGHTS_NAME, INFO_NAME):
            shutil.copyfile(Path(src) / name, stage / name)
        # the copy is checked where it will live, before it replaces anything: a source that
        # changed after the first check is refused here and the installed one stays
        _, copied = load_global(stage, m.base_sha256, m.trainable, m.lora)
        if copied.sha256 != info.sha256:
            raise CorruptFileError(f"global adapter {src} changed while it was being installed")
    return info
