"""Backend ``torch``: the reference. Eager PyTorch over the quantized base (dequantized on the
fly inside each frozen layer), LoRA tensors the only parameters; CPU, or CUDA when present.

Every other backend is tested against this one. On CUDA the training step runs by default as one
captured CUDA graph (``step="graph"``, see :mod:`.step_graph`): the same recipe, without the host
launching each of its thousands of kernels.
"""

from __future__ import annotations

import contextlib
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from pocketpeft.errors import ConfigError
from pocketpeft.formats.torch import WEIGHTS
from pocketpeft.manifest import Bundle
from pocketpeft.reference.lora import (
    inject_lora,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    set_global_lora,
)
from pocketpeft.reference.model import FUSED_HEAD_VOCAB, CausalLM, SplitPart, build_quantized
from pocketpeft.reference.quant import QuantEmbedding, QuantLinear

from ..protocol import Capabilities, EvalSums, Probe, StepResult, TrainConfig
from .step_graph import DeviceStep, GraphStep, backward_loss, masked_weights

#: Training-step implementations, see :func:`create`.
STEP_MODES = ("eager", "device", "graph")


def probe() -> Probe:
    """Always available on CPU; CUDA devices are listed when torch sees them."""
    devices = ["cpu"]
    caps = {"cpu": Capabilities(train=True, infer=True, tier="cpu", kv_cache=True, notes="eager fp32")}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            dev = f"cuda:{i}"
            devices.insert(i, dev)
            caps[dev] = Capabilities(
                train=True, infer=True, tier="gpu", kv_cache=True, notes=torch.cuda.get_device_name(i)
            )
    return Probe("torch", True, tuple(devices), "", caps)


