"""Target ``executorch``: ``train.pte`` (forward + backward) and ``infer.pte`` (logits).

Both programs carry the frozen quantized base as constants, dequantized in-graph with core
ATen ops, so a 4-bit base trains LoRA on ExecuTorch (upstream has no such path).

``train.pte``, method ``forward(input_ids, labels)``: int64 ``[batch_size, seq_len]`` each,
labels already aligned, ``-100`` ignored. Outputs, as ExecuTorch's training runtime lays them
out: the scalar loss (mean cross-entropy over the non-ignored tokens), then one gradient per
LoRA tensor, then the LoRA tensors themselves (the program's only parameters, memory-planned,
so ``TrainingModule.named_parameters()`` aliases them and an optimizer updates them in place).

``infer.pte``, method ``forward(input_ids, *lora)``: ``input_ids`` int64 ``[B, T]`` with dynamic
``1 <= B <= batch_size`` and ``1 <= T <= seq_len``, then every LoRA tensor as an input (PEFT key
order listed in ``signature.json``); output float32 logits ``[B, T, vocab]``. LoRA as inputs
lets a runtime swap adapters per call without rewriting the program.

A split bundle (``ctx.split_layer`` = k, see :class:`pocketpeft.manifest.Split`) adds two programs
and trains the suffix only:

- ``prefix.pte``, ``forward(input_ids)`` -> ``hidden``: the embedding and layers < k (no LoRA),
  inference only, float32 ``[B, T, hidden_size]`` with the same dynamic ``B``/``T`` as
  ``infer.pte`` (a caller chunks bigger batches). Lowered to XNNPACK (every linear, matmul and
  elementwise op XNNPACK takes; the in-graph dequantization of the packed weights - bitwise
  and, floor division, casts - stays on the portable kernels, the weights stay quantized in the
  file). If the lowering fails, the portable kernels run it all; ``signature.json`` records
  which (``split.prefix.kernels``) and why. Measured on SmolLM2 q4_0, 8x64 rows, 2 cores: a
  4-layer prefix runs 2.1x faster on XNNPACK than on the portable kernels (25.3 vs 12.1 rows/s);
  the 22-layer prefix of a top-8 split runs 6.1 rows/s, still below torch eager (10.8) and ONNX
  Runtime (14.8), because the per-call weight unpacking stays portable. Lowering costs export
  time: ~10 minutes for those 22 layers.
- ``train.pte`` then holds the suffix (layers >= k, final norm, head, loss):
  ``forward(hidden, labels)``, float32 ``[batch_size, seq_len, hidden_size]`` and int64
  ``[batch_size, seq_len]``, the same outputs as above; backward never reaches the prefix.
- ``suffix.pte``, ``forward(hidden, *lora)`` -> logits: the suffix for evaluation from cached
  prefix outputs (dynamic ``B``/``T``, LoRA as inputs like ``infer.pte``).
- ``infer.pte`` stays the whole model (serving without the split).

``signature.json`` names every input and output and maps the train program's parameter names
to PEFT keys, so a device app needs nothing else; its ``delegates`` entry lists, per program,
the backend its delegated parts run on. ``train.pte``, ``infer.pte`` and ``suffix.pte`` run on
ExecuTorch's portable CPU kernels (lowering the joint graph to XNNPACK fails, see DESIGN.md;
:func:`matmul_partitioner` is the per-op alternative, not enabled).
"""

from __future__ import annotations

import copy
import json
import math

import torch
import torch.nn.functional as F
from torch import nn

from pocketpeft.formats import executorch as fmt
from pocketpeft.formats.executorch import INFER, SIGNATURE, TRAIN, TRAIN_PREFIX  # noqa: F401 (re-exported)
from pocketpeft.reference.lora import PEFT_PREFIX, global_key

from .protocol import ExportContext


def export_forward_backward(ep):
    """Joint forward+backward graph of a loss-first ExportedProgram.

    EXPERIMENTAL: ``torch.export.experimental._export_forward_backward`` is a private, unstable
    torch API (what ExecuTorch's training examples use). Pinned to torch 2.13 / executorch 1.5.1;
    this is the only place pocketpeft touches it.
    """
    from torch.export.experimental import _export_forward_backward

    return _export_forward_backward(ep, joint_loss_index=0)


