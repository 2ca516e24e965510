"""Target ``onnx``: ONNX Runtime training artifacts and ``infer.onnx`` with LoRA weights as inputs.

Files under ``onnx/`` (``ir_version`` <= 10, opset 20: what onnxruntime-training 1.19.2 loads).
Batch and sequence length are dynamic (seq 1..context) except in the training model; ``io.json``
lists every name and shape:

- ``training_model.onnx``: forward + backward. Inputs ``input_ids`` and ``labels``, int64
  ``[batch_size, seq_len]`` as exported (static: ORT then plans activation memory ahead; pad
  short batches with label -100), and ``weights``, float32 per-token loss weights of the same
  shape; output ``loss_sum`` = sum(weights * CE) over scored labels: with weights 1, the *sum*
  of token cross-entropies (divide by their count for the mean; sums make micro-batches
  accumulate exactly); other weights train per-token objectives such as the preference loss
  (:mod:`pocketpeft.runtime.preference`). Gradients accumulate in ORT's in-graph buffers.
  Bundles exported before ``weights`` existed lack that input (io.json then doesn't list it).
- ``eval_model.onnx``: forward only; inputs as the training model's without ``weights``;
  outputs ``loss_sum`` (the plain summed cross-entropy) and ``logits`` float32 ``[batch, seq, vocab]``.
- ``checkpoint``: the LoRA tensors, the only ones with ``requires_grad``, named by their PEFT
  keys (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``), and the frozen
  base: packed uint8/int8 quantized buffers, float32 block scales, norms, the float32 embedding.
- ``optimizer_model.onnx``: ORT's AdamW, for other ORT clients (pocketpeft's runtime runs a
  torch-exact AdamW on the host; see the onnxruntime backend).
- ``infer.onnx``: forward only, base embedded as initializers; inputs ``input_ids`` plus one
  float32 input per LoRA tensor (named by PEFT key, fixed shape), and an optional ``labels``
  (int64 ``[batch, seq]``, -100 ignored; it defaults to a ``[1, 1]`` -100 broadcast to
  ``input_ids``' shape, so a client that feeds only ``input_ids`` and the LoRA tensors still
  runs); outputs ``logits`` ``[batch, seq, vocab]`` and ``loss_sum`` (the summed token
  cross-entropy, the training graphs' convention; 0 without labels). The forward-only / NPU path:
  a loss costs one run and no logits copy.
- ``io.json``: names, shapes, conventions, and the session config the training graph wants.

A split bundle (``ctx.split_layer`` = k, see :class:`pocketpeft.manifest.Split`) adds
``prefix.onnx``: the embedding and layers < k, ``input_ids`` -> ``hidden`` (float32
``[batch, seq, hidden_size]``, dynamic), inference only; the training model, eval model and
checkpoint then hold the suffix (layers >= k, final norm, head, loss) and take ``hidden`` instead
of ``input_ids``; ``io.json``'s ``split`` entry says so, with the session config the prefix wants
(no constant folding: its weights stay quantized instead of being folded to float32 at load).
``infer.onnx`` stays the whole model (forward-only updates and the onnxruntime-infer backend).

Two export options trade speed for device memory (:class:`pocketpeft.formats.onnx.OnnxOptions`,
``export(..., onnx=OnnxOptions(rows=N, q4="int8"))``; io.json and the manifest record them):
``rows=N``, the training graph's static rows (default the bundle's batch size;
a bigger batch runs as micro-batches of N rows whose gradients accumulate exactly), and
``q4="int8"``, q4_0 weights stored one int8 per weight instead of packed nibbles
(twice the bytes, half the dequantization work; see :func:`_unpacked_q4`). SmolLM2, batch 8x64
on 2 cores, a training process without torch (benchmarks/results/train_speed.json): the
default (8 rows, packed) peaks at 1388 MiB; ``rows=2`` + ``q4="int8"`` at 734 MiB with 95% of its
speed; ``rows=1`` + ``q4="int8"`` at 624 MiB with 76%.

Frozen weights are dequantized in-graph with standard ops (Cast, BitwiseAnd, Div+Floor, and one
Gather from a byte table for nf4), bit-identical to ``pocketpeft.reference.quant.dequantize``. The backward
pass recomputes them rather than keeping them (see :func:`_rematerialize_frozen`).

Rides on ORT training 1.19.2 (its last release) and the dynamo exporter with ``optimize=False``
(the optimizer's constant folding renames initializers, losing the PEFT mapping).
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings

import torch

from pocketpeft.errors import UnsupportedModelError
from pocketpeft.formats import onnx as fmt
from pocketpeft.formats.onnx import DIR, IO_JSON, LOSS, OnnxOptions, OnnxQ4  # noqa: F401 (re-exported)
from pocketpeft.reference.lora import PEFT_PREFIX, global_key, lora_modules

from .protocol import ExportContext

MAX_IR_VERSION = 10  # onnxruntime 1.19.2 rejects newer
UNPACKED = "qweight_int8"  # the q4_0 buffer added for OnnxOptions(q4="int8")
_PROTO_LIMIT = 2_000_000_000  # protobuf's 2 GB ceiling (with margin); external data is not implemented


def lora_onnx_names(model: torch.nn.Module) -> dict[str, str]:
    """Exported initializer name -> PEFT key for every LoRA tensor (model order, A then B)."""
    out = {}
    for name, _ in lora_modules(model):
        for part in ("lora_A", "lora_B"):
            out[f"{name}.{part}.weight"] = f"{PEFT_PREFIX}{name}.{part}.weight"
    return out


def _nf4_table() -> torch.Tensor:
    """[256, 2] float32: the two nf4 code values packed in each byte (high nibble first)."""
    from pocketpeft.reference.quant import NF4_CODE

    b = torch.arange(256)
    return torch.stack([NF4_CODE[b // 16], NF4_CODE[b % 16]], dim=-1)


@contextlib.contextmanager
def _export_dequant(tie: bool = False):
    """While exporting, q4_0 layers given int8 weights by :func:`_unpacked_q4` dequantize with a
    Cast and a Mul, and nf4 layers with one Gather from :func:`_nf4_table` per byte:
    bit-identical to ``quant.dequantize``, whose ``NF4_CODE[idx]`` exports as a GatherND over
    every nibble, ~4x slower in ORT. (The table is built here, outside tracing, so it is
    exported as a constant.)

    ``tie``: each layer's dequantization starts from a row gather whose indices depend on the
    layer's input (``x * 0`` made finite, so always 0): the graph then cannot dequantize a weight
    before its layer runs. Without it ORT computes every layer's float32 weights up front and keeps
    them all alive through the run (SmolLM2's 22-layer prefix: +530 MiB at the peak of a run,
    instead of one layer's worth). For inference graphs only: a training graph's backward reads
    weights that :func:`_rematerialize_frozen` recomputes, which needs them input-independent.

    A layer's float32 ``bias`` buffer (Qwen2's q/k/v biases) is added on every path, as
    ``QuantLinear.forward`` adds it."""
    import torch.nn.functional as F

    from pocketpeft.config import QuantFormat
    from pocketpeft.reference.quant import QuantLinear, dequantize

    original, table = QuantLinear.forward, _nf4_table()

    def forward(self, x):
        take = (lambda t: t) if not tie else _tied_rows(x, self.out_features)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if getattr(self, UNPACKED, None) is not None:  # q4_0 stored one int8 (nibble - 8) per weight
            nb = self.in_features // 32
            w = take(getattr(self, UNPACKED)).reshape(-1, nb, 32).to(torch.float32) * self.scales.reshape(-1, nb, 1).to(
                torch.float32
            )
            return F.linear(x, w.reshape(self.out_features, self.in_features).to(x.dtype), b)
        if self.fmt is QuantFormat.NF4:
            codes = F.embedding(take(self.qweight).reshape(-1, 32).to(torch.int32), table).reshape(-1, 64)
            w = (codes * self.absmax.reshape(-1, 1).to(torch.float32)).reshape(self.out_features, self.in_features)
            return F.linear(x, w.to(x.dtype), b)
        if not tie:
            return original(self, x)
        buffers = self._buffers_dict()
        buffers["qweight" if "qweight" in buffers else "weight"] = take(buffers.get("qweight", buffers.get("weight")))
        w = dequantize(buffers, self.fmt, (self.out_features, self.in_features), x.dtype)
        return F.linear(x, w, b)

    QuantLinear.forward = forward
    try:
        yield
    finally:
        QuantLinear.forward = original


def _tied_rows(x: torch.Tensor, rows: int):
    """A function selecting all ``rows`` of a weight buffer in order, through indices that depend
    on ``x`` (see :func:`_export_dequant`'s ``tie``)."""
    zero = torch.nan_to_num(x.reshape(-1)[:1] * 0, nan=0.0, posinf=0.0, neginf=0.0).to(torch.int64)
    idx = torch.arange(rows, dtype=torch.int64) + zero
    return lambda t: t.index_select(0, idx)


@contextlib.contextmanager
def _unpacked_q4(model: torch.nn.Module, enabled: bool):
    """With ``enabled``, every q4_0 layer gets a buffer of its weights as int8 ``nibble - 8``
    (row-major, one per weight) for the export: the graph then dequantizes with a Cast and a
    Mul instead of the bit arithmetic on packed nibbles, which matters when the training graph
    runs a small micro-batch and dequantizes every weight twice per micro-batch. Twice the
    bytes of the packed blocks, the same float32 values. Removed afterwards."""
    from pocketpeft.config import QuantFormat
    from pocketpeft.reference.quant import QuantLinear, _nibbles

    added = []
    try:
        for m in model.modules() if enabled else ():
            if isinstance(m, QuantLinear) and m.fmt is QuantFormat.Q4_0:
                lo, hi = _nibbles(m.qweight.reshape(m.out_features, m.in_features // 32, 16))
                q = (torch.cat([lo, hi], -1).to(torch.int16) - 8).to(torch.int8)
                m.register_buffer(UNPACKED, q.reshape(m.out_features, m.in_features))
                added.append(m)
        yield
    finally:
        for m in added:
            del m._buffers[UNPACKED]


def global_onnx_names(model: torch.nn.Module) -> dict[str, str]:
    """Exported initializer name -> slot name (``...lora_A.global.weight``) of every filled global
    slot (two-level adapters); ``{}`` for a model without one."""
    out = {}
    for name, mod in lora_modules(model):
        if mod.global_A is not None:
            for part, slot in (("lora_A", "global_A"), ("lora_B", "global_B")):
                out[f"{name}.{slot}"] = global_key(f"{PEFT_PREFIX}{name}.{part}.weight")
    return out


def _options(ctx: ExportContext) -> tuple[int, str]:
    """(rows of the static training graph, q4_0 storage) from ``ctx.onnx`` (:class:`OnnxOptions`,
    validated at construction; rows default to the bundle's batch size)."""
    opts = getattr(ctx, "onnx", None) or OnnxOptions()
    return opts.rows_for(ctx.batch_size), opts.q4.value


def _export_forward(ctx: ExportContext, train: bool, part: str = "model"):
    """``part`` of the model as an ONNX ModelProto with dynamic batch and sequence: ``"model"``
    (``input_ids`` -> ``logits``), ``"prefix"`` (``input_ids`` -> ``hidden``, the layers below
    ``ctx.split_layer``) or ``"suffix"`` (``hidden`` -> ``logits``, the layers from it on)."""
    from pocketpeft.reference.model import SplitPart

    model, n = ctx.model, ctx.arch.num_hidden_layers
    module, names = model, ([fmt.INPUT_IDS], [fmt.LOGITS])
    b, t = max(2, ctx.batch_size), max(2, ctx.seq_len)  # 0/1 would specialize
    example = torch.zeros((b, t), dtype=torch.int64)
    if part == "prefix":
        module, names = SplitPart(model, 0, ctx.split_layer), ([fmt.INPUT_IDS], [fmt.HIDDEN])
    elif part == "suffix":
        module, names = SplitPart(model, ctx.split_layer, n), ([fmt.HIDDEN], [fmt.LOGITS])
        example = torch.zeros((b, t, ctx.arch.hidden_size), dtype=torch.float32)
    dims = {
        0: torch.export.Dim("batch", min=1, max=65536),
        1: torch.export.Dim("seq", min=1, max=ctx.arch.max_position_embeddings),
    }
    was_training = model.training
    module.train(train)  # train mode only to keep LoRA dropout in the training graph
    try:
        with _export_dequant(tie=part == "prefix"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
            prog = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                optimize=False,
                input_names=names[0],
                output_names=names[1],
                dynamic_shapes=(dims,),
                verbose=False,
            )
    finally:
        model.train(was_training)
    return prog.model_proto


def _rename(mp, names: dict[str, str]) -> None:
    """Rename initializers / graph inputs and every node input that refers to them."""
    for t in mp.graph.initializer:
        t.name = names.get(t.name, t.name)
    for v in mp.graph.input:
        v.name = names.get(v.name, v.name)
    for n in mp.graph.node:
        for i, x in enumerate(n.input):
            if x in names:
                n.input[i] = names[x]


def _portable_ops(mp) -> None:
    """Rewrite what the exporter emits but ORT can't differentiate, run, or runs slowly: CastLike
    (no gradient builder) becomes Cast to the inferred type; GatherND gets the int64 indices ONNX
    requires (the exporter passes int32 ones through); Dropout gets the mask output its gradient
    reads; ``Pow(x, 2)`` becomes ``Mul(x, x)`` (the same correctly rounded result; ORT's Pow
    calls std::pow per element)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = onnx.shape_inference.infer_shapes(mp).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    twos = set()
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            types[n.output[0]] = n.attribute[0].t.data_type
            if not n.attribute[0].t.dims and float(numpy_helper.to_array(n.attribute[0].t)) == 2.0:
                twos.add(n.output[0])
    nodes, i = mp.graph.node, 0
    while i < len(nodes):
        n = nodes[i]
        if n.op_type == "CastLike":
            if not types.get(n.input[1]):
                raise UnsupportedModelError(f"onnx export: cannot infer the target type of CastLike {n.name}")
            nodes[i].CopyFrom(helper.make_node("Cast", [n.input[0]], list(n.output), name=n.name, to=types[n.input[1]]))
        elif n.op_type == "GatherND":
            idx = f"{n.input[1]}.int64"
            nodes.insert(i, helper.make_node("Cast", [n.input[1]], [idx], name=f"{n.name}.int64", to=TensorProto.INT64))
            nodes[i + 1].input[1] = idx
            i += 1
        elif n.op_type == "Dropout" and len(n.output) == 1:  # ORT's DropoutGrad reads the mask output
            n.output.append(f"{n.output[0]}.mask")
        elif n.op_type == "Pow" and n.input[1] in twos:
            nodes[i].CopyFrom(helper.make_node("Mul", [n.input[0], n.input[0]], list(n.output), name=n.name))
        i += 1


def _f16_to_f32(mp, names: set[str]) -> None:
    """float16 initializers in ``names`` become float32 (exact), because ORT 1.19's checkpoint
    cannot hold float16; the graph's Cast-to-float32 after them becomes a no-op."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    for t in mp.graph.initializer:
        if t.name in names and t.data_type == TensorProto.FLOAT16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    del mp.graph.value_info[:]  # stale float16 types; shape inference recomputes them


def _sum_ce_block(vocab: int):
    """An onnxblock loss: ``loss_sum`` = sum(weights * CE) of [B,T,V] logits against [B,T] labels
    (-100 ignored: their CE is 0) with float32 [B,T] per-token ``weights`` (the runtime feeds 1
    for the plain summed cross-entropy). SoftmaxCrossEntropyLoss wants [N, C] scores and [N]
    labels; ``reduction="none"`` gives the per-token CE the weights multiply. The eval model
    drops the weights again (:func:`_unweighted_eval`)."""
    import numpy as np
    from onnx import helper, numpy_helper
    from onnxruntime.training import onnxblock

    class SumCrossEntropy(onnxblock.Block):
        def build(self, logits: str) -> str:
            from onnx import TensorProto

            g = self.base.graph
            first = next(i for i in g.input if i.name in (fmt.INPUT_IDS, fmt.HIDDEN))
            labels = copy.deepcopy(first)  # [batch, seq] of the model's input, int64
            labels.name = fmt.LABELS
            labels.type.tensor_type.elem_type = TensorProto.INT64
            del labels.type.tensor_type.shape.dim[2:]
            weights = copy.deepcopy(labels)
            weights.name = fmt.WEIGHTS
            weights.type.tensor_type.elem_type = TensorProto.FLOAT
            g.input.extend([labels, weights])
            g.initializer.extend(
                [
                    numpy_helper.from_array(np.array([-1, vocab], np.int64), "loss.scores_shape"),
                    numpy_helper.from_array(np.array([-1], np.int64), "loss.labels_shape"),
                ]
            )
            g.node.extend(
                [
                    helper.make_node("Reshape", [logits, "loss.scores_shape"], ["loss.scores"], name="loss.scores"),
                    helper.make_node("Reshape", ["labels", "loss.labels_shape"], ["loss.labels"], name="loss.labels"),
                    helper.make_node(
                        "Reshape", [fmt.WEIGHTS, "loss.labels_shape"], ["loss.weights"], name="loss.weights"
                    ),
                    helper.make_node(
                        "SoftmaxCrossEntropyLoss",
                        ["loss.scores", "loss.labels"],
                        ["loss.token_ce"],
                        reduction="none",
                        ignore_index=fmt.IGNORE_INDEX,
                        name="loss.ce",
                    ),
                    helper.make_node("Mul", ["loss.token_ce", "loss.weights"], ["loss.weighted"], name="loss.weigh"),
                    helper.make_node("ReduceSum", ["loss.weighted"], [LOSS], keepdims=0, name="loss.sum"),
                ]
            )
            return LOSS

    return SumCrossEntropy()


def _unweighted_eval(mp) -> None:
    """Turn the eval model back into the plain summed cross-entropy of labels (no ``weights``
    input): the loss block's per-token CE, weighting and sum become one SoftmaxCrossEntropyLoss
    with ``reduction="sum"``, as bundles have always had it."""
    from onnx import helper

    g = mp.graph
    drop = {"loss.weights", "loss.weigh", "loss.sum"}
    if not any(n.name == "loss.ce" for n in g.node) or not drop <= {n.name for n in g.node}:
        raise UnsupportedModelError("onnx export: the eval model lacks the weighted loss block's nodes")
    nodes = []
    for n in g.node:
        if n.name == "loss.ce":
            n = helper.make_node(
                "SoftmaxCrossEntropyLoss",
                list(n.input),
                [LOSS],
                reduction="sum",
                ignore_index=fmt.IGNORE_INDEX,
                name="loss.ce",
            )
        if n.name not in drop:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    kept = [i for i in g.input if i.name != fmt.WEIGHTS]
    del g.input[:]
    g.input.extend(kept)
    kept_vi = [v for v in g.value_info if v.name not in ("loss.token_ce", "loss.weighted", "loss.weights")]
    del g.value_info[:]
    g.value_info.extend(kept_vi)


@contextlib.contextmanager
def _quiet_ort():
    """generate_artifacts builds its own SessionOptions, which log every graph transformer at
    INFO level to stderr; make those options log errors only."""
    import onnxruntime
    from onnxruntime.training.onnxblock import _training_graph_utils as tgu

    class _Options(onnxruntime.SessionOptions):
        def __init__(self) -> None:
            super().__init__()
            self.log_severity_level = 3

    saved = tgu.SessionOptions
    tgu.SessionOptions = _Options
    try:
        yield
    finally:
        tgu.SessionOptions = saved


def _tanh_gelu_grads(mp) -> int:
    """Give each tanh-approximated ``Gelu`` (Gemma's GeGLU) the gradient of that form. ORT
    1.19's gradient builder gives ONNX's ``Gelu`` the erf form's gradient (com.microsoft
    ``GeluGrad``) whatever its ``approximate`` attribute; ``FastGeluGrad`` (same inputs ``dY, X``)
    is the tanh form's. Off by ~1e-3 relative otherwise. Returns how many were replaced; graphs
    without a tanh-GELU are left as they are."""
    tanh = {
        n.input[0]
        for n in mp.graph.node
        if n.op_type == "Gelu"
        and n.domain in ("", "ai.onnx")
        and any(a.name == "approximate" and a.s == b"tanh" for a in n.attribute)
    }
    count = 0
    for n in mp.graph.node:
        if n.op_type == "GeluGrad" and n.domain == "com.microsoft" and n.input[1] in tanh:
            n.op_type = "FastGeluGrad"
            count += 1
    return count


#: frozen weights of the output projection (the tied embedding, or an untied lm_head)
_HEAD_WEIGHTS = ("model.embed_tokens.", "lm_head.")


def _rematerialize_frozen(mp, frozen: set[str], keep: set[str] = frozenset()) -> int:
    """Make the backward pass recompute what it reads from frozen weights (dequantized and
    transposed base weights) instead of keeping the forward's copy alive: each such chain is
    cloned right before its first backward consumer. ORT then frees every dequantized weight
    after its forward matmul. SmolLM2, batch 8x64: 0.5 GB fewer stashed bytes, 0.25 GB lower peak
    RSS, ~7% more CPU for the second dequantization. Sessions must disable
    CommonSubexpressionElimination, which would merge the clones back (still correct, just
    without the saving); io.json says so.

    Chains that read ``keep`` (the output projection's weights) are left alone: the projection
    is the forward's last matmul and the backward's first, so its copy lives no longer than the
    logits around it and recomputing it would only cost time (Gemma 3's 262k x 640 q8_0 matrix:
    168M values dequantized again per micro-batch).
    Returns how many backward inputs were redirected."""
    import onnx

    nodes = list(mp.graph.node)
    loss_at = next(i for i, n in enumerate(nodes) if LOSS in n.output)
    producer, derived, constant = {}, set(frozen), {t.name for t in mp.graph.initializer}
    head = set(keep)
    for n in nodes[: loss_at + 1]:  # forward: which tensors depend on frozen weights (and constants) only
        ins = [x for x in n.input if x]
        producer.update((o, n) for o in n.output)
        if all(x in derived or x in constant for x in ins):
            (derived if any(x in derived for x in ins) else constant).update(n.output)
        if any(x in head for x in ins):
            head.update(n.output)
    clones: dict[str, str] = {}
    pending: list = []

    def clone(x: str) -> str:
        if x not in derived or x not in producer:
            return x  # a graph input or constant: reading it keeps nothing extra alive
        if x not in clones:
            n = producer[x]
            c = onnx.NodeProto()
            c.CopyFrom(n)
            c.name = f"{n.name}.remat"
            c.input[:] = [clone(i) if i else i for i in n.input]
            c.output[:] = [f"{o}.remat" for o in n.output]
            clones.update((o, f"{o}.remat") for o in n.output)
            pending.append(c)
        return clones[x]

    out, count = nodes[: loss_at + 1], 0
    for n in nodes[loss_at + 1 :]:
        for k, x in enumerate(n.input):
            if x in derived and x in producer and x not in head:
                n.input[k] = clone(x)
                count += 1
        out += pending + [n]  # clones land right before their first consumer (topological order kept)
        pending.clear()
    del mp.graph.node[:]
    mp.graph.node.extend(out)
    return count


def _check_size(mp, what: str) -> None:
    if mp.ByteSize() > _PROTO_LIMIT:
        raise UnsupportedModelError(
            f"onnx export: {what} is {mp.ByteSize() / 1e9:.2f} GB, over protobuf's 2 GB "
            "limit; use a smaller base or a 4-bit quant format"
        )


def _save(mp, path, external: str | None = None) -> None:
    """Write ``mp`` with ``ir_version`` <= 10; ``external``: the file name, beside ``path``, that
    holds its initializers as ONNX external data."""
    import onnx

    mp.ir_version = min(mp.ir_version, MAX_IR_VERSION)
    if external is None:
        onnx.save(mp, str(path))
    else:
        onnx.save(mp, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=external)


def _append_loss(mp) -> None:
    """Give a forward graph (``input_ids`` -> ``logits``) an optional ``labels`` input and a
    ``loss_sum`` output, the summed token cross-entropy of its logits (-100 ignored): what the
    onnxruntime-infer backend and forward-only training read, so a loss costs one run and no
    logits copy. ``labels`` is an initializer-backed input (ONNX's optional input with a default):
    a ``[1, 1]`` -100 broadcast to ``input_ids``' shape, so clients feeding only ``input_ids`` and
    the LoRA tensors run unchanged (``loss_sum`` is then 0)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    g = mp.graph
    logits = next((o for o in g.output if o.name == fmt.LOGITS), None)
    if logits is None or not any(i.name == fmt.INPUT_IDS for i in g.input):
        raise UnsupportedModelError("onnx export: the forward graph has no input_ids input / logits output")
    vocab = logits.type.tensor_type.shape.dim[-1].dim_value
    g.input.append(helper.make_tensor_value_info(fmt.LABELS, TensorProto.INT64, ["labels_batch", "labels_seq"]))
    g.initializer.extend(
        [
            numpy_helper.from_array(np.full((1, 1), fmt.IGNORE_INDEX, np.int64), fmt.LABELS),
            numpy_helper.from_array(np.array([-1, vocab], np.int64), "fo.flat_logits"),
            numpy_helper.from_array(np.array([-1], np.int64), "fo.flat_labels"),
        ]
    )
    g.node.extend(
        [
            helper.make_node("Shape", [fmt.INPUT_IDS], ["fo.ids_shape"], name="fo.ids_shape"),
            helper.make_node("Expand", [fmt.LABELS, "fo.ids_shape"], ["fo.labels"], name="fo.labels"),
            helper.make_node("Reshape", [fmt.LOGITS, "fo.flat_logits"], ["fo.scores"], name="fo.scores"),
            helper.make_node("Reshape", ["fo.labels", "fo.flat_labels"], ["fo.targets"], name="fo.targets"),
            helper.make_node(
                "SoftmaxCrossEntropyLoss",
                ["fo.scores", "fo.targets"],
                [LOSS],
                reduction="sum",
                ignore_index=fmt.IGNORE_INDEX,
                name="fo.ce",
            ),
        ]
    )
    g.output.append(helper.make_tensor_value_info(LOSS, TensorProto.FLOAT, []))


def _write_infer(fwd, lora: dict[str, str], path) -> dict[str, list[int]]:
    """infer.onnx: the forward graph with the LoRA initializers (and the global slot's, when
    ``lora`` names them) turned into graph inputs, and the optional labels -> ``loss_sum`` of
    :func:`_append_loss`."""
    from onnx import helper

    mp = copy.deepcopy(fwd)
    _rename(mp, lora)
    keys = set(lora.values())
    inits = {t.name: t for t in mp.graph.initializer}
    shapes = {k: list(inits[k].dims) for k in lora.values()}
    kept = [t for t in mp.graph.initializer if t.name not in keys]
    del mp.graph.initializer[:]
    mp.graph.initializer.extend(kept)
    mp.graph.input.extend(helper.make_tensor_value_info(k, inits[k].data_type, shapes[k]) for k in lora.values())
    _append_loss(mp)
    _save(mp, path)
    return shapes


def _write_training(fwd, ctx: ExportContext, lora: dict[str, str], out, rows: int) -> None:
    """generate_artifacts over the forward graph (renamed to PEFT keys), then the fix-ups:
    training_model gets static ``[batch_size, seq_len]`` inputs and rematerialization,
    eval_model a logits output, every model ``ir_version`` <= 10."""
    import onnx
    from onnx import TensorProto, helper
    from onnxruntime.training import artifacts, onnxblock

    glob = global_onnx_names(ctx.model)
    _rename(fwd, {**lora, **glob})
    params = {k for k, _ in ctx.model.named_parameters()} | {k for k, _ in ctx.model.named_buffers()}
    # the global slot is frozen like the base, but stays a named parameter of the checkpoint: the
    # runtime writes the installed global adapter into it
    params |= set(glob.values())
    frozen = [t.name for t in fwd.graph.initializer if t.name in params and t.name not in lora.values()]
    _f16_to_f32(fwd, set(frozen))
    with _quiet_ort():
        artifacts.generate_artifacts(
            fwd,
            requires_grad=list(lora.values()),
            frozen_params=frozen,
            loss=_sum_ce_block(ctx.arch.vocab_size),
            # torch.optim.AdamW's defaults, for ORT clients that use this model; pocketpeft doesn't
            optimizer=onnxblock.optim.AdamW(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
            artifact_directory=str(out),
        )
    for name in (fmt.TRAIN, fmt.OPTIMIZER, fmt.EVAL):
        mp = onnx.load(str(out / name))
        if name == fmt.TRAIN:
            _tanh_gelu_grads(mp)
            _rematerialize_frozen(mp, set(frozen), {f for f in frozen if f.startswith(_HEAD_WEIGHTS)})
            # Static shapes let ORT plan all activation memory ahead: SmolLM2 at 8x64 peaks 0.6 GB
            # lower than with dynamic dims (same speed). The runtime pads short batches.
            for v in mp.graph.input:
                if v.name in (fmt.INPUT_IDS, fmt.HIDDEN, fmt.LABELS, fmt.WEIGHTS):
                    for dim, size in zip(v.type.tensor_type.shape.dim, (rows, ctx.seq_len)):
                        dim.Clear()
                        dim.dim_value = size
        elif name == fmt.EVAL:  # logits too: top-k metrics and logits() run in eval mode
            _unweighted_eval(mp)
            mp.graph.output.append(
                helper.make_tensor_value_info(fmt.LOGITS, TensorProto.FLOAT, ["batch", "seq", ctx.arch.vocab_size])
            )
        _save(mp, out / name)


def _io_description(
    ctx: ExportContext, lora_shapes: dict[str, list[int]], rows: int, q4: str, global_shapes: dict | None = None
) -> dict:
    """The content of io.json (see the module docstring)."""
    global_shapes = global_shapes or {}
    ids = {fmt.INPUT_IDS: ["batch", "seq"]}
    logits = {fmt.LOGITS: ["batch", "seq", ctx.arch.vocab_size]}
    static = [rows, ctx.seq_len]
    split = ctx.split_layer is not None
    train_in = {fmt.HIDDEN: [*static, ctx.arch.hidden_size]} if split else {fmt.INPUT_IDS: static}
    eval_in = {fmt.HIDDEN: ["batch", "seq", ctx.arch.hidden_size]} if split else ids
    extra = {}
    if split:
        extra[fmt.IO_SPLIT] = {
            "layer": ctx.split_layer,
            "prefix": fmt.PREFIX,
            fmt.IO_INPUTS: {**ids},
            fmt.IO_OUTPUTS: {fmt.HIDDEN: ["batch", "seq", ctx.arch.hidden_size]},
            "note": "the training and eval models hold the suffix (layers >= layer) and take hidden",
            # the prefix runs once per row (its outputs are cached): keep its weights quantized
            # rather than letting ORT fold every dequantization into a float32 copy at load
            fmt.IO_PREFIX_SESSION_CONFIG: {"optimization.disable_specified_optimizers": "ConstantFolding"},
        }
    return {
        **extra,
        fmt.IO_FORMAT_VERSION: 1,
        "dims": {"batch": "dynamic", "seq": f"dynamic, 1..{ctx.arch.max_position_embeddings}"},
        fmt.IO_TRAINING_MODEL: {
            fmt.IO_INPUTS: {**train_in, fmt.LABELS: static, fmt.WEIGHTS: static},
            fmt.IO_OUTPUTS: {LOSS: []},
            "note": "static shapes: pad short batches/rows with label -100; a batch of more "
            "rows runs as micro-batches whose gradients accumulate; loss_sum = sum(weights * CE) "
            "over labels != -100 (weights float32, 1 for the plain summed cross-entropy)",
        },
        fmt.IO_Q4_STORAGE: q4 if ctx.quant.value == "q4_0" else None,
        fmt.IO_EVAL_MODEL: {
            fmt.IO_INPUTS: {**eval_in, fmt.LABELS: ["batch", "seq"]},
            fmt.IO_OUTPUTS: {LOSS: [], **logits},
        },
        fmt.IO_INFER: {
            fmt.IO_INPUTS: {**ids, **lora_shapes, **global_shapes},
            fmt.IO_OUTPUTS: {**logits, LOSS: []},
            "optional_inputs": {fmt.LABELS: ["batch", "seq"]},
            fmt.IO_INFER_LOSS: True,
            "note": "labels is optional (default: none scored, loss_sum 0)",
        },
        "loss": "sum of token cross-entropies over labels != -100 (divide by their count for the mean)",
        fmt.IO_LORA: {k: k for k in lora_shapes},  # PEFT key -> ONNX name: identical, nothing needed sanitizing
        # the frozen global adapter's slot (two-level adapters): PEFT key -> ONNX name, a frozen
        # checkpoint parameter of the training/eval models and an input of infer.onnx
        **({fmt.IO_GLOBAL: {k.replace(".global.", "."): k for k in global_shapes}} if global_shapes else {}),
        "lora_dropout_in_training_graph": ctx.lora.lora_dropout > 0,
        # training_model recomputes dequantized weights in backward; CSE would merge that back
        fmt.IO_SESSION_CONFIG: {"optimization.disable_specified_optimizers": "CommonSubexpressionElimination"},
    }


class OnnxTarget:
    """Writes the ``onnx/`` folder; see the module docstring."""

    name = "onnx"

    def export(self, ctx: ExportContext) -> dict[str, str]:
        """Export ``ctx.model`` to ``ctx.stage / "onnx"``; returns the toolchain versions.

        Raises :class:`MissingDependencyError` without the ``onnx`` extra and
        :class:`UnsupportedModelError` if the graph can't be made trainable by ORT.
        """
        from pocketpeft._deps import require

        onnx = require("onnx", "onnx")
        require("onnxscript", "onnx")
        onnxruntime = require("onnxruntime", "onnx")
        require("onnxruntime.training", "onnx")
        out = ctx.stage / DIR
        out.mkdir(parents=True, exist_ok=True)
        bar = None
        if ctx.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=3, desc="onnx: export graph (torch.export)", unit="stage", leave=False)

        lora = lora_onnx_names(ctx.model)
        rows, q4 = _options(ctx)
        with _unpacked_q4(ctx.model, q4 == "int8"):
            return self._export(ctx, lora, out, bar, onnx, onnxruntime, rows, q4)

    def _export(
        self, ctx: ExportContext, lora: dict[str, str], out, bar, onnx, onnxruntime, rows: int, q4: str
    ) -> dict[str, str]:
        fwd = _export_forward(ctx, train=False)
        glob = global_onnx_names(ctx.model)
        missing = sorted(set(lora) - {t.name for t in fwd.graph.initializer})
        missing += sorted(set(glob) - {t.name for t in fwd.graph.initializer})
        if missing:  # the exporter renamed parameters: the PEFT mapping would be lost
            raise UnsupportedModelError(f"onnx export: LoRA tensors missing from the graph: {missing[:3]}")
        _check_size(fwd, "the forward graph")
        _portable_ops(fwd)
        if bar is not None:
            bar.update()
            bar.set_description("onnx: infer.onnx")
        shapes = _write_infer(fwd, {**lora, **glob}, out / fmt.INFER)
        lora_shapes = {k: shapes[k] for k in lora.values()}
        global_shapes = {k: shapes[k] for k in glob.values()}
        if bar is not None:
            bar.update()
            bar.set_description("onnx: training artifacts")
        if ctx.split_layer is not None:  # the frozen prefix for inference; training sees the suffix
            prefix = _export_forward(ctx, train=False, part="prefix")
            _check_size(prefix, "the prefix graph")
            _portable_ops(prefix)
            _save(prefix, out / fmt.PREFIX, external=fmt.PREFIX_DATA)
            fwd = _export_forward(ctx, train=ctx.lora.lora_dropout > 0, part="suffix")
            _portable_ops(fwd)
        elif ctx.lora.lora_dropout > 0:  # the training graph keeps LoRA dropout; infer.onnx must not
            fwd = _export_forward(ctx, train=True)
            _portable_ops(fwd)
        _write_training(fwd, ctx, lora, out, rows)
        (out / IO_JSON).write_text(
            json.dumps(_io_description(ctx, lora_shapes, rows, q4, global_shapes), indent=1) + "\n"
        )
        if bar is not None:
            bar.update()
            bar.close()
        return {"onnx": onnx.__version__, "onnxruntime-training": onnxruntime.__version__.split("+")[0]}


TARGET = OnnxTarget()
