"""Backend ``llamacpp``: llama.cpp (llama-cpp-python) over the bundle's ``gguf/`` base, CPU, inference only.

Every family the gguf target writes runs here (architectures ``llama``, ``qwen2``, ``qwen3``,
``gemma3``); adapters are converted for the base's architecture. Gemma 3's sliding-window layers
get llama.cpp's sliding-window cache, kept full-size (``swa_full``), so a sequence can still be
cut at any position and branches share prefixes as with the others.

The base GGUF (see :mod:`pocketpeft.export.gguf_target`: for q4_0 / q8_0 bundles its linears are
the bundle's own quantized bytes) is loaded once per backend. ``set_adapter`` converts the PEFT
tensors to a GGUF LoRA file in a private temp dir and hot-swaps it into the live context with
``llama_adapter_lora_init`` + ``llama_set_adapters_lora``; the base is never reloaded. An
adapter whose ``lora_B`` are all zero (peft's initialization) changes nothing and is not
attached, so it costs no compute.

Decoding uses llama.cpp's KV cache (sequence 0). Logits for every position come from a batch
whose tokens all request output (``llama_get_logits``), so no ``n_ctx x vocab`` score buffer is
kept. The cache is unified over ``_N_SEQ`` sequences: :meth:`LlamaCppBackend.branch_logits`
evaluates many continuations of shared prefixes in one ``llama_decode``, each on its own
sequence that shares the prefix's cells (the suggestion search batches through it). One
context serves ``logits`` and every :class:`LlamaCppDecoder`; the cache remembers
which tokens it holds, a decoder reuses the longest common prefix and re-evaluates the rest, so
interleaving decoders and ``logits`` calls is correct (just slower). As in the torch backend,
an adapter swap applies to tokens evaluated after it.

Its parts: :mod:`.llamacpp_log` (llama.cpp's log, collected for error messages),
:mod:`.llamacpp_context` (model + context through the C API) and :mod:`.llamacpp_branches` (the K/V
sequences: sequence 0 and the branches); this module is the backend over them.

Env: ``POCKETPEFT_THREADS`` (default 2), ``POCKETPEFT_LLAMACPP_N_CTX`` (default
min(2048, the model's context)).
"""

from __future__ import annotations

import ctypes
import json
import os
import tempfile
from collections import OrderedDict
from typing import Mapping

import numpy as np

from pocketpeft.adapter import peft_key
from pocketpeft.errors import (
    AdapterShapeError,
    BackendUnavailableError,
    CorruptFileError,
    InputTextError,
    MissingDependencyError,
)
from pocketpeft.manifest import Bundle

from ..evalsums import eval_sums
from ..protocol import Capabilities, EvalSums, Probe, StepResult, TrainConfig
from .llamacpp_branches import BRANCH_KEEP as _BRANCH_KEEP  # noqa: F401 - this module's names before the split
from .llamacpp_branches import KVCache
from .llamacpp_branches import common as _common  # noqa: F401
from .llamacpp_context import N_BATCH as _N_BATCH  # noqa: F401
from .llamacpp_context import N_SEQ as _N_SEQ  # noqa: F401
from .llamacpp_context import LlamaContext
from .llamacpp_context import LlamaContext as _Context  # noqa: F401
from .llamacpp_log import errors as _errors
from .llamacpp_log import llama_log as _llama_log

NAME = "llamacpp"
INFO = "gguf/info.json"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return "?"


def probe() -> Probe:
    """Available iff ``llama_cpp`` imports; CPU only, inference only."""
    from pocketpeft._deps import require

    try:
        require("llama_cpp", "llamacpp")
    except MissingDependencyError as e:
        return Probe(NAME, False, (), str(e))
    caps = {
        "cpu": Capabilities(
            train=False,
            infer=True,
            tier="cpu",
            kv_cache=True,
            notes=f"llama-cpp-python {_version()}, GGUF base + hot-swapped GGUF LoRA, "
            f"{_threads()} threads, inference only",
        )
    }
    return Probe(NAME, True, ("cpu",), "", caps)


def _threads() -> int:
    raw = os.environ.get("POCKETPEFT_THREADS", "").strip()
    try:
        return max(1, int(raw)) if raw else 2
    except ValueError:
        return 2


