"""The torch backend's training step with no host synchronization, and on CUDA as one graph.

A SmolLM2-sized LoRA step at batch 8 x 64 is a few hundred GFLOP, well under a millisecond of a
datacenter GPU's matrix units, yet an eager step launches thousands of small kernels one by one
from Python (every frozen linear dequantizes its weight, then the LoRA matmuls, in the forward
and again in the backward), so the GPU mostly waits on the host. peft + bitsandbytes spend their
step the same way.

:class:`DeviceStep` is the reference recipe (:func:`~.torch_backend.lora_step`) rewritten so that
nothing in it waits on the host: the scored-token count, the loss, the gradient norm and the
"skip this step" decision stay tensors on the device, the learning rate is a device tensor set
before each step, and a non-finite loss or gradient skips AdamW through the fused optimizer's
``found_inf`` input (the mechanism torch's GradScaler uses): weights, moments and step counts
stay as they were. On the CPU it runs eagerly, which is how the tests hold it to ``lora_step``.

:class:`GraphStep` captures one DeviceStep per batch shape with ``torch.cuda.graph`` (forward,
loss, backward, clipping, the finite check and the optimizer update) and replays it: one launch
per step, and the host syncs once, to read the loss and the gradient norm. Warm-up runs before
the capture are forced to skip, so capturing never moves the adapter.
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import repeat
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from pocketpeft.errors import ConfigError
from pocketpeft.reference.model import HeadInput, head_loss

from ..protocol import TrainConfig

#: Untimed steps on a side stream before a capture (lazy state: optimizer moments, lookup tables,
#: cuBLAS workspaces). They are forced to skip, so they leave the adapter as it was.
WARMUP_STEPS = 2


def backward_loss(
    forward: Callable[[torch.Tensor], torch.Tensor],
    ids: torch.Tensor,
    labels: torch.Tensor,
    grad_accum: int,
    n_tok: int | torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss every torch-module backend trains on: summed next-token cross-entropy (float32,
    -100 ignored) divided by ``n_tok``, over ``grad_accum`` chunks, each backpropagated as it goes.
    With ``weights`` (float32, shaped like ``labels``; negative values allowed) the loss is instead
    ``sum(weights * CE)`` over the scored tokens, with no division (``n_tok`` is not used): the
    caller normalizes. Returns the loss as a detached 0-d tensor (no host sync)."""
    total = None
    w_chunks = repeat(None) if weights is None else weights.chunk(grad_accum)
    for ids_c, lab_c, w_c in zip(ids.chunk(grad_accum), labels.chunk(grad_accum), w_chunks):
        logits = forward(ids_c)
        if isinstance(logits, HeadInput):  # a large vocabulary: the loss runs the output projection in slices
            coeff = torch.ones(lab_c.shape, device=lab_c.device) / n_tok if w_c is None else w_c.float()
            loss = head_loss(logits, lab_c, coeff)
            loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
            continue
        flat = logits.reshape(-1, logits.shape[-1]).float()
        if w_c is None:
            loss = F.cross_entropy(flat, lab_c.reshape(-1), ignore_index=-100, reduction="sum") / n_tok
        else:
            ce = F.cross_entropy(flat, lab_c.reshape(-1), ignore_index=-100, reduction="none")  # 0 where ignored
            loss = (ce * w_c.reshape(-1).float()).sum()
        loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total


def masked_weights(weights, labels: torch.Tensor) -> torch.Tensor:
    """``weights`` as a float32 tensor on ``labels``' device, zero where ``labels`` is -100 (an
    ignored token then adds nothing, whatever its weight). Raises :class:`ConfigError` unless
    ``weights`` has ``labels``' shape."""
    w = torch.as_tensor(weights, dtype=torch.float32, device=labels.device)
    if tuple(w.shape) != tuple(labels.shape):
        raise ConfigError(f"weights have shape {tuple(w.shape)}; expected the labels' shape {tuple(labels.shape)}")
    return torch.where(labels != -100, w, torch.zeros((), dtype=torch.float32, device=labels.device))


