"""Backend ``llamacpp``: llama.cpp (llama-cpp-python) over the bundle's ``gguf/`` base, CPU, inference only.

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

Env: ``POCKETPEFT_THREADS`` (default 2), ``POCKETPEFT_LLAMACPP_N_CTX`` (default
min(2048, the model's context)).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import tempfile
import weakref
from collections import OrderedDict
from typing import Iterator, Mapping

import numpy as np

from pocketpeft.adapter import peft_key
from pocketpeft.errors import (
    AdapterShapeError,
    BackendUnavailableError,
    CorruptFileError,
    InputTextError,
    MissingDependencyError,
    ModelFileNotFoundError,
    SequenceTooLongError,
)
from pocketpeft.manifest import Bundle

from ..evalsums import eval_sums
from ..protocol import Capabilities, EvalSums, Probe, StepResult, TrainConfig

NAME = "llamacpp"
INFO = "gguf/info.json"
_N_BATCH = 512
_N_SEQ = 32  # K/V sequences in the (unified) cache: 0 for decoding, the rest for branches
_BRANCH_KEEP = 16  # a branch is kept while at most this many of its tokens are not shared


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


_LOG_ERROR = 4  # ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
_log_sink: list[tuple[int, str]] = []


@functools.lru_cache(maxsize=1)
def _log_callback():
    import llama_cpp

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data) -> None:  # noqa: ANN001
        _log_sink.append((level, text.decode("utf-8", "replace")))

    return collect


@contextlib.contextmanager
def _llama_log() -> Iterator[list[tuple[int, str]]]:
    """Collect llama.cpp's log lines (level, text) instead of printing them, for the duration.
    llama-cpp-python 0.3.36 maps ggml's log levels off by one, so its own callback prints
    warnings (e.g. "cannot use buft 'CPU_REPACK'" for every LoRA tensor) even with verbose=False;
    errors are kept here for our exception messages instead."""
    import llama_cpp

    _log_sink.clear()
    llama_cpp.llama_log_set(_log_callback(), ctypes.c_void_p(0))
    try:
        yield _log_sink
    finally:
        try:
            from llama_cpp._logger import llama_log_callback as restore
        except ImportError:  # pragma: no cover - a future llama-cpp-python without it: stay quiet
            restore = _log_callback()
        llama_cpp.llama_log_set(restore, ctypes.c_void_p(0))


def _errors(log: list[tuple[int, str]]) -> str:
    """The error lines of a collected log, joined (or a generic hint)."""
    lines, keep = [], False
    for level, text in log:
        keep = level == _LOG_ERROR or (level == 5 and keep)
        if keep and text.strip():
            lines.append(text.strip())
    return "; ".join(lines[-4:]) or "no error message from llama.cpp"


def _train_unavailable() -> BackendUnavailableError:
    return BackendUnavailableError(
        "llamacpp is inference-only: it cannot train LoRA adapters; train with "
        "another backend (torch, onnxruntime, executorch) and load the adapter here"
    )


def base_gguf_path(bundle: Bundle):
    """The verified path of the bundle's base GGUF. Raises :class:`ModelFileNotFoundError` when the
    bundle has no gguf target, :class:`CorruptFileError` for an unreadable ``gguf/info.json``."""
    if "gguf" not in bundle.manifest.targets:
        raise ModelFileNotFoundError(
            f"bundle {bundle.root} has no 'gguf' target (it has: {', '.join(bundle.targets) or 'none'}); "
            "the llamacpp backend needs it: re-export with --targets gguf (e.g. `pocketpeft export BASE "
            "--out BUNDLE --targets torch,gguf`)"
        )
    info_path = bundle.path_of(INFO)
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        rel = info["base"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CorruptFileError(f"{info_path} is not a valid gguf target description: {e}") from e
    return bundle.path_of(rel)


def _common(a: "list[int]", b: "list[int]") -> int:
    """Length of the common prefix of two token lists."""
    n, lim = 0, min(len(a), len(b))
    while n < lim and a[n] == b[n]:
        n += 1
    return n


class _Context:
    """A llama.cpp model and one context, through the C API (llama-cpp-python's ``Llama`` does
    not expose the unified multi-sequence K/V cache that :meth:`LlamaCppBackend.branch_logits`
    needs). ``exact``: keep the K/V cache in float32 and flash attention off (for an f32 base
    that is there to compute as torch does)."""

    def __init__(self, path, n_ctx: int, threads: int, exact: bool) -> None:
        import llama_cpp

        llama_cpp.llama_backend_init()
        try:  # as Llama(verbose=False) does, unless the application set the level itself
            from llama_cpp._logger import logger, set_verbose

            if logger.level == 0:
                set_verbose(False)
        except ImportError:  # pragma: no cover - a future llama-cpp-python without it
            pass
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode("utf-8"), mp)
        if not self.model:
            raise ValueError("llama_model_load_from_file failed")
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, _N_BATCH, _N_BATCH
        cp.n_threads = cp.n_threads_batch = threads
        cp.n_seq_max, cp.kv_unified = _N_SEQ, True
        cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        if exact:
            cp.type_k = cp.type_v = 0  # GGML_TYPE_F32
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise ValueError("llama_init_from_model failed")
        self._vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))

    def n_ctx(self) -> int:
        import llama_cpp

        return llama_cpp.llama_n_ctx(self.ctx)

    def n_vocab(self) -> int:
        return self._vocab

    def close(self) -> None:
        import llama_cpp

        if self.ctx:
            llama_cpp.llama_free(self.ctx)
        if self.model:
            llama_cpp.llama_model_free(self.model)
        self.ctx = self.model = None


class LlamaCppBackend:
    """llama.cpp inference backend; see the module docstring."""

    name = NAME

    def __init__(self, device: str = "cpu") -> None:
        if device != "cpu":
            raise BackendUnavailableError(f"backend 'llamacpp' runs on 'cpu' only, not {device!r}")
        self.device = device
        self.llm: _Context | None = None  # model + context, created once in load()
        self.bundle: Bundle | None = None
        self._adapter: dict[str, np.ndarray] = {}
        self._lora = None  # the attached llama_adapter_lora pointer, or None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._batch = self._batch_free = None
        self._kv: list[int] = []  # tokens whose K/V sequence 0 of the cache holds
        self._branches: OrderedDict[int, list[int]] = OrderedDict()  # sequence id -> its tokens, LRU first
        self.last_branch_tokens = 0  # tokens the last branch_logits call evaluated
        self._swaps = 0

    def capabilities(self) -> Capabilities:
        return probe().capabilities[self.device]

    # ---- loading -------------------------------------------------------------------------------
    def load(self, bundle: Bundle) -> None:
        """Load the base GGUF once and attach the bundle's initial adapter. Raises
        :class:`ModelFileNotFoundError` (no gguf target / missing file), :class:`CorruptFileError`
        (hash mismatch, or llama.cpp cannot read the file), :class:`MissingDependencyError`."""
        from pocketpeft._deps import require

        llama_cpp = require("llama_cpp", "llamacpp")
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
                llm = _Context(path, n_ctx, _threads(), exact=path.name.endswith(".f32.gguf"))
            except (ValueError, RuntimeError, OSError) as e:
                raise CorruptFileError(f"llama.cpp cannot load {path}: {e} ({_errors(log)})") from e
        if llm.n_vocab() != arch.vocab_size:
            raise CorruptFileError(f"{path} has a vocabulary of {llm.n_vocab()}, the manifest says {arch.vocab_size}")
        self.llm, self.bundle, self._kv, self._branches = llm, bundle, [], OrderedDict()
        self._n_ctx, self._vocab = llm.n_ctx(), llm.n_vocab()
        self._mem = llama_cpp.llama_get_memory(llm.ctx)
        self._batch = llama_cpp.llama_batch_init(_N_BATCH, 0, 1)
        self._batch_free = weakref.finalize(self, llama_cpp.llama_batch_free, self._batch)
        self._tmp = tempfile.TemporaryDirectory(prefix="pocketpeft-lora-")
        self.set_adapter(bundle.initial_adapter().tensors)

    @property
    def _llm(self):
        if self.llm is None:
            raise RuntimeError("backend not loaded: call load(bundle) first")
        return self.llm

    # ---- training: not here ----------------------------------------------------------------------
    def configure(self, cfg: TrainConfig) -> None:
        raise _train_unavailable()

    def train_step(self, input_ids: np.ndarray, labels: np.ndarray) -> StepResult:
        raise _train_unavailable()

    # ---- evaluation ------------------------------------------------------------------------------
    def _check_ids(self, ids: list[int], start: int = 0) -> None:
        if start + len(ids) > self._n_ctx:
            raise SequenceTooLongError(
                f"sequence of {start + len(ids)} tokens exceeds the llama.cpp context of {self._n_ctx} "
                "(raise POCKETPEFT_LLAMACPP_N_CTX, up to the model's context)"
            )
        bad = [i for i in ids if not 0 <= i < self._vocab]
        if bad:
            raise InputTextError(f"token id {bad[0]} is not in [0, {self._vocab})")

    def _decode(self, ids: list[int], start: int, outputs: bool) -> np.ndarray | None:
        """Evaluate ``ids`` at positions ``start``.. on sequence 0 (cache must hold exactly the
        ``start`` tokens before); logits [len, vocab] for all of them when ``outputs``."""
        import llama_cpp

        out = []
        b = self._batch
        for c in range(0, len(ids), _N_BATCH):
            chunk = ids[c : c + _N_BATCH]
            n = len(chunk)
            b.n_tokens = n
            for i, tok in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i] = tok, start + c + i, 1
                b.seq_id[i][0] = 0
                b.logits[i] = outputs
            b.logits[n - 1] = True
            rc = llama_cpp.llama_decode(self._llm.ctx, b)
            if rc != 0:
                self._reset_kv()
                self._drop_branches(lambda toks: True)
                raise RuntimeError(f"llama_decode failed with code {rc}")
            self._kv.extend(chunk)
            if outputs:
                ptr = llama_cpp.llama_get_logits(self._llm.ctx)
                out.append(np.ctypeslib.as_array(ptr, shape=(n * self._vocab,)).reshape(n, self._vocab).copy())
        return np.concatenate(out) if outputs else None

    def _reset_kv(self, keep: int = 0) -> int:
        """Drop sequence 0's tokens from position ``keep`` on; returns how many are kept (0 when
        llama.cpp cannot cut this cache partially and it had to be cleared, branches too)."""
        import llama_cpp

        keep = max(keep, 0)
        if not llama_cpp.llama_memory_seq_rm(self._mem, 0, keep if keep else -1, -1):
            llama_cpp.llama_memory_clear(self._mem, True)
            self._branches.clear()
            keep = 0
        del self._kv[max(keep, 0) :]
        return len(self._kv)

    def _evaluate(self, ids: list[int], prefix: list[int]) -> np.ndarray:
        """Logits of ``ids`` appended to ``prefix`` (which the caller holds as context): the cache
        keeps the longest common prefix it already has and evaluates the rest."""
        self._check_ids(ids, len(prefix))
        n = _common(self._kv, prefix)
        n = self._reset_kv(n)
        if n < len(prefix):
            self._decode(prefix[n:], n, outputs=False)
        return self._decode(ids, len(prefix), outputs=True)

    # ---- branches: many continuations of a shared context in one forward pass -----------------
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
        for s in seqs:
            self._check_ids(s)
        _ = self._llm  # raises unless loaded
        self._drop_branches(lambda toks: len(toks) - _common(toks, seqs[0]) > _BRANCH_KEEP)
        out = np.empty((len(seqs), self._vocab), np.float32)
        self.last_branch_tokens = 0
        group: list[int] = []
        for i in range(len(seqs) + 1):
            full = (
                i == len(seqs)
                or len(group) == (_N_SEQ - 1) // 2
                or sum(len(seqs[j]) for j in group) + len(seqs[i]) > _N_BATCH
            )
            if group and full:
                todo = [seqs[j] for j in group]
                shared = todo[0][: min(map(len, todo)) - 1]
                for s in todo[1:]:
                    shared = shared[: _common(shared, s)]
                if len(todo) > 1 and shared and self._longest_held(shared)[1] < len(shared):
                    self._branch_group([shared])  # evaluate the shared part once, then branch off it
                out[group] = self._branch_group(todo)
                group = []
            if i < len(seqs):
                group.append(i)
        return out

    def _longest_held(self, s: "list[int]") -> tuple[int, int]:
        """(the K/V sequence holding the longest prefix of ``s``, that prefix's length)."""
        held = [(0, self._kv)] + list(self._branches.items())
        return max(((sid, _common(toks, s)) for sid, toks in held), key=lambda x: x[1])

    def _branch_group(self, seqs: "list[list[int]]", retry: bool = True) -> np.ndarray:
        import llama_cpp

        mem, b = self._mem, self._batch
        # (source sequence, shared length) per request; at least its last token is evaluated
        plan = [(src, min(m, len(s) - 1)) for s, (src, m) in zip(seqs, map(self._longest_held, seqs))]
        sources = {src for src, _ in plan}
        free = [sid for sid in range(1, _N_SEQ) if sid not in self._branches]
        free += [sid for sid in self._branches if sid not in sources]  # then LRU first
        n = 0
        dests = free[: len(seqs)]
        for (src, m), dst, s in zip(plan, dests, seqs):
            llama_cpp.llama_memory_seq_rm(mem, dst, -1, -1)
            if m:
                llama_cpp.llama_memory_seq_cp(mem, src, dst, 0, m)
            for j in range(m, len(s)):
                b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = s[j], j, 1, j == len(s) - 1
                b.seq_id[n][0] = dst
                n += 1
        for dst in dests:
            self._branches.pop(dst, None)
        b.n_tokens = n
        rc = llama_cpp.llama_decode(self._llm.ctx, b)
        if rc != 0:
            self._drop_branches(lambda toks: True)
            if rc == 1 and retry:  # no room in the cache: retry from sequence 0 alone
                return self._branch_group(seqs, retry=False)
            raise RuntimeError(f"llama_decode failed with code {rc}")
        for dst, s in zip(dests, seqs):
            self._branches[dst] = s
        self.last_branch_tokens += n
        ptr = llama_cpp.llama_get_logits(self._llm.ctx)
        return np.ctypeslib.as_array(ptr, shape=(len(seqs) * self._vocab,)).reshape(len(seqs), self._vocab).copy()

    def _drop_branches(self, which) -> None:
        import llama_cpp

        for sid in [sid for sid, toks in self._branches.items() if which(toks)]:
            llama_cpp.llama_memory_seq_rm(self._mem, sid, -1, -1)
            del self._branches[sid]

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """float32 logits [B, T, vocab], each row evaluated from an empty cache."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise InputTextError(f"input_ids must be [batch, seq], got shape {ids.shape}")
        _ = self._llm  # raises unless loaded
        out = np.empty((ids.shape[0], ids.shape[1], self._vocab), np.float32)
        for r, row in enumerate(ids.tolist() if ids.shape[1] else []):
            self._check_ids(row)
            self._reset_kv(0)
            out[r] = self._decode(row, 0, outputs=True)
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
        import llama_cpp

        from pocketpeft.adapter import Adapter, check_adapter_shapes
        from pocketpeft.formats.gguf_lora import adapter_to_gguf

        llm, m = self._llm, self.bundle.manifest
        arrays = {peft_key(k): np.array(v, dtype=np.float32) for k, v in tensors.items()}
        ad = Adapter(m.lora, arrays)
        check_adapter_shapes(ad, m.trainable, "for this bundle")
        bad = [k for k, v in arrays.items() if not np.isfinite(v).all()]
        if bad:
            raise AdapterShapeError(f"adapter tensor {bad[0]} holds NaN or inf values")
        new = None
        if any(np.any(v) for k, v in arrays.items() if ".lora_B." in k):
            self._swaps += 1
            path = os.path.join(self._tmp.name, f"adapter-{self._swaps}.gguf")
            adapter_to_gguf(ad, path, m)
            with _llama_log() as log:
                try:
                    new = llama_cpp.llama_adapter_lora_init(llm.model, path.encode("utf-8"))
                finally:
                    os.remove(path)
            if not new:
                raise AdapterShapeError(f"llama.cpp rejected the converted adapter: {_errors(log)}")
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(new)
            scales = (ctypes.c_float * 1)(1.0)
            rc = llama_cpp.llama_set_adapters_lora(llm.ctx, adapters, 1, scales)
        else:
            rc = llama_cpp.llama_set_adapters_lora(llm.ctx, None, 0, None)
        if rc != 0:
            if new:
                llama_cpp.llama_adapter_lora_free(new)
            raise RuntimeError(f"llama_set_adapters_lora failed with code {rc}")
        if self._lora:
            llama_cpp.llama_adapter_lora_free(self._lora)  # detached above, so safe to free
        self._lora, self._adapter = new, arrays
        self._drop_branches(lambda toks: True)  # their K/V came from the previous weights

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
            if self._lora:
                llama_cpp.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
                llama_cpp.llama_adapter_lora_free(self._lora)
            with _llama_log():
                self.llm.close()
        if self._batch_free is not None:
            self._batch_free()
        if self._tmp is not None:
            self._tmp.cleanup()
        self.llm, self._lora, self._batch, self._batch_free, self._tmp, self._kv = None, None, None, None, None, []
        self._branches = OrderedDict()


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


def create(device: str = "cpu") -> LlamaCppBackend:
    """A new, unloaded llama.cpp backend (``cpu`` only)."""
    return LlamaCppBackend(device)
