"""Target ``coreml``: an ML Program ``.mlpackage`` of the quantized base, LoRA tensors as inputs.

Files under ``coreml/``:

- ``model.mlpackage``: ML Program, iOS 18 / macOS 15 opset, float16 compute. Inputs
  ``input_ids`` int32 ``[1, seq_len]`` and one float32 input per LoRA tensor with its fixed
  shape; output ``logits`` float16 ``[1, seq_len, vocab]``. Core ML feature names must be
  identifiers, so a LoRA input is its PEFT key with ``.`` replaced by ``_``
  (``base_model_model_model_layers_0_self_attn_q_proj_lora_A_weight``); ``signature.json`` maps
  each back to its PEFT key. A new adapter is new input values: nothing is recompiled.
- ``signature.json``: inputs (Core ML name -> PEFT key, shape, dtype), output, sequence
  convention and how each frozen weight is stored.

**Sequence length: fixed** at the bundle's ``seq_len``, batch 1. The app right-pads
``input_ids`` (any id) and reads the logits at the last real position: attention is causal, so
positions after it change nothing before it. One static shape is what the Neural Engine compiles
ahead of time (ranged shapes fall back to GPU/CPU); a keyboard prefix longer than ``seq_len``
keeps its last ``seq_len`` tokens, as the predictor's trimming does.

**Weights**, per bundle quant format, byte for byte the bundle's (no re-quantization):

- ``q4_0``: ``constexpr_blockwise_shift_scale(data=uint4 q, scale=fp16 d, offset=uint4 8)``,
  blocks of 32 along ``in`` = ggml's ``d * (q - 8)`` with the same nibbles and scales.
- ``q8_0``: ``constexpr_blockwise_shift_scale(data=int8 q, scale=fp16 d)``, blocks of 32 = ``d * q``.
- ``nf4``: ``constexpr_lut_to_dense`` (uint4 indices, one 16-entry LUT: the NF4 code) feeding
  ``constexpr_blockwise_shift_scale`` (scale = absmax per block of 64), Core ML's palettization
  with a per-block scale. The indices are bitsandbytes'; the code values and absmax are stored
  as float16 (Core ML's compute type), a relative rounding of at most 2**-11 per weight.
- ``f16`` / ``f32``: plain float16 constants.

The embedding (tied to the output projection where the base ties them) and the norms are
float16 constants. The graph is the one the ExecuTorch target exports (``torch.export`` of the
model with LoRA tensors as inputs); frozen linears enter it as their dequantized weight, which is
then swapped for the compressed ops above (matched by value, every layer accounted for).
Running the package needs macOS (Core ML); on Linux it is validated structurally
(:func:`describe`) and its stored weights read back with coremltools.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pocketpeft.errors import CorruptFileError, UnsupportedModelError
from pocketpeft.formats.coreml import DIR, PACKAGE, SIGNATURE, coreml_name  # noqa: F401 (re-exported)
from pocketpeft.reference.lora import lora_shapes
from pocketpeft.reference.quant import NF4_CODE, QuantLinear

from .executorch_target import _InferNet, global_slot_names, peft_key, trainable_copy
from .protocol import ExportContext

#: The ops a compressed frozen weight is stored with (iOS 18 names; iOS 16's for older packages).
QUANT_OPS = ("constexpr_blockwise_shift_scale", "constexpr_lut_to_dense", "constexpr_affine_dequantize")
_STORAGE = {
    "q4_0": "constexpr_blockwise_shift_scale(uint4 q, fp16 d, offset 8), block 32",
    "q8_0": "constexpr_blockwise_shift_scale(int8 q, fp16 d), block 32",
    "nf4": "constexpr_lut_to_dense(uint4, NF4 code fp16) -> constexpr_blockwise_shift_scale(fp16 absmax), block 64",
    "f16": "float16 const",
    "f32": "float16 const",
}


@contextlib.contextmanager
def _dense_frozen(model: torch.nn.Module):
    """While tracing, every QuantLinear of ``model`` multiplies by its dequantized float32 weight,
    held as a plain tensor attribute so the trace carries it as one constant per layer (the
    quantized storage is put back in MIL, see :func:`_compress_weights`); a float32 ``bias``
    buffer (Qwen2's q/k/v biases) is added as ``QuantLinear.forward`` adds it."""
    original = QuantLinear.forward

    def forward(self, x):
        return F.linear(x, self._coreml_dense.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            mod._coreml_dense = mod.dequantized_weight(torch.float32)
    QuantLinear.forward = forward
    try:
        yield
    finally:
        QuantLinear.forward = original
        for mod in model.modules():
            if isinstance(mod, QuantLinear):
                del mod._coreml_dense


@contextlib.contextmanager
def _quiet_coremltools(progress: bool):
    """coremltools draws a progress bar per conversion stage; show them only with ``progress``."""
    from coremltools.converters.mil.frontend.torch import ops
    from coremltools.converters.mil.mil.passes import pass_pipeline
    from tqdm import tqdm

    if progress:
        yield
        return
    saved = ops._tqdm, pass_pipeline.tqdm

    def quiet(*args, **kwargs):
        return tqdm(*args, **{**kwargs, "disable": True})

    ops._tqdm = pass_pipeline.tqdm = quiet
    try:
        yield
    finally:
        ops._tqdm, pass_pipeline.tqdm = saved


def _logical_and(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.logical_and(a, b) if a.dtype == torch.bool and b.dtype == torch.bool else torch.bitwise_and(a, b)


@contextlib.contextmanager
def _gelu_reads_approximate():
    """While converting, ``aten.gelu``'s ``approximate`` is read from its keyword arguments too.
    torch.export passes it as a keyword and coremltools 9.0's gelu converter reads positional
    arguments only: Gemma's tanh-GELU would silently become the exact (erf) GELU. A gelu without
    the keyword converts as before."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch import ops
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY

    table = _TORCH_OPS_REGISTRY.name_to_func_mapping
    original = table["gelu"]

    def gelu(context, node):
        approximate = ops._get_kwinputs(context, node, "approximate", default=[None])[0]
        approximate = getattr(approximate, "val", approximate)
        if approximate is None:
            return original(context, node)
        if approximate not in ("none", "tanh"):
            raise UnsupportedModelError(f"coreml export: gelu with approximate={approximate!r}")
        x = ops._get_inputs(context, node, expected=1)[0]
        mode = "TANH_APPROXIMATION" if approximate == "tanh" else "EXACT"
        context.add(mb.gelu(x=x, mode=mode, name=node.name))

    gelu.__name__ = original.__name__
    table["gelu"] = gelu
    try:
        yield
    finally:
        table["gelu"] = original


def _export_program(ctx: ExportContext):
    """(ExportedProgram of ``logits = net(input_ids, *lora)`` at ``[1, seq_len]``, the LoRA HF
    names in input order, the traced copy of the model)."""
    model, names = trainable_copy(ctx.model)
    model.eval().requires_grad_(False)
    lora = tuple(p.detach().clone() for p in model.parameters())
    gnames = global_slot_names(model)  # a bundle with a global slot: its tensors are inputs too
    lora += tuple(model.get_buffer(n).detach().clone() for n in gnames)
    names = names + gnames
    net = _InferNet(model, names)
    ids = torch.zeros(1, ctx.seq_len, dtype=torch.int64)
    with torch.no_grad(), _dense_frozen(model):
        ep = torch.export.export(net, (ids, *lora), strict=False)
        # coremltools converts ATen-dialect programs; it has no converter for aten.__and__ (the
        # sliding-window mask's `&` of two comparisons), so that one becomes logical_and
        ep = ep.run_decompositions({torch.ops.aten.__and__.Tensor: _logical_and})
    return ep, names, model


def _uint4(a: torch.Tensor) -> np.ndarray:
    from coremltools.converters.mil.mil import types

    return a.to(torch.uint8).numpy().astype(types.nptype_from_builtin(types.uint4))


def _compressed(mod: QuantLinear, name: str, before):
    """The constexpr op(s) that rebuild ``mod``'s weight from its own quantized bytes."""
    from coremltools.converters.mil import Builder as mb

    o, i, fmt = mod.out_features, mod.in_features, mod.fmt.value
    if fmt == "q8_0":
        return mb.constexpr_blockwise_shift_scale(
            data=mod.qweight.numpy(), scale=mod.scales.numpy(), before_op=before, name=name
        )
    q = mod.qweight.to(torch.int32)
    if fmt == "q4_0":  # ggml nibble order: low nibbles are weights 0..15 of a block, high 16..31
        q = q.reshape(o, i // 32, 16)
        data = _uint4(torch.cat([q & 15, q // 16], dim=-1).reshape(o, i))
        return mb.constexpr_blockwise_shift_scale(
            data=data, scale=mod.scales.numpy(), offset=_uint4(torch.full((o, i // 32), 8)), before_op=before, name=name
        )
    # nf4, bitsandbytes' packing: high nibble first
    idx = _uint4(torch.stack([q // 16, q & 15], dim=-1).reshape(o, i))
    lut = NF4_CODE.numpy().astype(np.float16).reshape(1, 1, 16, 1)
    dense = mb.constexpr_lut_to_dense(indices=idx, lut=lut, before_op=before, name=f"{name}_code")
    return mb.constexpr_blockwise_shift_scale(
        data=dense, scale=mod.absmax.reshape(o, i // 64).numpy().astype(np.float16), before_op=before, name=name
    )


def _compress_weights(prog, model: torch.nn.Module) -> int:
    """Replace each frozen linear's float16 weight constant in ``prog`` by the constexpr ops of
    its quantized bytes; return how many were replaced. Raises :class:`UnsupportedModelError`
    if a layer's weight is not found as a constant (the converter changed it)."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil.scope import ScopeInfo, ScopeSource

    layers = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            w = mod.dequantized_weight(torch.float32).to(torch.float16).numpy()
            layers.setdefault((w.shape, w.tobytes()), []).append((name, mod))
    found: set[str] = set()
    main = prog.functions["main"]
    with main:
        for op in list(main.operations):
            v = op.outputs[0].val if op.op_type == "const" else None
            if not (isinstance(v, np.ndarray) and v.ndim == 2 and v.dtype == np.float16):
                continue
            hit = layers.get((v.shape, v.tobytes()))
            if not hit:
                continue
            name, mod = hit[0]
            found.update(n for n, _ in hit)
            # torch.export programs must keep their source scopes on every op
            keep = (ScopeSource.EXIR_STACK_TRACE, ScopeSource.EXIR_DEBUG_HANDLE)
            with mb.scope(*[ScopeInfo(source=s, data=d) for s, d in op.scopes.items() if s in keep]):
                new = _compressed(mod, coreml_name(name) + "_weight", op)
            op.enclosing_block.replace_uses_of_var_after_op(
                anchor_op=op, old_var=op.outputs[0], new_var=new, no_check_var_types=True
            )
            op.enclosing_block.remove_ops([op])
    missing = sorted({n for hits in layers.values() for n, _ in hits} - found)
    if missing:
        raise UnsupportedModelError(f"coreml export: weights of {missing[:3]} not found as constants after conversion")
    return len(found)


def convert(ctx: ExportContext):
    """Convert ``ctx.model`` to an in-memory ``MLModel`` (not compiled) with its features named;
    returns it and the PEFT keys of the LoRA inputs in input order."""
    import coremltools as ct

    ep, names, model = _export_program(ctx)
    with _quiet_coremltools(ctx.progress), _gelu_reads_approximate():
        prog = ct.convert(
            ep,
            convert_to="milinternal",
            minimum_deployment_target=ct.target.iOS18,
            compute_precision=ct.precision.FLOAT16,
        )
        if ctx.quant.value not in ("f16", "f32"):
            _compress_weights(prog, model)
        ml = ct.convert(
            prog,
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS18,
            pass_pipeline=ct.PassPipeline.EMPTY,
            skip_model_load=True,
        )
    spec = ml.get_spec()
    keys = [peft_key(n) for n in names]
    inputs = [i.name for i in spec.description.input]
    if len(inputs) != 1 + len(keys) or len(spec.description.output) != 1:
        raise UnsupportedModelError(
            f"coreml export: expected input_ids + {len(keys)} LoRA inputs and one output, "
            f"got inputs {inputs[:4]}... and {len(spec.description.output)} outputs"
        )
    ct.utils.rename_feature(spec, inputs[0], "input_ids")
    for old, key in zip(inputs[1:], keys):
        ct.utils.rename_feature(spec, old, coreml_name(key))
    ct.utils.rename_feature(spec, spec.description.output[0].name, "logits")
    spec.description.metadata.shortDescription = (
        f"pocketpeft: {ctx.arch.model_type} base, {ctx.quant.value} weights, LoRA tensors as inputs"
    )
    ml = ct.models.MLModel(spec, weights_dir=ml.weights_dir, skip_model_load=True)
    ml.user_defined_metadata["pocketpeft.reference.quant"] = ctx.quant.value
    ml.user_defined_metadata["pocketpeft.seq_len"] = str(ctx.seq_len)
    return ml, keys


def describe(package: "str | os.PathLike") -> dict[str, Any]:
    """Read an ``.mlpackage``'s spec without compiling it (works on Linux): ``inputs`` and
    ``outputs`` as ``{name: (shape, dtype)}``, ``ops`` (op type -> count in the main function),
    ``spec_version`` and ``metadata``. Raises :class:`CorruptFileError` if it cannot be read."""
    from pocketpeft._deps import require

    ct = require("coremltools", "coreml")
    from coremltools.proto import FeatureTypes_pb2

    try:
        spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    except Exception as e:  # coremltools raises plain Exceptions for unreadable packages
        raise CorruptFileError(f"Core ML package {package} cannot be read: {e}") from e
    dtype = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name

    def feats(fs):
        return {f.name: (list(f.type.multiArrayType.shape), dtype(f.type.multiArrayType.dataType)) for f in fs}

    ops: dict[str, int] = {}
    for block in spec.mlProgram.functions["main"].block_specializations.values():
        for op in block.operations:
            ops[op.type] = ops.get(op.type, 0) + 1
    return {
        "inputs": feats(spec.description.input),
        "outputs": feats(spec.description.output),
        "ops": ops,
        "spec_version": spec.specificationVersion,
        "metadata": dict(spec.description.metadata.userDefined),
    }


class CoreMLTarget:
    """Writes the ``coreml/`` folder; see the module docstring."""

    name = "coreml"

    def export(self, ctx: ExportContext) -> dict[str, str]:
        """Write ``model.mlpackage`` and ``signature.json`` under ``ctx.stage / "coreml"``; return
        the toolchain versions. Raises :class:`MissingDependencyError` without the ``coreml``
        extra and :class:`UnsupportedModelError` if a frozen weight cannot be compressed."""
        from pocketpeft._deps import require

        ct = require("coremltools", "coreml")
        out = ctx.stage / DIR
        out.mkdir(parents=True, exist_ok=True)
        ml, keys = convert(ctx)
        ml.save(str(ctx.stage / PACKAGE))
        shapes = lora_shapes(ctx.model)
        sig = {
            "format_version": 1,
            "package": Path(PACKAGE).name,
            "deployment_target": "iOS18 / macOS15",
            "compute_precision": "float16",
            "inputs": {
                "input_ids": {"shape": [1, ctx.seq_len], "dtype": "int32"},
                **{
                    coreml_name(k): {"peft_key": k, "shape": shapes[k.replace(".global.", ".")], "dtype": "float32"}
                    for k in keys
                },
            },
            "outputs": {"logits": {"shape": [1, ctx.seq_len, ctx.arch.vocab_size], "dtype": "float16"}},
            "sequence": "fixed length: right-pad input_ids, read logits at the last real position (causal)",
            "lora_scaling": ctx.lora.scaling,
            "weights": {"quant": ctx.quant.value, "storage": _STORAGE[ctx.quant.value]},
        }
        (ctx.stage / SIGNATURE).write_text(json.dumps(sig, indent=2) + "\n")
        return {"coremltools": ct.__version__}


TARGET = CoreMLTarget()