class DeviceStep:
    """One AdamW step over ``params`` computed entirely on their device; see the module docstring.

    ``forward(ids) -> logits``. Call with int64 ``ids`` / ``labels`` tensors on the device (and
    optionally float32 per-token ``weights``, see :func:`backward_loss`); returns
    ``(loss, grad_norm)`` as 0-d device tensors (reading them is the only sync).
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        params: list[torch.nn.Parameter],
        cfg: TrainConfig,
        device: str | torch.device,
    ) -> None:
        self.forward, self.params, self.cfg = forward, params, cfg
        dev = torch.device(device)
        self.lr = torch.tensor(cfg.lr, dtype=torch.float32, device=dev)
        self.opt = torch.optim.AdamW(
            params,
            lr=self.lr,
            betas=cfg.betas,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            fused=True,
            capturable=dev.type == "cuda",
        )
        self.found_inf = torch.zeros((), dtype=torch.float32, device=dev)
        self.force_skip = torch.zeros((), dtype=torch.float32, device=dev)
        self.opt.found_inf = self.found_inf  # fused AdamW leaves everything untouched where this is 1

    def __call__(
        self, ids: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        self.opt.zero_grad(set_to_none=True)  # captured: the first backward writes fresh gradients
        n_tok = 1 if weights is not None else (labels != -100).sum().clamp(min=1)
        total = backward_loss(self.forward, ids, labels, cfg.grad_accum, n_tok, weights)
        norm = torch.nn.utils.clip_grad_norm_(
            self.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"), foreach=True
        )
        bad = ~(torch.isfinite(total) & torch.isfinite(norm))
        torch.maximum(bad.to(torch.float32), self.force_skip, out=self.found_inf)
        self.opt.step()
        return total, norm


class _Captured(NamedTuple):
    """A captured step: the graph, its static inputs (``weights``: ``None`` for an unweighted
    step) and its static outputs."""

    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor | None
    loss: torch.Tensor
    norm: torch.Tensor


class GraphStep:
    """A :class:`DeviceStep` captured as a CUDA graph per ``[batch, seq]`` shape (and per kind:
    with or without per-token weights) and replayed.

    Keeps the ``max_graphs`` most recently used graphs, each in its own memory pool (gradients and
    activations of one graph must not share memory with another's, since shapes replay in any
    order). ``run(ids, labels, lr, weights=None)`` takes host arrays or tensors and returns python
    floats.
    """

    def __init__(self, step: DeviceStep, device: str | torch.device, max_graphs: int = 2) -> None:
        self.step, self.device, self.max_graphs = step, torch.device(device), max_graphs
        self._graphs: OrderedDict[tuple[int, ...], _Captured] = OrderedDict()

    def run(self, ids, labels, lr: float, weights=None) -> tuple[float, float]:
        ids, labels = torch.as_tensor(ids), torch.as_tensor(labels)
        key = (*ids.shape, weights is not None)
        g = self._graphs.get(key)
        if g is None:
            g = self._capture(key)
        self._graphs.move_to_end(key)
        g.ids.copy_(ids)
        g.labels.copy_(labels)
        if g.weights is not None:
            g.weights.copy_(torch.as_tensor(weights))
        self.step.lr.fill_(lr)
        g.graph.replay()
        return float(g.loss), float(g.norm)

    def _capture(self, key: tuple) -> _Captured:
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        shape, weighted = key[:-1], key[-1]
        ids = torch.zeros(shape, dtype=torch.int64, device=self.device)
        labels = torch.zeros(shape, dtype=torch.int64, device=self.device)
        weights = torch.zeros(shape, dtype=torch.float32, device=self.device) if weighted else None
        self.step.force_skip.fill_(1.0)
        try:
            side, main = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    self.step(ids, labels, weights)
            main.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                loss, norm = self.step(ids, labels, weights)
        finally:
            self.step.force_skip.fill_(0.0)
        g = self._graphs[key] = _Captured(graph, ids, labels, weights, loss, norm)
        return g