class TorchBackend:
    """Reference backend; see the module docstring."""

    name = "torch"
    #: ``train_step`` / ``train_step_hidden`` take per-token loss weights (see SupportsWeightedLoss)
    weighted_loss = True

    def __init__(
        self, device: str = "cpu", dtype: str = "float32", step: str | None = None, compile: bool = False
    ) -> None:
        if dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"torch backend compute dtype {dtype!r} is not supported; expected float32 or bfloat16")
        step = step or ("graph" if str(device).startswith("cuda") else "eager")
        if step not in STEP_MODES:
            raise ConfigError(f"torch backend step mode {step!r} is unknown; expected one of {', '.join(STEP_MODES)}")
        if step == "graph" and not str(device).startswith("cuda"):
            raise ConfigError(f"step='graph' captures a CUDA graph; device {device!r} is not a CUDA device")
        self.device = device
        self.dtype = dtype  # compute dtype; the frozen bytes stay quantized, LoRA tensors stay float32
        self.step_mode, self.compile = step, compile
        self.model: CausalLM | None = None
        self.cfg = TrainConfig()
        self.step = 0
        self._opt: torch.optim.Optimizer | None = None
        self._device_step: DeviceStep | None = None
        self._graph: GraphStep | None = None
        self._train_forward = None
        self._prefix: SplitPart | None = None  # a split bundle's frozen layers (no LoRA)
        self._suffix: SplitPart | None = None  # ... and its trained layers + head

    def capabilities(self) -> Capabilities:
        return probe().capabilities[self.device]

    def load(self, bundle: Bundle) -> None:
        from safetensors.torch import load_file

        m = bundle.manifest
        state = load_file(str(bundle.path_of(WEIGHTS)))
        model = build_quantized(m.arch, m.quant, state)
        inject_lora(model, m.lora, seed=None)
        load_lora_state_dict(model, bundle.initial_adapter().tensors)
        model = model.to(self.device)  # quantized buffers move as they are: dequantized on the device
        for mod in model.modules():
            if isinstance(mod, QuantLinear):
                mod.prepare()
        if self.dtype != "float32":  # embeddings / norms in the compute dtype; LoRA masters stay fp32
            for n, p in model.named_parameters():
                if ".lora_" not in n:
                    p.data = p.data.to(getattr(torch, self.dtype))
        self.model = model
        self._prefix = self._suffix = None
        if m.split is not None:  # the whole model is here: split it at run time, sharing the weights
            k, n = m.split.layer, m.arch.num_hidden_layers
            self._prefix, self._suffix = SplitPart(model, 0, k).eval(), SplitPart(model, k, n).eval()
        # a large vocabulary trains without ever holding [batch, seq, vocab] logits (eager only:
        # torch.compile fuses on its own)
        model.fused_head = not self.compile and m.arch.vocab_size >= FUSED_HEAD_VOCAB
        self._train_forward = torch.compile(model, dynamic=False) if self.compile else model
        self.configure(self.cfg)

    @property
    def split_layer(self) -> int | None:
        """The first trained layer of a split bundle (``None``: not split)."""
        return self._prefix.stop if self._prefix is not None else None

    def _split_parts(self) -> tuple[SplitPart, SplitPart]:
        if self._prefix is None or self._suffix is None:
            raise RuntimeError("the loaded bundle is not split (manifest has no 'split')")
        return self._prefix, self._suffix

    @torch.no_grad()
    def prefix(self, input_ids: np.ndarray) -> np.ndarray:
        """The frozen prefix's output, float32 [B, T, hidden] (see SupportsSplit)."""
        prefix, _ = self._split_parts()
        ids, _ = self._tensors(input_ids)
        with self._autocast():
            return prefix(ids).float().cpu().numpy()

    def _hidden(self, hidden: np.ndarray) -> torch.Tensor:
        dtype = getattr(torch, self.dtype)
        return torch.as_tensor(np.asarray(hidden)).to(device=self.device, dtype=dtype)

    def train_step_hidden(
        self, hidden: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None
    ) -> StepResult:
        """One step of the suffix from prefix outputs: the reference recipe (:func:`lora_step`);
        ``weights`` as in :meth:`train_step`."""
        _, suffix = self._split_parts()
        if self.step_mode != "eager":
            raise ConfigError(f"split training runs the eager step; this backend uses step={self.step_mode!r}")
        lab = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=self.device)
        w = None if weights is None else masked_weights(weights, lab)
        suffix.train()
        try:

            def forward(x):
                with self._autocast():
                    return suffix(x)

            r = lora_step(
                forward, self._opt, lora_parameters(self._m), self.cfg, self.step, self._hidden(hidden), lab, w
            )
        finally:
            suffix.eval()
        self.step += not r.skipped
        return r

    @torch.no_grad()
    def eval_hidden(self, hidden: np.ndarray, labels: np.ndarray) -> EvalSums:
        _, suffix = self._split_parts()
        lab = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=self.device)
        with self._autocast():
            return eval_sums(suffix(self._hidden(hidden)), lab)

    def _autocast(self):
        """bf16 compute: LoRA matmuls autocast from their fp32 masters (a no-op at float32)."""
        return torch.autocast(
            torch.device(self.device).type, dtype=getattr(torch, self.dtype), enabled=self.dtype != "float32"
        )

    def configure(self, cfg: TrainConfig) -> None:
        self.cfg, self.step = cfg, 0
        params = lora_parameters(self._m)
        self._graph = None  # a captured graph holds the old optimizer: capture anew
        if self.step_mode == "eager":
            self._opt = torch.optim.AdamW(
                params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
            )
            return
        self._device_step = DeviceStep(self._forward_train, params, cfg, self.device)
        self._opt = self._device_step.opt
        if self.step_mode == "graph":
            self._graph = GraphStep(self._device_step, self.device)

    def _forward_train(self, x: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self._train_forward(x)

    @property
    def _m(self) -> CausalLM:
        if self.model is None:
            raise RuntimeError("backend not loaded: call load(bundle) first")
        return self.model

    def _tensors(self, input_ids: np.ndarray, labels: np.ndarray | None = None):
        ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64), device=self.device)
        lab = None if labels is None else torch.as_tensor(np.asarray(labels, dtype=np.int64), device=self.device)
        return ids, lab

    def train_step(self, input_ids: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> StepResult:
        """One optimizer step (see :func:`lora_step`). ``weights``: optional float32 per-token loss
        weights shaped like ``labels`` (negative allowed; ignored where the label is -100); the
        step then minimizes ``sum(weights * CE)`` with no division by the token count.
        Raises :class:`ConfigError` for weights of another shape."""
        if self._prefix is not None and self.step_mode == "eager":  # backward stops at the split
            return self.train_step_hidden(self.prefix(input_ids), labels, weights)
        model = self._m
        model.train()
        try:
            if self.step_mode == "eager":
                ids, lab = self._tensors(input_ids, labels)
                w = None if weights is None else masked_weights(weights, lab)
                r = lora_step(self._forward_train, self._opt, lora_parameters(model), self.cfg, self.step, ids, lab, w)
            else:
                r = self._device_train_step(input_ids, labels, weights)
        finally:
            model.eval()
        self.step += not r.skipped
        return r

    def _device_train_step(self, input_ids: np.ndarray, labels: np.ndarray, weights=None) -> StepResult:
        labels = np.asarray(labels, dtype=np.int64)
        n_tok, lr = int((labels != -100).sum()), self.cfg.lr_at(self.step)
        if self._graph is not None:
            lab = torch.from_numpy(labels)
            w = None if weights is None else masked_weights(weights, lab)
            loss, norm = self._graph.run(torch.from_numpy(np.asarray(input_ids, dtype=np.int64)), lab, lr, w)
        else:
            ids, lab = self._tensors(input_ids, labels)
            w = None if weights is None else masked_weights(weights, lab)
            self._device_step.lr.fill_(lr)
            loss, norm = (float(t) for t in self._device_step(ids, lab, w))
        return StepResult(loss, not (np.isfinite(loss) and np.isfinite(norm)), norm, lr, n_tok)

    @torch.no_grad()
    def eval_batch(self, input_ids: np.ndarray, labels: np.ndarray) -> EvalSums:
        ids, lab = self._tensors(input_ids, labels)
        with self._autocast():
            return eval_sums(self._m(ids), lab)

    @torch.no_grad()
    def row_losses(self, input_ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Each row's summed cross-entropy over labels != -100, float64 [B] (one forward pass)."""
        ids, lab = self._tensors(input_ids, labels)
        with self._autocast():
            return _row_losses(self._m(ids), lab)

    @torch.no_grad()
    def row_losses_hidden(self, hidden: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """:meth:`row_losses` of the suffix from prefix outputs [B, T, hidden]."""
        _, suffix = self._split_parts()
        lab = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=self.device)
        with self._autocast():
            return _row_losses(suffix(self._hidden(hidden)), lab)

    @torch.no_grad()
    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        ids, _ = self._tensors(input_ids)
        with self._autocast():
            return self._m(ids).float().cpu().numpy()

    def get_adapter(self) -> dict[str, np.ndarray]:
        # a copy on every device: on the CPU the tensors would otherwise alias the live weights
        return {k: v.numpy().copy() for k, v in lora_state_dict(self._m).items()}

    def set_adapter(self, tensors: Mapping[str, np.ndarray]) -> None:
        load_lora_state_dict(self._m, {k: torch.as_tensor(np.asarray(v)) for k, v in tensors.items()})
        self.configure(self.cfg)

    def set_global(self, tensors: Mapping[str, np.ndarray] | None) -> None:
        """Fill (or empty) the frozen global slot of every LoRA layer (see SupportsGlobal)."""
        set_global_lora(
            self._m, None if tensors is None else {k: torch.as_tensor(np.asarray(v)) for k, v in tensors.items()}
        )
        self.configure(self.cfg)  # a captured CUDA graph read the old slot

    def decoder(self) -> "TorchDecoder":
        """A KV-cached decoder over the current weights (adapter changes apply to later tokens).

        Serving one token at a time keeps a dequantized fp32 copy of the frozen linears (about
        4 bytes per weight) so no step re-dequantizes them; the quantized bytes stay the source.
        """
        for m in self._m.modules():
            if isinstance(m, (QuantLinear, QuantEmbedding)) and m._dequant_cache is None:
                m.cache_dequantized(True, getattr(torch, self.dtype))
        return TorchDecoder(self._m, self.device, self._autocast)


class TorchDecoder:
    """KV-cached incremental decoding on the torch model (see protocol.Decoder)."""

    def __init__(self, model: CausalLM, device: str, autocast=contextlib.nullcontext) -> None:
        self.model, self.device, self._autocast = model, device, autocast
        self._ids: list[int] = []
        self._cache = None

    @property
    def n_tokens(self) -> int:
        return len(self._ids)

    @torch.no_grad()
    def extend(self, ids: list[int]) -> np.ndarray:
        if not ids:
            return np.zeros((0, self.model.config.vocab_size), np.float32)
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        with self._autocast():
            logits, self._cache = self.model.forward_cached(x, len(self._ids), self._cache)
        self._ids.extend(ids)
        return logits[0].float().cpu().numpy()

    def truncate(self, n: int) -> None:
        if n >= len(self._ids):
            return
        self._ids = self._ids[:n]
        self._cache = None if n == 0 else [(k[:, :, :n], v[:, :, :n]) for k, v in self._cache]


def lora_step(forward, opt, params, cfg: TrainConfig, step: int, ids, lab, weights=None) -> StepResult:
    """One AdamW step over ``params``, the recipe every torch-module backend shares: loss =
    summed CE / scored tokens over ``cfg.grad_accum`` chunks (with float32 per-token ``weights``
    shaped like ``lab``: ``sum(weights * CE)``, no division), global-norm clipping, and a
    non-finite loss or gradient skips the step (weights and optimizer state untouched).
    ``forward(ids) -> logits``; the caller sets train/eval mode and advances ``step`` unless skipped."""
    n_tok = int((lab != -100).sum())
    lr = cfg.lr_at(step)
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    total = float(backward_loss(forward, ids, lab, cfg.grad_accum, max(n_tok, 1), weights))
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
    if not (np.isfinite(total) and np.isfinite(grad_norm)):
        opt.zero_grad(set_to_none=True)  # skip: weights and optimizer state stay as they were
        return StepResult(total, True, grad_norm, lr, n_tok)
    opt.step()
    return StepResult(total, False, grad_norm, lr, n_tok)


@torch.no_grad()
def _row_losses(logits, labels) -> np.ndarray:
    ce = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return ce.sum(-1).double().cpu().numpy()


def eval_sums(logits, labels) -> EvalSums:
    """Summed CE, scored tokens and top-1/top-3 hits of ``logits`` [.., vocab] against aligned
    ``labels`` (-100 ignored), computed in float32."""
    valid = labels != -100
    lg, tg = logits.float()[valid], labels[valid]
    loss = F.cross_entropy(lg, tg, reduction="sum")
    top = lg.topk(3, dim=-1).indices
    return EvalSums(float(loss), int(tg.numel()), int((top[:, 0] == tg).sum()), int((top == tg[:, None]).any(-1).sum()))


def create(device: str = "cpu", dtype: str = "float32", step: str | None = None, compile: bool = False) -> TorchBackend:
    """A new, unloaded torch backend on ``device`` computing in ``dtype`` (``float32``, the
    reference default, or ``bfloat16``, the fast choice on a GPU).

    ``step``: ``"eager"`` (the reference recipe, :func:`lora_step`; the CPU default), ``"device"``
    (the same recipe with no host sync, :class:`~.step_graph.DeviceStep`) or ``"graph"`` (that step
    captured as a CUDA graph; the CUDA default). ``compile=True`` runs the training forward and
    backward through ``torch.compile`` (on a GPU it fuses each dequantization into one kernel)."""
    return TorchBackend(device, dtype, step, compile)