def _train_unavailable() -> BackendUnavailableError:
    return BackendUnavailableError(
        "llamacpp is inference-only: it cannot train LoRA adapters; train with "
        "another backend (torch, onnxruntime, executorch) and load the adapter here"
    )


def base_gguf_path(bundle: Bundle):
    """The verified path of the bundle's base GGUF. Raises :class:`ModelFileNotFoundError` when the
    bundle has no gguf target, :class:`CorruptFileError` for an unreadable ``gguf/info.json``."""
    bundle.require_target("gguf", reader="llamacpp")
    info_path = bundle.path_of(INFO)
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        rel = info["base"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CorruptFileError(f"{info_path} is not a valid gguf target description: {e}") from e
    return bundle.path_of(rel)


class LlamaCppBackend:
    """llama.cpp inference backend; see the module docstring."""

    name = NAME

    def __init__(self, device: str = "cpu") -> None:
        if device != "cpu":
            raise BackendUnavailableError(f"backend 'llamacpp' runs on 'cpu' only, not {device!r}")
        self.device = device
        self.llm: LlamaContext | None = None  # model + context, created once in load()
        self.bundle: Bundle | None = None
        self._adapter: dict[str, np.ndarray] = {}
        self._lora = None  # the attached llama_adapter_lora pointer, or None
        self._global = None  # the attached global adapter's pointer (two-level adapters), or None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._cache: KVCache | None = None  # the context's K/V sequences, created in load()
        self._swaps = 0

    def capabilities(self) -> Capabilities:
        return probe().capabilities[self.device]

    # ---- loading -------------------------------------------------------------------------------
    def load(self, bundle: Bundle) -> None:
        """Load the base GGUF once and attach the bundle's initial adapter. Raises
        :class:`ModelFileNotFoundError` (no gguf target / missing file), :class:`CorruptFileError`
        (hash mismatch, or llama.cpp cannot read the file), :class:`MissingDependencyError`."""
        from pocketpeft._deps import require

        require("llama_cpp", "llamacpp")
        path = base_gguf_path(bundle)
        self.close()  # a second load() replaces the first model cleanly
        with open(path, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise CorruptFileError(f"{path} is not a GGUF file (bad magic)")
        arch = bundle.manifest.arch
        n_ctx = min(arch.max_position_embeddings, 2048)
        raw = os.environ.get("POCKETPEFT_LLAMACPP_N_CTX", "").strip()
        if raw.isdigit() and int(raw) > 0:
            n_ctx = min(int(raw), arch.max_position_embeddings)
        with _llama_log() as log:
            try:
                llm = LlamaContext(path, n_ctx, _threads(), exact=path.name.endswith(".f32.gguf"))
            except (ValueError, RuntimeError, OSError) as e:
                raise CorruptFileError(f"llama.cpp cannot load {path}: {e} ({_errors(log)})") from e
        if llm.n_vocab() != arch.vocab_size:
            raise CorruptFileError(f"{path} has a vocabulary of {llm.n_vocab()}, the manifest says {arch.vocab_size}")
        self.llm, self.bundle = llm, bundle
        self._cache = KVCache(llm)
        self._tmp = tempfile.TemporaryDirectory(prefix="pocketpeft-lora-")
        self.set_adapter(bundle.initial_adapter().tensors)

    @property
    def _llm(self) -> LlamaContext:
        if self.llm is None:
            raise RuntimeError("backend not loaded: call load(bundle) first")
        return self.llm

    @property
    def _kvc(self) -> KVCache:
        _ = self._llm  # raises unless loaded
        return self._cache

    # the K/V cache's state, under the names it had before the cache was its own class
    @property
    def _n_ctx(self) -> int:
        return self._kvc.n_ctx

    @property
    def _vocab(self) -> int:
        return self._kvc.vocab

    @property
    def _kv(self) -> list[int]:
        return self._cache.kv if self._cache is not None else []

    @property
    def _branches(self) -> "OrderedDict[int, list[int]]":
        return self._cache.branches if self._cache is not None else OrderedDict()

    @property
    def last_branch_tokens(self) -> int:
        """Tokens the last :meth:`branch_logits` call evaluated."""
        return self._cache.last_branch_tokens if self._cache is not None else 0

    # ---- training: not here ----------------------------------------------------------------------
    def configure(self, cfg: TrainConfig) -> None:
        raise _train_unavailable()

    def train_step(self, input_ids: np.ndarray, labels: np.ndarray) -> StepResult:
        raise _train_unavailable()

    # ---- evaluation ------------------------------------------------------------------------------
    def _evaluate(self, ids: list[int], prefix: list[int]) -> np.ndarray:
        """Logits of ``ids`` appended to ``prefix`` (which the caller holds as context): the cache
        keeps the longest common prefix it already has and evaluates the rest."""
        return self._kvc.evaluate(ids, prefix)

    def branch_logits(self, seqs: "list[list[int]]") -> np.ndarray:
        """float32 logits [len(seqs), vocab] after the last token of each full token sequence.

        Each sequence gets its own K/V sequence in llama.cpp's unified cache, which starts as a
        copy (shared cells, no compute) of the longest prefix held by sequence 0 or by an earlier
        branch; only the rest is evaluated, and every sequence's new tokens go into one batch.
        A 1-token forward on 2 cores reads every weight for little arithmetic, so 8 branches of
        an f32 base cost about twice one. Up to ``_N_SEQ - 1`` branches stay cached (least
        recently used dropped first, and those more than ``_BRANCH_KEEP`` tokens off the newest
        request); an adapter swap drops them. :attr:`last_branch_tokens` counts the tokens
        evaluated. Sequence 0 (``logits`` / :class:`LlamaCppDecoder`) is left as it was."""
        seqs = [[int(t) for t in s] for s in seqs]
        if not seqs or any(not s for s in seqs):
            raise InputTextError("branch_logits needs one or more non-empty token sequences")
        cache = self._kvc  # raises unless loaded
        for s in seqs:
            cache.check_ids(s)
        return cache.branch_logits(seqs)

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """float32 logits [B, T, vocab], each row evaluated from an empty cache."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise InputTextError(f"input_ids must be [batch, seq], got shape {ids.shape}")
        cache = self._kvc  # raises unless loaded
        out = np.empty((ids.shape[0], ids.shape[1], cache.vocab), np.float32)
        for r, row in enumerate(ids.tolist() if ids.shape[1] else []):
            cache.check_ids(row)
            cache.reset(0)
            out[r] = cache.decode(row, 0, outputs=True)
        return out

    def eval_batch(self, input_ids: np.ndarray, labels: np.ndarray) -> EvalSums:
        """Next-token sums of ``logits(input_ids)`` (numpy: no torch on the device)."""
        return eval_sums(self.logits(input_ids), labels)

    # ---- adapters ----------------------------------------------------------------------------------
    def get_adapter(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._adapter.items()}

    def set_adapter(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Hot-swap the LoRA tensors: convert them to a GGUF LoRA and attach it to the live
        context (the base stays loaded). Raises :class:`AdapterShapeError` for tensors that don't
        fit the bundle; the previous adapter stays attached then."""
        arrays = self._checked(tensors, "adapter")
        zero = not any(np.any(v) for k, v in arrays.items() if ".lora_B." in k)
        new = None if zero else self._init_lora(arrays)
        self._attach(new, self._global)
        if self._lora:
            llama_cpp().llama_adapter_lora_free(self._lora)  # detached above, so safe to free
        self._lora, self._adapter = new, arrays

    def set_global(self, tensors: Mapping[str, np.ndarray] | None) -> None:
        """Attach the frozen global adapter next to the personal one: llama.cpp applies every
        attached LoRA, each at scale 1 (see SupportsGlobal). ``None`` detaches it."""
        new = None if tensors is None else self._init_lora(self._checked(tensors, "global adapter"))
        self._attach(self._lora, new)
        if self._global:
            llama_cpp().llama_adapter_lora_free(self._global)
        self._global = new

    def _checked(self, tensors: Mapping[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
        from pocketpeft.adapter import Adapter, check_adapter_shapes

        m = self.bundle.manifest if self.bundle is not None else None
        if m is None:
            raise RuntimeError("backend not loaded: call load(bundle) first")
        arrays = {peft_key(k): np.array(v, dtype=np.float32) for k, v in tensors.items()}
        check_adapter_shapes(Adapter(m.lora, arrays), m.trainable, f"{what} for this bundle")
        bad = [k for k, v in arrays.items() if not np.isfinite(v).all()]
        if bad:
            raise AdapterShapeError(f"{what} tensor {bad[0]} holds NaN or inf values")
        return arrays

    def _init_lora(self, arrays: dict[str, np.ndarray]):
        """A llama.cpp LoRA handle for PEFT-named ``arrays`` (through a temporary GGUF LoRA file)."""
        from pocketpeft.adapter import Adapter
        from pocketpeft.formats.gguf_lora import adapter_to_gguf

        lc, m = llama_cpp(), self.bundle.manifest
        self._swaps += 1
        path = os.path.join(self._tmp.name, f"adapter-{self._swaps}.gguf")
        adapter_to_gguf(Adapter(m.lora, arrays), path, m)
        with _llama_log() as log:
            try:
                new = lc.llama_adapter_lora_init(self._llm.model, path.encode("utf-8"))
            finally:
                os.remove(path)
        if not new:
            raise AdapterShapeError(f"llama.cpp rejected the converted adapter: {_errors(log)}")
        return new

    def _attach(self, personal, global_) -> None:
        """Make exactly ``personal`` and ``global_`` (either may be None) the context's adapters;
        on failure the new handles are freed and the context keeps what it had."""
        lc = llama_cpp()
        handles = [h for h in (global_, personal) if h]
        if handles:
            adapters = (lc.llama_adapter_lora_p_ctypes * len(handles))(*handles)
            scales = (ctypes.c_float * len(handles))(*([1.0] * len(handles)))
            rc = lc.llama_set_adapters_lora(self._llm.ctx, adapters, len(handles), scales)
        else:
            rc = lc.llama_set_adapters_lora(self._llm.ctx, None, 0, None)
        if rc != 0:
            for h, old in ((personal, self._lora), (global_, self._global)):
                if h and h != old:
                    lc.llama_adapter_lora_free(h)
            raise RuntimeError(f"llama_set_adapters_lora failed with code {rc}")
        self._kvc.drop_branches(lambda toks: True)  # their K/V came from the previous weights

    @property
    def adapter_attached(self) -> bool:
        """Whether a LoRA is attached to the context (False for an all-zero ``lora_B`` adapter)."""
        return bool(self._lora)

    def decoder(self) -> "LlamaCppDecoder":
        """A KV-cached decoder on llama.cpp's cache (adapter swaps apply to later tokens)."""
        _ = self._llm  # raises unless loaded
        return LlamaCppDecoder(self)

    def close(self) -> None:
        """Free the adapter and the llama.cpp model/context now (else when garbage-collected)."""
        import llama_cpp

        if self.llm is not None:
            if self._lora or self._global:
                llama_cpp.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
            for h in (self._lora, self._global):
                if h:
                    llama_cpp.llama_adapter_lora_free(h)
            with _llama_log():
                self.llm.close()
        if self._cache is not None:
            self._cache.close()
        if self._tmp is not None:
            self._tmp.cleanup()
        self.llm, self._lora, self._global, self._cache, self._tmp = None, None, None, None, None


class LlamaCppDecoder:
    """Incremental decoding on llama.cpp's KV cache (see protocol.Decoder)."""

    def __init__(self, backend: LlamaCppBackend) -> None:
        self.backend = backend
        self._ids: list[int] = []
        self.last_tokens = 0  # tokens the last branch_logits call evaluated

    @property
    def n_tokens(self) -> int:
        return len(self._ids)

    def extend(self, ids: list[int]) -> np.ndarray:
        ids = [int(i) for i in ids]
        if not ids:
            return np.zeros((0, self.backend._vocab), np.float32)
        logits = self.backend._evaluate(ids, self._ids)
        self._ids.extend(ids)
        return logits

    def branch_logits(self, seqs: "list[list[int]]") -> np.ndarray:
        """Logits after each of several full token sequences, in one forward pass (see
        :meth:`LlamaCppBackend.branch_logits`); this decoder's own sequence is unchanged."""
        out = self.backend.branch_logits(seqs)
        self.last_tokens = self.backend.last_branch_tokens
        return out

    def truncate(self, n: int) -> None:
        # The cache is trimmed lazily: the next extend keeps the common prefix (llama_memory_seq_rm).
        if n < len(self._ids):
            del self._ids[max(0, n) :]


def llama_cpp():
    """The ``llama_cpp`` module (imported on first use: the backend's module loads without it)."""
    import llama_cpp as lc

    return lc


def create(device: str = "cpu") -> LlamaCppBackend:
    """A new, unloaded llama.cpp backend (``cpu`` only)."""
    return LlamaCppBackend(device)
