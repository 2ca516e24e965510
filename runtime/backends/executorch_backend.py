"""Backend ``executorch``: the bundle's ``train.pte`` / ``infer.pte`` on ExecuTorch's CPU runtime.

ExecuTorch computes the loss and the LoRA gradients (the frozen 4/8-bit base is dequantized
inside the program); the optimizer runs here on the host, over the LoRA tensors the training
module exposes in place: AdamW with the same arithmetic as ``torch.optim.AdamW``, global-norm
clipping as ``torch.nn.utils.clip_grad_norm_`` (both in :mod:`.host_adamw`, float32 numpy, shared
with the onnxruntime backend), the same skip rule as the torch backend.

Shapes are fixed at export: a train call takes ``batch_size`` rows of ``seq_len`` tokens. Fewer
rows are padded with rows whose labels are all ignored; more rows (or ``grad_accum > 1``) run as
several calls whose gradients are summed with token-count weights, which is exactly the
full-batch mean. Shorter rows are padded at the end (causal attention: earlier positions don't
see them). ``infer.pte`` serves logits for up to ``batch_size`` x ``seq_len`` tokens per call.

A split bundle (``signature.json`` has ``split``; see the executorch target) runs in two parts
(``SupportsSplit``): ``prefix.pte`` (XNNPACK, or the portable kernels where lowering failed at
export) turns token ids into the hidden states entering the split layer, ``train.pte`` trains the
suffix from them and ``suffix.pte`` gives the suffix's logits; ``train_step`` / ``eval_batch`` /
``logits`` on token ids run the prefix first. ``infer.pte`` (the whole model) is then unused here.
Torch is imported because ExecuTorch's Python bindings exchange ``torch.Tensor``s.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from pocketpeft.adapter import peft_key
from pocketpeft.errors import (
    AdapterShapeError,
    BackendUnavailableError,
    ConfigError,
    CorruptFileError,
    SequenceTooLongError,
)
from pocketpeft.formats.executorch import (
    INFER,
    PREFIX,
    SIG_HIDDEN_SIZE,
    SIG_INFER,
    SIG_INPUTS,
    SIG_KERNELS,
    SIG_LAYER,
    SIG_MAX_BATCH,
    SIG_MAX_SEQ_LEN,
    SIG_PARAMETERS,
    SIG_PREFIX,
    SIG_SPLIT,
    SIG_SUFFIX,
    SIG_TRAIN,
    SIGNATURE,
    SUFFIX,
    TRAIN,
)
from pocketpeft.manifest import Bundle

from ..protocol import Capabilities, EvalSums, Probe, StepResult, TrainConfig
from .host_adamw import HostAdamW, clip_coef

_EXTRA = "pip install 'pocketpeft[executorch]'"


@functools.lru_cache(maxsize=1)
def _runtime():
    """executorch's pybindings: (load for training, load module, check program)."""
    import warnings

    with warnings.catch_warnings():  # "experimental API" warnings on import
        warnings.simplefilter("ignore")
        from executorch.extension.pybindings.portable_lib import Verification, _load_for_executorch, _load_program
        from executorch.extension.training import _load_for_executorch_for_training

    def check(path: str) -> None:  # header, size and flatbuffer; methods and weights load lazily
        _load_program(path, program_verification=Verification.InternalConsistency)

    return _load_for_executorch_for_training, _load_for_executorch, check


def probe() -> Probe:
    """Available iff executorch's training pybindings import; CPU only."""
    try:
        _runtime()
    except ImportError as e:
        return Probe(
            "executorch", False, (), f"executorch training runtime not importable ({e}); install it with: {_EXTRA}"
        )
    caps = Capabilities(
        train=True,
        infer=True,
        tier="cpu",
        kv_cache=False,
        notes="ExecuTorch 1.5 CPU kernels, matmuls on XNNPACK; host AdamW",
    )
    return Probe("executorch", True, ("cpu",), "", {"cpu": caps})