def sdpa_math(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Scaled dot-product attention in plain ops. Exported as is, SDPA's backward becomes
    ``_scaled_dot_product_flash_attention_for_cpu_backward``, which ExecuTorch has no kernel for."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if is_causal:
        attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        scores = (
            scores.masked_fill(attn_mask.logical_not(), float("-inf"))
            if attn_mask.dtype == torch.bool
            else scores + attn_mask
        )
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return torch.matmul(probs, v)


def _decompositions() -> dict:
    table = torch.export.default_decompositions()
    table[torch.ops.aten.scaled_dot_product_attention.default] = sdpa_math
    return table


def _is_transpose(n) -> bool:
    return (
        isinstance(n, torch.fx.Node)
        and n.op == "call_function"
        and n.target == torch.ops.aten.permute.default
        and list(n.args[1]) == [1, 0]
    )


def _rewrite_for_executorch(ep) -> None:
    """Graph rewrites on the core-ATen program, before lowering:

    - ``aten.empty_permuted`` (from SiLU's backward) is not core ATen: make it a plain ``empty``
      (its contents are overwritten, only the strides differ);
    - ``permute(permute(x))`` -> ``x`` and ``mm(a, permute(w))`` -> ``linear(a, w)``. ExecuTorch
      materializes every permute, so without this each step copies every dequantized weight (and
      the vocab-sized embedding) up to three times; ``linear`` reads ``w`` as stored.
    """
    g = ep.graph_module.graph
    for n in list(g.nodes):
        if n.op != "call_function":
            continue
        if n.target == torch.ops.aten.empty_permuted.default:
            n.target, n.args = torch.ops.aten.empty.memory_format, (n.args[0],)
        elif _is_transpose(n) and _is_transpose(n.args[0]):
            n.replace_all_uses_with(n.args[0].args[0])
    for n in list(g.nodes):
        if n.op == "call_function" and n.target == torch.ops.aten.mm.default and _is_transpose(n.args[1]):
            with g.inserting_before(n):
                lin = g.call_function(torch.ops.aten.linear.default, (n.args[0], n.args[1].args[0]))
            lin.meta.update(n.meta)
            n.replace_all_uses_with(lin)
            g.erase_node(n)
    g.eliminate_dead_code()
    ep.graph_module.recompile()


def trainable_copy(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` whose LoRA tensors are its only parameters (every frozen parameter
    becomes a buffer, baked as a constant) and the HF names of those LoRA tensors, in order."""
    m = copy.deepcopy(model)
    names = []
    for full, p in list(m.named_parameters()):
        if ".lora_A." in full or ".lora_B." in full:
            p.requires_grad_(True)
            names.append(full)
            continue
        owner, _, attr = full.rpartition(".")
        mod = m.get_submodule(owner)
        delattr(mod, attr)
        mod.register_buffer(attr, p.detach(), persistent=True)
    return m, names


def peft_key(hf_name: str) -> str:
    """PEFT's saved key for a LoRA tensor's HF parameter name, or the global slot's key
    (``...lora_A.global.weight``) for a global buffer (``...q_proj.global_A``)."""
    for slot, part in ((".global_A", "lora_A"), (".global_B", "lora_B")):
        if hf_name.endswith(slot):
            return global_key(f"{PEFT_PREFIX}{hf_name[: -len(slot)]}.{part}.weight")
    return PEFT_PREFIX + hf_name


def global_slot_names(module: nn.Module) -> list[str]:
    """Names of ``module``'s filled global-adapter buffers (two-level adapters), in model order:
    the programs take them as inputs, so a device fills the slot with its installed global adapter."""
    return [n for n, _ in module.named_buffers() if n.endswith((".global_A", ".global_B"))]


class _TrainNet(nn.Module):
    def __init__(self, model: nn.Module, global_names: list[str] | None = None) -> None:
        super().__init__()
        self.model, self.global_names = model, list(global_names or [])

    def forward(self, x: torch.Tensor, labels: torch.Tensor, *glob: torch.Tensor):
        # x: input_ids, or the suffix's hidden states; glob: the frozen global slot, as inputs
        logits = torch.func.functional_call(self.model, dict(zip(self.global_names, glob)), (x,))
        return (F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100),)


class _InferNet(nn.Module):
    def __init__(self, model: nn.Module, lora_names: list[str]) -> None:
        super().__init__()
        self.model, self.lora_names = model, lora_names

    def forward(self, input_ids: torch.Tensor, *lora: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.model, dict(zip(self.lora_names, lora)), (input_ids,))


def _to_pte(ep, delegate: bool) -> bytes:
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge, to_edge_transform_and_lower

    config = EdgeCompileConfig(preserve_ops=[torch.ops.aten.linear.default])
    if delegate:
        edge = to_edge_transform_and_lower(ep, partitioner=[matmul_partitioner()], compile_config=config)
    else:
        edge = to_edge(ep, compile_config=config)
    return edge.to_executorch(ExecutorchBackendConfig()).buffer


def matmul_partitioner():
    """XNNPACK for the matrix multiplications only. Partitioning the whole joint graph fails
    (pass-through outputs such as the saved softmax); each linear/mm/bmm is a clean single-op
    island and carries nearly all of a step's FLOPs. Weights are dequantized in-graph, hence
    "non-static" for XNNPACK."""
    from executorch.backends.xnnpack.partition.config import BMMConfig, LinearConfig, MMConfig
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    return XnnpackPartitioner(
        configs=[LinearConfig, MMConfig, BMMConfig], per_op_mode=True, force_non_static_weights_for_f32_linear=True
    )


def _dims(ctx: ExportContext) -> dict:
    """Dynamic batch 1..batch_size and sequence 1..seq_len of an input's first two dims."""
    from torch.export import Dim

    return {0: Dim("batch", min=1, max=ctx.batch_size), 1: Dim("seq", min=1, max=ctx.seq_len)}


def _suffix(ctx: ExportContext, model: nn.Module) -> nn.Module:
    from pocketpeft.reference.model import SplitPart

    return SplitPart(model, ctx.split_layer, ctx.arch.num_hidden_layers)


def _hidden_example(ctx: ExportContext) -> torch.Tensor:
    return torch.zeros(ctx.batch_size, ctx.seq_len, ctx.arch.hidden_size, dtype=torch.float32)


def export_train(ctx: ExportContext, delegate: bool = False) -> tuple[bytes, list[str], list[str]]:
    """The serialized train program, its LoRA parameters' HF names (in output order) and the HF
    names of its global-slot inputs (after ``x, labels``; none without a slot): the whole model from
    ``input_ids``, or for a split context the suffix from ``hidden``."""
    model, names = trainable_copy(ctx.model)
    ids = torch.zeros(ctx.batch_size, ctx.seq_len, dtype=torch.int64)
    # the suffix's parameters keep their HF names (SplitPart shares them), so TRAIN_PREFIX holds
    part, x = (model, ids) if ctx.split_layer is None else (_suffix(ctx, model), _hidden_example(ctx))
    gnames = global_slot_names(part)
    glob = tuple(part.get_buffer(n).detach().clone() for n in gnames)
    net, example = _TrainNet(part, gnames).train(), (x, ids.clone(), *glob)
    ep = torch.export.export(net, example, strict=False)
    ep = ep.run_decompositions(_decompositions())
    ep = export_forward_backward(ep)
    _rewrite_for_executorch(ep)
    grads = ep.graph_signature.backward_signature.gradients_to_parameters
    assert sorted(grads.values()) == sorted(TRAIN_PREFIX + n for n in names), "only LoRA tensors may train"
    return _to_pte(ep, delegate), names, gnames


def export_infer(ctx: ExportContext, delegate: bool = False, part: str = "model") -> tuple[bytes, list[str]]:
    """The serialized inference program and the HF names of its LoRA inputs, then its global-slot
    inputs (in input order): ``part="model"`` the whole model from ``input_ids``, ``"suffix"`` a
    split context's suffix from ``hidden``."""
    model, names = trainable_copy(ctx.model)
    model.eval().requires_grad_(False)
    lora = tuple(p.detach().clone() for p in model.parameters())
    if part == "suffix":
        module, x = _suffix(ctx, model), _hidden_example(ctx)
    else:
        module, x = model, torch.zeros(ctx.batch_size, ctx.seq_len, dtype=torch.int64)
    gnames = global_slot_names(module)
    lora += tuple(module.get_buffer(n).detach().clone() for n in gnames)
    names = names + gnames
    net = _InferNet(module, names)
    with torch.no_grad():
        ep = torch.export.export(net, (x, *lora), dynamic_shapes=(_dims(ctx), (None,) * len(lora)), strict=False)
        ep = ep.run_decompositions(_decompositions())
    _rewrite_for_executorch(ep)
    return _to_pte(ep, delegate), names


def _prefix_configs() -> list:
    """XNNPACK's partitioner configs for the prefix: all of them, except that GELU is taken only
    in its exact (erf) form. executorch 1.5.1's XNNPACK GELU ignores ``approximate="tanh"`` and
    computes the erf form (Gemma's GeGLU would be off by ~1e-3); a tanh-GELU stays on the
    portable kernels, which compute it as torch does."""
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.generic_node_configs import GeluConfig

    class ExactGeluConfig(GeluConfig):
        def check_constraints(self, node: torch.fx.Node, ep) -> bool:
            approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
            return approximate == "none" and super().check_constraints(node, ep)

    return [ExactGeluConfig if c is GeluConfig else c for c in ALL_PARTITIONER_CONFIGS]


def export_prefix(ctx: ExportContext, xnnpack: bool = True) -> tuple[bytes, str, str | None]:
    """A split context's prefix (embedding + layers below ``ctx.split_layer``, no LoRA) as an
    inference program ``forward(input_ids) -> hidden``, and the kernels it runs on:
    ``(program, "xnnpack" | "portable", why XNNPACK wasn't used or None)``.

    Lowered with :class:`XnnpackPartitioner` (f32 linears with in-graph dequantized weights taken
    as non-static inputs), so every op XNNPACK supports runs there; the weight unpacking ops (and
    a tanh-GELU, see :func:`_prefix_configs`) stay portable. A lowering failure falls back to the portable kernels."""
    from pocketpeft.reference.model import SplitPart

    model, _ = trainable_copy(ctx.model)
    net = SplitPart(model, 0, ctx.split_layer).eval().requires_grad_(False)
    ids = torch.zeros(ctx.batch_size, ctx.seq_len, dtype=torch.int64)
    with torch.no_grad():
        ep = torch.export.export(net, (ids,), dynamic_shapes=(_dims(ctx),), strict=False)
        ep = ep.run_decompositions(_decompositions())
    _rewrite_for_executorch(ep)
    reason = "disabled" if not xnnpack else None
    if xnnpack:
        try:
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
            from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

            part = XnnpackPartitioner(configs=_prefix_configs(), force_non_static_weights_for_f32_linear=True)
            edge = to_edge_transform_and_lower(copy.deepcopy(ep), partitioner=[part])
            return edge.to_executorch(ExecutorchBackendConfig()).buffer, fmt.KERNELS_XNNPACK, None
        except Exception as e:  # noqa: BLE001 - any lowering failure: the portable kernels still run it
            reason = f"{type(e).__name__}: {e}"[:500]
    return _to_pte(ep, delegate=False), fmt.KERNELS_PORTABLE, reason


class ExecuTorchTarget:
    name = "executorch"

    def export(self, ctx: ExportContext) -> dict[str, str]:
        """Write train.pte, infer.pte and signature.json (a split context: also prefix.pte and
        suffix.pte) under ``ctx.stage / "executorch"``; return the toolchain versions."""
        from importlib.metadata import version

        from pocketpeft._deps import require

        require("executorch.exir", "executorch")
        out = ctx.stage / fmt.DIR
        out.mkdir(parents=True, exist_ok=True)
        split = ctx.split_layer is not None
        bar = None
        if ctx.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=4 if split else 2, desc="executorch", unit="program", leave=False)

        def done() -> None:
            if bar is not None:
                bar.update()

        train, names, train_globals = export_train(ctx)
        (ctx.stage / TRAIN).write_bytes(train)
        del train
        done()
        infer, infer_names = export_infer(ctx)
        (ctx.stage / INFER).write_bytes(infer)
        del infer
        done()
        keys = [peft_key(n) for n in names]
        x = "hidden" if split else "input_ids"
        sig = {
            fmt.SIG_TRAIN: {
                fmt.SIG_METHOD: "forward",
                fmt.SIG_BATCH_SIZE: ctx.batch_size,
                fmt.SIG_SEQ_LEN: ctx.seq_len,
                fmt.SIG_INPUTS: [x, "labels"] + [peft_key(n) for n in train_globals],
                fmt.SIG_OUTPUTS: (["loss"] + [f"grad:{k}" for k in keys] + [f"param:{k}" for k in keys]),
                fmt.SIG_PARAMETERS: {TRAIN_PREFIX + n: peft_key(n) for n in names},
            },
            fmt.SIG_INFER: {
                fmt.SIG_METHOD: "forward",
                fmt.SIG_MAX_BATCH: ctx.batch_size,
                fmt.SIG_MAX_SEQ_LEN: ctx.seq_len,
                fmt.SIG_INPUTS: ["input_ids"] + [peft_key(n) for n in infer_names],
                fmt.SIG_OUTPUTS: ["logits"],
            },
            fmt.SIG_DELEGATES: {"train": [], "infer": []},
        }
        if split:
            sig[fmt.SIG_SPLIT] = self._export_split(ctx, done)
            sig[fmt.SIG_DELEGATES].update(
                prefix=["xnnpack"]
                if sig[fmt.SIG_SPLIT][fmt.SIG_PREFIX][fmt.SIG_KERNELS] == fmt.KERNELS_XNNPACK
                else [],
                suffix=[],
            )
        if bar is not None:
            bar.close()
        (ctx.stage / SIGNATURE).write_text(json.dumps(sig, indent=2) + "\n")
        return {"executorch": version("executorch")}

    @staticmethod
    def _export_split(ctx: ExportContext, done) -> dict:
        """Write prefix.pte and suffix.pte; return signature.json's ``split`` entry."""
        prefix, kernels, reason = export_prefix(ctx)
        (ctx.stage / fmt.PREFIX).write_bytes(prefix)
        del prefix
        done()
        suffix, suffix_names = export_infer(ctx, part="suffix")
        (ctx.stage / fmt.SUFFIX).write_bytes(suffix)
        del suffix
        done()
        dynamic = {fmt.SIG_METHOD: "forward", fmt.SIG_MAX_BATCH: ctx.batch_size, fmt.SIG_MAX_SEQ_LEN: ctx.seq_len}
        return {
            fmt.SIG_LAYER: ctx.split_layer,
            fmt.SIG_HIDDEN_SIZE: ctx.arch.hidden_size,
            fmt.SIG_PREFIX: {
                fmt.SIG_FILE: fmt.PREFIX,
                **dynamic,
                fmt.SIG_INPUTS: ["input_ids"],
                fmt.SIG_OUTPUTS: ["hidden"],
                fmt.SIG_KERNELS: kernels,
                "xnnpack_failure": reason,
            },
            fmt.SIG_SUFFIX: {
                fmt.SIG_FILE: fmt.SUFFIX,
                **dynamic,
                fmt.SIG_INPUTS: ["hidden"] + [peft_key(n) for n in suffix_names],
                fmt.SIG_OUTPUTS: ["logits"],
            },
            "note": "train.pte holds the suffix (layers >= layer) and takes hidden; infer.pte is the whole model",
        }


TARGET = ExecuTorchTarget()
