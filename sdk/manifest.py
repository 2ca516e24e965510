"""The bundle contract: ``manifest.json`` and the :class:`Bundle` that reads and verifies it.

A bundle directory holds the manifest, ``tokenizer.json``, the initial adapter (``adapter/``,
PEFT format: every backend starts from the same LoRA tensors) and one folder per target. The
manifest records the base model's hash, architecture, quant format, LoRA config, trainable
tensor names and shapes, and every file with its sha256, so a bundle can be checked before use.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import LoraConfig, ModelConfig, QuantFormat
from .errors import CorruptFileError, ModelFileNotFoundError, PocketPeftError, UnsupportedModelError
from .fsutil import sha256_file

MANIFEST_NAME = "manifest.json"
#: other people's messages for the Personalizer's general-text check (optional)
GENERAL_TEXT = "general.txt"
FORMAT = "pocketpeft-bundle"
#: the version this pocketpeft writes for a split bundle; unsplit bundles stay at version 1, so
#: readers from before the split keep opening them (and refuse split ones by their version)
FORMAT_VERSION = 2
#: versions this pocketpeft reads
READABLE_VERSIONS = (1, 2)
#: features a manifest may list under ``requires``; a reader refuses any it doesn't know
FEATURES = ("split", "global")


@dataclass
class Manifest:
    """Everything a runtime needs to know about a bundle before loading any weights."""

    base_source: str
    base_sha256: str
    arch: ModelConfig
    quant: QuantFormat
    lora: LoraConfig
    trainable: dict[str, list[int]]
    seq_len: int
    batch_size: int
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # relpath -> {sha256, bytes, target}
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)  # target -> {files:[...], toolchain:{...}}
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    format_version: int = FORMAT_VERSION
    #: per-target export options as written (e.g. ``{"onnx": {"rows": 2, "q4": "int8"}}``)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the split model (:class:`Split`) when LoRA covers only the upper layers, else ``None``
    split: "Split | None" = None
    #: whether the graph targets (onnx, executorch, coreml) carry a frozen global-adapter slot;
    #: torch, peft and llama.cpp apply a global adapter without one
    global_slot: bool = False

    def __post_init__(self) -> None:
        if self.split is not None or self.global_slot:
            self.format_version = FORMAT_VERSION
            if self.split is not None and self.split.layer >= self.arch.num_hidden_layers:
                raise UnsupportedModelError(
                    f"manifest field 'split.layer' is {self.split.layer}; the model has layers "
                    f"0..{self.arch.num_hidden_layers - 1}"
                )
        elif self.format_version == FORMAT_VERSION:
            self.format_version = 1  # nothing here needs a newer reader

    @property
    def requires(self) -> list[str]:
        """Features a reader must understand to use this bundle (``"split"``, ``"global"``: graphs with a
        global-adapter slot)."""
        return (["split"] if self.split is not None else []) + (["global"] if self.global_slot else [])

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "created": self.created,
            "versions": self.versions,
            "base": {"source": self.base_source, "sha256": self.base_sha256},
            "arch": self.arch.to_dict(),
            "quant": self.quant.value,
            "lora": self.lora.to_dict(),
            "trainable": self.trainable,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "targets": self.targets,
            "files": self.files,
            "options": self.options,
            **({"requires": self.requires} if self.requires else {}),
            **({"split": self.split.to_dict()} if self.split is not None else {}),
            **({"global_slot": True} if self.global_slot else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = MANIFEST_NAME) -> "Manifest":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise CorruptFileError(
                f"{where} is not a pocketpeft bundle manifest (format={d.get('format') if isinstance(d, dict) else None!r})"
            )
        if d.get("format_version") not in READABLE_VERSIONS:
            raise UnsupportedModelError(
                f"{where} has bundle format version {d.get('format_version')!r}; "
                f"this pocketpeft reads versions {', '.join(map(str, READABLE_VERSIONS))}"
            )
        unknown = [f for f in d.get("requires") or [] if f not in FEATURES]
        if unknown:
            raise UnsupportedModelError(
                f"{where}: field 'requires' lists {unknown}, features this pocketpeft does not know "
                f"(it knows: {', '.join(FEATURES)}); upgrade pocketpeft to open this bundle"
            )
        try:
            return cls(
                base_source=d["base"]["source"],
                base_sha256=d["base"]["sha256"],
                arch=ModelConfig.from_dict(d["arch"]),
                quant=QuantFormat.parse(d["quant"]),
                lora=LoraConfig.from_dict(d["lora"]),
                trainable=dict(d["trainable"]),
                seq_len=int(d["seq_len"]),
                batch_size=int(d["batch_size"]),
                files=dict(d.get("files", {})),
                targets=dict(d.get("targets", {})),
                versions=dict(d.get("versions", {})),
                created=d.get("created", ""),
                format_version=d["format_version"],
                options=dict(d.get("options", {})),
                split=Split.from_dict(d["split"], where) if d.get("split") is not None else None,
                global_slot=bool(d.get("global_slot", False)),
            )
        except PocketPeftError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptFileError(f"{where} is missing or has a malformed field: {e}") from e


@dataclass(frozen=True)
class Split:
    """A model split at decoder layer ``layer``: the *prefix* (embedding + layers ``< layer``, no
    LoRA) is frozen inference whose output, the residual stream entering ``layer`` (float32
    ``[batch, seq, hidden_size]``, positions from 0), can be computed once per row and cached; the
    *suffix* (layers ``>= layer``, final norm, output projection, loss) is the only training graph.
    ``targets``: the targets whose files are split (``onnx``: ``prefix.onnx`` + suffix training
    artifacts; ``executorch``: ``prefix.pte`` on XNNPACK + the suffix's ``train.pte`` and
    ``suffix.pte``); the torch reference splits at run time from its whole-model weights."""

    layer: int
    hidden_size: int
    targets: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "hidden_size": self.hidden_size, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: Any, where: str = MANIFEST_NAME) -> "Split":
        if not isinstance(d, dict):
            raise CorruptFileError(f"{where}: field 'split' must be an object, got {type(d).__name__}")
        try:
            layer, hidden = d["layer"], d["hidden_size"]
            targets = tuple(str(t) for t in d.get("targets", ()))
        except (KeyError, TypeError) as e:
            raise CorruptFileError(f"{where}: field 'split' is missing {e}") from e
        for name, v in (("layer", layer), ("hidden_size", hidden)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise CorruptFileError(f"{where}: field 'split.{name}' must be a positive integer, got {v!r}")
        return cls(layer, hidden, targets)


class Bundle:
    """An exported bundle on disk. ``Bundle(path)`` reads the manifest; :meth:`verify` checks
    files against their recorded hashes; :meth:`path_of` resolves a file of a target.

    Raises :class:`ModelFileNotFoundError` (no such bundle / missing file) and
    :class:`CorruptFileError` (unreadable manifest, hash mismatch).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.root = Path(path)
        mpath = self.root / MANIFEST_NAME
        if not self.root.is_dir():
            raise ModelFileNotFoundError(
                f"bundle directory {self.root} not found (create one with `pocketpeft export`)"
            )
        if not mpath.is_file():
            raise ModelFileNotFoundError(f"{mpath} not found: {self.root} is not a pocketpeft bundle")
        try:
            raw = json.loads(mpath.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptFileError(f"{mpath} is not valid JSON: {e}") from e
        self.manifest = Manifest.from_dict(raw, str(mpath))
        self._verified: set[str] = set()

    @property
    def targets(self) -> list[str]:
        return sorted(self.manifest.targets)

    def require_target(self, target: str, reader: str | None = None) -> None:
        """Raise :class:`ModelFileNotFoundError` unless the bundle was exported with ``target``;
        ``reader`` (a backend name) is named in the message. The one check every reader uses."""
        if target not in self.manifest.targets:
            by = f", which backend {reader!r} reads" if reader else ""
            raise ModelFileNotFoundError(
                f"bundle {self.root} has no '{target}' target{by}; it has: "
                f"{', '.join(self.targets) or 'none'} (re-export with --targets {target})"
            )

    def files_of(self, target: str) -> list[str]:
        """Relative paths of the files that belong to ``target`` (plus shared files)."""
        return [p for p, info in self.manifest.files.items() if info.get("target") in (target, "shared")]

    def verify(self, target: str | None = None) -> None:
        """Check existence, size and sha256 of the files of ``target`` (all files if ``None``).

        Each file is checked once per Bundle object.
        """
        if target is not None:
            self.require_target(target)
        for rel in self.files_of(target) if target else list(self.manifest.files):
            self._check(rel)

    def _check(self, rel: str) -> None:
        if rel in self._verified:
            return
        info = self.manifest.files[rel]
        p = self.root / rel
        if not p.is_file():
            raise ModelFileNotFoundError(f"bundle file {p} named in the manifest is missing")
        size = p.stat().st_size
        if "bytes" in info and size != info["bytes"]:
            raise CorruptFileError(
                f"bundle file {p} is {size} bytes, the manifest says {info['bytes']} (truncated or replaced)"
            )
        if sha256_file(p) != info["sha256"]:
            raise CorruptFileError(f"bundle file {p} does not match its sha256 in the manifest (corrupt or replaced)")
        self._verified.add(rel)

    def path_of(self, rel: str) -> Path:
        """Absolute path of a bundle file, verified against the manifest."""
        if rel not in self.manifest.files:
            raise ModelFileNotFoundError(f"bundle {self.root} has no file {rel}")
        self._check(rel)
        return self.root / rel

    def tokenizer(self):
        """The bundle's :class:`~pocketpeft.tokenizer.Tokenizer`."""
        from .tokenizer import Tokenizer

        if "tokenizer_config.json" in self.manifest.files:
            self.path_of("tokenizer_config.json")  # verified: it carries the special-token ids
        return Tokenizer.from_file(self.path_of("tokenizer.json"))

    def initial_adapter(self):
        """The adapter every backend starts from (``adapter/`` in PEFT format)."""
        from .adapter import load_adapter

        self.path_of("adapter/adapter_model.safetensors")
        self.path_of("adapter/adapter_config.json")
        return load_adapter(self.root / "adapter", expect_base_sha256=self.manifest.base_sha256)

    def global_info(self):
        """The installed global adapter's :class:`~pocketpeft.global_adapter.GlobalInfo` (checked), or ``None``."""
        g = self.global_adapter()
        return None if g is None else g[1]

    def global_adapter(self):
        """``(Adapter, GlobalInfo)`` of the global adapter in ``global/`` — checked against this
        bundle's base and LoRA shapes — or ``None`` when none is installed. Raises the typed errors
        of :func:`~pocketpeft.global_adapter.load_global` for a corrupt or foreign one."""
        from .global_adapter import GLOBAL_DIR, load_global

        if not (self.root / GLOBAL_DIR).exists():
            return None
        info = self.root / GLOBAL_DIR / "global.json"
        key = info.stat().st_mtime_ns if info.exists() else None
        if key is None or getattr(self, "_global_cache", (None, None))[0] != key:
            self._global_cache = (
                key,
                load_global(
                    self.root / GLOBAL_DIR, self.manifest.base_sha256, self.manifest.trainable, self.manifest.lora
                ),
            )
        return self._global_cache[1]

    def general_texts(self) -> list[str]:
        """Other people's messages shipped in the bundle (``general.txt``, one per line) for the
        Personalizer's general-text check; ``[]`` for a bundle exported without them."""
        from .text import validate_texts

        if GENERAL_TEXT not in self.manifest.files:
            return []
        raw = self.path_of(GENERAL_TEXT).read_bytes()
        return validate_texts(raw.decode("utf-8", errors="strict").splitlines(), what=f"{self.root}/{GENERAL_TEXT}")

    def __repr__(self) -> str:
        m = self.manifest
        return f"Bundle({str(self.root)!r}, base={m.base_source}, quant={m.quant.value}, targets={self.targets})"