class ExecuTorchBackend:
    """ExecuTorch backend; see the module docstring."""

    name = "executorch"
    #: ``train.pte`` computes the mean cross-entropy: no per-token loss weights (SupportsWeightedLoss)
    weighted_loss = False

    def __init__(self, device: str = "cpu") -> None:
        if device != "cpu":
            raise ConfigError(f"executorch backend runs on 'cpu' only, not {device!r}")
        self.device = device
        self.cfg = TrainConfig()
        self.step = 0
        self._bundle: Bundle | None = None
        self._train = self._infer = None
        self._keys: list[str] = []  # PEFT keys, in train-output order
        self._adapter: dict[str, torch.Tensor] = {}  # PEFT key -> tensor (aliases ExecuTorch's once training ran)
        self._global: dict[str, torch.Tensor] = {}  # the frozen global slot's inputs (two-level adapters)
        self._opt = HostAdamW(self.cfg)  # the host optimizer (numpy, shared with the onnxruntime backend)
        self._split: dict | None = None  # signature.json's split entry when the bundle is split
        self._prefix = self._suffix = None  # a split bundle's programs, loaded on first use
        self.prefix_kernels = ""  # "xnnpack" or "portable": what the prefix program runs on

    def capabilities(self) -> Capabilities:
        return probe().capabilities[self.device]

    # ------------------------------------------------------------------ loading
    def load(self, bundle: Bundle) -> None:
        """Verify the bundle's executorch files and start from its initial adapter (the programs
        are loaded on first use). Raises ModelFileNotFoundError without an executorch target,
        CorruptFileError for a damaged file."""
        bundle.require_target("executorch", reader=self.name)
        try:
            self._sig = json.loads(bundle.path_of(SIGNATURE).read_text(encoding="utf-8"))
            self._keys = list(self._sig[SIG_TRAIN][SIG_PARAMETERS].values())
            split = self._sig.get(SIG_SPLIT)
            if split is not None:  # the entries the split runs read
                layer, hidden = int(split[SIG_LAYER]), int(split[SIG_HIDDEN_SIZE])
                kernels = str(split[SIG_PREFIX][SIG_KERNELS])
                for part in (SIG_PREFIX, SIG_SUFFIX):
                    int(split[part][SIG_MAX_BATCH]), int(split[part][SIG_MAX_SEQ_LEN]), list(split[part][SIG_INPUTS])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptFileError(f"{bundle.root / SIGNATURE} is malformed: {e}") from e
        ms = bundle.manifest.split
        if split is not None and (ms is None or (ms.layer, ms.hidden_size) != (layer, hidden)):
            raise CorruptFileError(
                f"{bundle.root / SIGNATURE}: its split (layer {layer}, hidden size {hidden}) doesn't match "
                f"the manifest's field 'split' ({ms})"
            )
        for rel in (TRAIN, INFER) if split is None else (TRAIN, PREFIX, SUFFIX):
            self._load_pte(bundle, rel, _runtime()[2])
        self._bundle, self._train, self._infer = bundle, None, None
        self._split, self._prefix, self._suffix = split, None, None
        self.prefix_kernels = "" if split is None else kernels
        init = bundle.initial_adapter().tensors
        self._adapter = {k: torch.from_numpy(np.array(init[k], dtype=np.float32)) for k in self._keys}
        # a bundle exported with a global slot: the programs take it as inputs, zeros until set
        slot = [k for k in self._sig[SIG_TRAIN][SIG_INPUTS][2:]]
        plain = {k.replace(".global.", "."): k for k in slot}
        if set(plain) - set(self._keys):
            raise CorruptFileError(f"{bundle.root / SIGNATURE}: its global slot names tensors the LoRA doesn't have")
        self._global = {g: torch.zeros_like(self._adapter[k]) for k, g in plain.items()}
        self.configure(self.cfg)

    @staticmethod
    def _load_pte(bundle: Bundle, rel: str, loader):
        path = bundle.path_of(rel)
        try:
            return loader(str(path))
        except RuntimeError as e:  # flatbuffer verification / program load failures
            raise CorruptFileError(f"{path} is not a loadable ExecuTorch program: {e}") from e

    @property
    def _b(self) -> Bundle:
        if self._bundle is None:
            raise RuntimeError("backend not loaded: call load(bundle) first")
        return self._bundle

    def configure(self, cfg: TrainConfig) -> None:
        if not isinstance(cfg.grad_accum, int) or cfg.grad_accum < 1:
            raise ConfigError(f"TrainConfig.grad_accum must be a positive integer, got {cfg.grad_accum!r}")
        self.cfg, self.step = cfg, 0
        self._opt = HostAdamW(cfg)

    # ------------------------------------------------------------------ running the programs
    def _pad(self, x: np.ndarray, labels: np.ndarray | None, rows: int, what: str):
        """``x`` (int64 ids [B, T] or float32 hidden states [B, T, H]) and int64 labels as tensors of
        the train program's [rows, seq_len]: padded with ignored rows / trailing positions (token 0
        or zero states, label -100; causal attention keeps them from earlier positions)."""
        seq = self._b.manifest.seq_len
        if x.ndim < 2 or x.shape[0] > rows or x.shape[1] > seq:
            raise SequenceTooLongError(
                f"{what}: got shape {x.shape}; the executorch programs of {self._b.root} "
                f"take at most {rows} rows of {seq} tokens (re-export with a larger --seq-len)"
            )
        t = torch.from_numpy(x)
        out_x = torch.zeros((rows, seq, *x.shape[2:]), dtype=t.dtype)
        out_x[: x.shape[0], : x.shape[1]] = t
        out_lab = torch.full((rows, seq), -100, dtype=torch.int64)
        if labels is not None:
            out_lab[: x.shape[0], : x.shape[1]] = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        return out_x, out_lab

    def _train_module(self):
        if self._train is None:
            self._train = self._load_pte(self._b, TRAIN, _runtime()[0])
        return self._train

    def _forward_backward(self, x: torch.Tensor, lab: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
        """Loss and LoRA gradients (in ``self._keys`` order) of one full-size call."""
        tm = self._train_module()
        fresh = tm.named_params is None
        glob = tuple(self._global[k] for k in self._sig[SIG_TRAIN][SIG_INPUTS][2:])
        loss = tm.forward_backward("forward", (x, lab, *glob))[0]
        if fresh:  # first call: from now on the program's own LoRA tensors are the adapter
            params = [tm.named_parameters()[f] for f in self._sig[SIG_TRAIN][SIG_PARAMETERS]]
            stale = any(not torch.equal(p, self._adapter[k]) for p, k in zip(params, self._keys))
            for p, k in zip(params, self._keys):
                p.copy_(self._adapter[k])
                self._adapter[k] = p
            if stale:  # the program ran with its baked adapter, not ours: run again
                loss = tm.forward_backward("forward", (x, lab, *glob))[0]
        grads = tm.named_gradients()
        return float(loss), [grads[f] for f in self._sig[SIG_TRAIN][SIG_PARAMETERS]]

    def _infer_module(self):
        if self._infer is None:
            self._infer = self._load_pte(self._b, INFER, _runtime()[1])
        return self._infer

    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 logits for one call of at most batch_size x seq_len tokens."""
        lora = [self._input(k) for k in self._sig[SIG_INFER][SIG_INPUTS][1:]]
        # ExecuTorch refuses strided inputs (e.g. a row slice of a batch): pass contiguous tensors
        return self._infer_module().forward((ids.contiguous(), *(t.contiguous() for t in lora)))[0]

    def _input(self, key: str) -> torch.Tensor:
        """A program's tensor input by name: a LoRA tensor, or the global slot's."""
        return self._adapter[key] if key in self._adapter else self._global[key]

    # ------------------------------------------------------------------ split bundles
    @property
    def split_layer(self) -> int | None:
        """The first trained layer of a split bundle (``None``: not split)."""
        return None if self._split is None else int(self._split[SIG_LAYER])

    def _split_sig(self) -> dict:
        if self._split is None:
            raise RuntimeError("the loaded bundle is not split (signature.json has no 'split')")
        return self._split

    def _chunks(self, x: np.ndarray, sig: dict, what: str):
        """Row blocks of ``x`` ([B, T, ...]) that one call of a dynamic-shape program takes."""
        if x.ndim < 2 or not 1 <= x.shape[1] <= sig[SIG_MAX_SEQ_LEN]:
            m = self._b.manifest
            raise SequenceTooLongError(
                f"{what} of shape {x.shape}: the executorch programs of {self._b.root} take 1..{sig[SIG_MAX_SEQ_LEN]} "
                f"tokens per row (re-export with --seq-len up to the model's context of {m.arch.max_position_embeddings})"
            )
        step = int(sig[SIG_MAX_BATCH])
        # ExecuTorch refuses strided inputs (e.g. a row slice of a batch): pass contiguous tensors
        return (torch.from_numpy(np.ascontiguousarray(x[s : s + step])) for s in range(0, len(x), step))

    def prefix(self, input_ids: np.ndarray) -> np.ndarray:
        """The frozen prefix's output, float32 [B, T, hidden] (see ``SupportsSplit``), through
        ``prefix.pte`` ``max_batch`` rows a call. Raises SequenceTooLongError for rows longer than
        the exported ``seq_len``."""
        sig = self._split_sig()[SIG_PREFIX]
        ids = np.asarray(input_ids, dtype=np.int64)
        if self._prefix is None:
            self._prefix = self._load_pte(self._b, PREFIX, _runtime()[1])
        parts = [self._prefix.forward((x,))[0] for x in self._chunks(ids, sig, "prefix input_ids")]
        return torch.cat(parts).numpy() if parts else np.zeros((0, *ids.shape[1:], self._hidden_size), np.float32)

    def release_prefix(self) -> None:
        """Free the prefix program (its weights); the next :meth:`prefix` loads it again."""
        self._prefix = None

    @property
    def _hidden_size(self) -> int:
        return int(self._split_sig()[SIG_HIDDEN_SIZE])

    def _hidden(self, hidden: np.ndarray, what: str) -> np.ndarray:
        """float32 prefix outputs [B, T, hidden_size] (a cache may hold float16)."""
        h = np.asarray(hidden, dtype=np.float32)
        if h.ndim != 3 or h.shape[2] != self._hidden_size:
            raise ConfigError(f"{what}: got shape {h.shape}, expected [batch, seq, {self._hidden_size}]")
        return h

    def train_step_hidden(self, hidden: np.ndarray, labels: np.ndarray, weights: None = None) -> StepResult:
        """:meth:`train_step` of the suffix from prefix outputs [B, T, hidden]."""
        _no_weights(weights)
        return self._train_step(self._hidden(hidden, "train_step_hidden hidden"), labels)

    def eval_hidden(self, hidden: np.ndarray, labels: np.ndarray) -> EvalSums:
        """:meth:`eval_batch` of the suffix from prefix outputs."""
        return self._eval(self._suffix_logits, self._hidden(hidden, "eval_hidden hidden"), labels)

    def _suffix_logits(self, hidden: np.ndarray) -> np.ndarray:
        """float32 logits [B, T, vocab] of the suffix (``suffix.pte``) from prefix outputs."""
        sig = self._split_sig()[SIG_SUFFIX]
        if self._suffix is None:
            self._suffix = self._load_pte(self._b, SUFFIX, _runtime()[1])
        lora = [self._input(k).contiguous() for k in sig[SIG_INPUTS][1:]]
        return torch.cat([self._suffix.forward((h, *lora))[0] for h in self._chunks(hidden, sig, "hidden")]).numpy()

    # ------------------------------------------------------------------ the Protocol
    def train_step(self, input_ids: np.ndarray, labels: np.ndarray, weights: None = None) -> StepResult:
        """One AdamW step over ``input_ids`` [B, T] and aligned ``labels``; a split bundle runs the
        prefix first (backward stops there). Per-token loss ``weights`` are not supported: passing
        any raises :class:`BackendUnavailableError`."""
        _no_weights(weights)
        ids = np.asarray(input_ids, dtype=np.int64)
        return self._train_step(ids if self._split is None else self.prefix(ids), labels)

    def _train_step(self, x_all: np.ndarray, labels: np.ndarray) -> StepResult:
        """The step over token ids, or a split bundle's prefix outputs."""
        cfg, bs = self.cfg, self._b.manifest.batch_size
        lab_all = np.asarray(labels)
        n_tok = int((lab_all != -100).sum())
        lr = cfg.lr_at(self.step)
        total, grads = 0.0, [torch.zeros_like(self._adapter[k]) for k in self._keys]
        # gradient accumulation is exact whatever the split, so fill every call to batch_size
        for s in range(0, len(x_all), bs):
            x, lab = self._pad(x_all[s : s + bs], lab_all[s : s + bs], bs, "train_step input")
            n = int((lab != -100).sum())
            if n == 0:
                continue  # the program's mean over zero tokens is NaN; these rows add nothing
            loss, g = self._forward_backward(x, lab)
            w = n / n_tok
            total += loss * w
            for acc, gi in zip(grads, g):
                acc.add_(gi * w)
        g_np = {k: g.numpy() for k, g in zip(self._keys, grads)}
        norm, coef = clip_coef(g_np.values(), cfg.grad_clip)  # torch.nn.utils.clip_grad_norm_
        grad_norm = float(norm)
        if not (math.isfinite(total) and math.isfinite(grad_norm)):
            return StepResult(total, True, grad_norm, lr, n_tok)  # skip: weights and moments untouched
        # in place on the LoRA tensors (ExecuTorch's own memory once training ran: numpy views alias it)
        self._opt.step({k: self._adapter[k].detach().numpy() for k in self._keys}, g_np, coef, lr)
        self.step += 1
        return StepResult(total, False, grad_norm, lr, n_tok)

    def eval_batch(self, input_ids: np.ndarray, labels: np.ndarray) -> EvalSums:
        """Summed loss, scored-token count, top-1 and top-3 hits over labels != -100."""
        return self._eval(self.logits, np.asarray(input_ids, dtype=np.int64), labels)

    def _eval(self, logits_of, x: np.ndarray, labels: np.ndarray) -> EvalSums:
        """EvalSums of ``logits_of(x)``, ``batch_size`` rows at a time (bounded logits memory)."""
        bs = self._b.manifest.batch_size
        loss, tok, top1, top3 = 0.0, 0, 0, 0
        for s in range(0, len(x), bs):
            lab = torch.from_numpy(np.asarray(labels[s : s + bs], dtype=np.int64))
            valid = lab != -100
            lg, tg = torch.from_numpy(logits_of(x[s : s + bs]))[valid], lab[valid]
            loss += float(F.cross_entropy(lg, tg, reduction="sum"))
            top = lg.topk(3, dim=-1).indices
            tok, top1 = tok + int(tg.numel()), top1 + int((top[:, 0] == tg).sum())
            top3 += int((top == tg[:, None]).any(-1).sum())
        return EvalSums(loss, tok, top1, top3)

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """float32 logits [B, T, vocab]: ``infer.pte``, or a split bundle's prefix then suffix."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if self._split is not None:
            return self._suffix_logits(self.prefix(ids))
        sig = self._sig[SIG_INFER]
        return torch.cat([self._logits(x) for x in self._chunks(ids, sig, "input_ids")]).numpy()

    def get_adapter(self) -> dict[str, np.ndarray]:
        return {k: self._adapter[k].detach().clone().numpy() for k in self._keys}

    def set_adapter(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Replace the LoRA tensors (PEFT keys, ``.default.`` infixes accepted); nothing changes
        unless every key and shape matches. Optimizer state is reset."""
        for k, t in self._checked(tensors, "adapter").items():
            self._adapter[k].copy_(t)  # in place: may be ExecuTorch's own memory
        self.configure(self.cfg)

    def set_global(self, tensors: "Mapping[str, np.ndarray] | None") -> None:
        """Feed the programs' frozen global slot (zeros for ``None``); a bundle exported without the
        slot raises :class:`BackendUnavailableError` (see SupportsGlobal)."""
        if not self._global:
            if tensors is None:
                return
            raise BackendUnavailableError(
                "this bundle's executorch programs have no global-adapter slot (exported without a global "
                "adapter); re-export with `pocketpeft export --global-adapter DIR`"
            )
        given = self._checked(tensors, "global adapter") if tensors is not None else None
        self._global = {
            g: (given[g.replace(".global.", ".")] if given else torch.zeros_like(t)) for g, t in self._global.items()
        }

    def _checked(self, tensors: Mapping[str, np.ndarray], what: str) -> dict[str, torch.Tensor]:
        """float32 tensors of PEFT-keyed ``tensors`` after checking every name, shape and value
        against the bundle's LoRA; raises :class:`AdapterShapeError` naming the first misfit."""
        given = {peft_key(k): v for k, v in tensors.items()}
        missing, unexpected = sorted(set(self._keys) - set(given)), sorted(set(given) - set(self._keys))
        if missing or unexpected:
            raise AdapterShapeError(
                f"{what} tensors don't match the bundle's LoRA layers: {len(missing)} missing "
                f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
            )
        new = {k: torch.as_tensor(np.array(given[k], dtype=np.float32)) for k in self._keys}
        for k, t in new.items():
            if tuple(t.shape) != tuple(self._adapter[k].shape):
                raise AdapterShapeError(
                    f"{what} tensor {k} has shape {tuple(t.shape)}, the bundle expects {tuple(self._adapter[k].shape)}"
                )
            if not torch.isfinite(t).all():
                raise AdapterShapeError(f"{what} tensor {k} holds NaN or inf values")
        return new


def _no_weights(weights) -> None:
    if weights is not None:
        raise BackendUnavailableError(
            "executorch: the train.pte program computes the mean cross-entropy and takes no per-token "
            "loss weights (preference training); use the torch or onnxruntime backend"
        )


def create(device: str = "cpu") -> ExecuTorchBackend:
    """A new, unloaded executorch backend on ``device``."""
    return ExecuTorchBackend(device)
