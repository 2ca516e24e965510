"""The onnx, executorch and coreml targets for the families besides Llama (Qwen2's q/k/v biases,
Qwen3's q/k norms, Gemma 3's GeGLU, sandwich norms, embedding and query scales and sliding-window
layers), each bundle opened with its target's backend and checked against the torch backend.

Every bundle is a tiny random model of the family (``family_hf_dir``; the tiny Gemma has a
sliding window of 6 over layers [sliding, full, sliding]) exported once per module, q4_0, with a
random nonzero LoRA on every linear. Sequences are 16 tokens, longer than the window.

Checked per family: logits (with the bundle's random adapter and with a zero adapter, i.e. the
base), one training step's loss and gradient norm, and the losses and LoRA tensors after a few
AdamW steps; for split bundles (LoRA on the upper layers: frozen prefix + trainable suffix) the
prefix's output too. Tolerances as tests/runtime/test_split.py and
tests/runtime/test_executorch_backend.py: logits atol 1e-4, prefix atol 1e-5, one step's loss
rtol 1e-5 (gradient norm 1e-4), few-step losses rtol 1e-5, adapters atol 1e-4. Measured (both
backends, all families): logits <= 4e-6, prefix <= 3.5e-6, losses <= 4e-7 relative, gradient
norms <= 4e-7 relative, adapters <= 1.9e-5 (Gemma unsplit; Adam's first steps amplify rounding
where a gradient is near zero), <= 5e-6 elsewhere.

Core ML packages can't run off macOS: as in tests/export/test_coreml_target.py their spec and
stored weights are checked, plus what the families add (biases, tanh-GELU), and the stored
program is evaluated by a small numpy interpreter of its MIL ops (float16 results rounded as Core
ML stores them) against the torch backend, within float16 compute (measured <= 0.8% of the
largest logit; a dropped bias, a missing or non-sliding mask each put it over 100%).

ExecuTorch's programs take a minute or more per bundle to export on 2 cores (the split's XNNPACK
prefix longer): those tests are ``slow``.
"""

import json

import numpy as np
import pytest
import torch

import pocketpeft as pp
from pocketpeft.config import LINEAR_MODULES
from pocketpeft.formats.onnx import OnnxOptions
from pocketpeft.runtime import TrainConfig
from pocketpeft.text import pack_rows
from tests.conftest import FAMILIES
from tests.helpers import CHAT

FAMILY = [f for f in FAMILIES if f != "llama"]
SEQ, BATCH = 16, 4
CFG = TrainConfig(lr=1e-2, warmup_steps=1, total_steps=5, weight_decay=0.01, grad_clip=1.0)
STEPS = 4
LOGITS_ATOL, PREFIX_ATOL = 1e-4, 1e-5
LOSS_RTOL, NORM_RTOL, ADAPTER_ATOL = 1e-5, 1e-4, 1e-4
COREML_RTOL = 0.05  # Core ML's float16 compute: max logit error relative to the largest logit
TEXT = "hey are you coming to the game tonight? yeah i think so, what time does it start, ok see you"


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


needs_ort = pytest.mark.skipif(
    not _has("onnxruntime.training"), reason="needs onnxruntime-training (pip install 'pocketpeft[onnx]')"
)
needs_et = pytest.mark.skipif(
    not _has("executorch.extension.training"), reason="needs executorch (pip install 'pocketpeft[executorch]')"
)
needs_ct = pytest.mark.skipif(not _has("coremltools"), reason="needs coremltools (pip install 'pocketpeft[coreml]')")


def _lora(model_type: str, split: bool) -> pp.LoraConfig:
    """A random nonzero adapter on every linear; split: on the layers from 1 on (the tiny models
    have 2 layers, the tiny Gemma 3, so its suffix holds a full and a sliding layer)."""
    layers = dict(layers_to_transform=[1, 2] if model_type == "gemma3_text" else [1]) if split else {}
    return pp.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=list(LINEAR_MODULES), **layers)


@pytest.fixture(scope="module")
def bundles(family_hf_dir, tmp_path_factory):
    """``bundles(model_type, target, split=False)``: the family's bundle with the torch target and
    ``target``, exported once per module."""
    made = {}

    def get(model_type: str, target: str, split: bool = False):
        key = (model_type, target, split)
        if key not in made:
            name = f"{model_type}_{target}{'_split' if split else ''}"
            made[key] = pp.export(
                family_hf_dir(model_type),
                tmp_path_factory.mktemp(name) / "b",
                quant="q4_0",
                lora=_lora(model_type, split),
                targets=["torch", target],
                seq_len=SEQ,
                batch_size=BATCH,
                split=split,
            )
        return made[key]

    return get


def _ids(sess) -> np.ndarray:
    ids = np.asarray(sess.tokenizer.encode(TEXT), np.int64)[:SEQ]
    assert len(ids) == SEQ
    return ids


def _zeros(adapter: dict) -> dict:
    return {k: np.zeros_like(v) for k, v in adapter.items()}


def _check_logits(ref, others, ids) -> None:
    """Logits with the bundle's random adapter, then with a zero adapter (the base), then back."""
    init = ref.get_adapter_tensors()
    assert any(np.abs(v).max() > 0 for k, v in init.items() if "lora_B" in k), "the adapter should be nonzero"
    seen = []
    for adapter in (init, _zeros(init), init):
        for s in (ref, *others):
            s.set_adapter_tensors(adapter)
        seen.append(ref.logits(ids))
        for s in others:
            np.testing.assert_allclose(s.logits(ids), seen[-1], atol=LOGITS_ATOL, rtol=0, err_msg=s.backend.name)
    assert np.abs(seen[0] - seen[1]).max() > 100 * LOGITS_ATOL, "the adapter should change the logits"


def _check_training(bundle, ref, sess) -> None:
    """One step's loss and gradient norm on the same rows, then a few steps' losses and adapters."""
    inputs, labels = pack_rows(ref.tokenizer, CHAT, SEQ)
    a, b = (
        ref.backend.train_step(inputs[:BATCH], labels[:BATCH]),
        sess.backend.train_step(inputs[:BATCH], labels[:BATCH]),
    )
    assert b.tokens == a.tokens and not b.skipped
    assert b.loss == pytest.approx(a.loss, rel=LOSS_RTOL)
    assert b.grad_norm == pytest.approx(a.grad_norm, rel=NORM_RTOL)
    init = bundle.initial_adapter().tensors
    for s in (ref, sess):
        s.set_adapter_tensors(init)  # the optimizer restarts too
    ra, rb = ref.train(CHAT, steps=STEPS, seed=3), sess.train(CHAT, steps=STEPS, seed=3)
    assert not rb.skipped_steps and rb.tokens == ra.tokens
    np.testing.assert_allclose(rb.losses, ra.losses, rtol=LOSS_RTOL)
    got, want = sess.get_adapter_tensors(), ref.get_adapter_tensors()
    assert set(got) == set(want) == set(bundle.manifest.trainable)
    for k in want:
        assert not np.array_equal(want[k], init[k]), f"{k} did not train"
        np.testing.assert_allclose(got[k], want[k], atol=ADAPTER_ATOL, rtol=0, err_msg=k)


def _open(bundle, backend):
    return pp.runtime.open(bundle, backend=backend, train_config=CFG)


# ---------------------------------------------------------------------------------------- onnx
@needs_ort
@pytest.mark.parametrize("model_type", FAMILY)
def test_onnx_matches_torch(bundles, model_type):
    b = bundles(model_type, "onnx")
    ref, ort, infer = _open(b, "torch"), _open(b, "onnxruntime"), _open(b, "onnxruntime-infer")
    ids = _ids(ref)
    _check_logits(ref, (ort, infer), ids)
    # infer.onnx's in-graph loss: the summed cross-entropy, as the torch backend evaluates it
    # (the session wraps the inference-only backend for forward-only updates)
    inputs, labels = pack_rows(ref.tokenizer, CHAT, SEQ)
    want = ref.backend.eval_batch(inputs[:BATCH], labels[:BATCH])
    assert infer.backend.inner.loss_sum(inputs[:BATCH], labels[:BATCH]) == pytest.approx(want.loss_sum, rel=LOSS_RTOL)
    got = ort.backend.eval_batch(inputs[:BATCH], labels[:BATCH])
    assert (got.tokens, got.top1, got.top3) == (want.tokens, want.top1, want.top3)
    _check_training(b, ref, ort)


@needs_ort
@pytest.mark.parametrize("model_type", FAMILY)
def test_onnx_split_matches_torch(bundles, model_type):
    b = bundles(model_type, "onnx", split=True)
    assert b.manifest.split is not None and b.manifest.split.layer == 1
    assert "onnx/prefix.onnx" in b.manifest.targets["onnx"]["files"]
    ref, ort = _open(b, "torch"), _open(b, "onnxruntime")
    assert ort.backend.split_layer == 1
    ids = _ids(ref)
    x = np.stack([ids, ids[::-1]])
    np.testing.assert_allclose(ort.backend.prefix(x), ref.backend.prefix(x), atol=PREFIX_ATOL, rtol=0)
    _check_logits(ref, (ort, _open(b, "onnxruntime-infer")), ids)
    _check_training(b, ref, ort)
    eo, et = ort.eval(CHAT[:8]), ref.eval(CHAT[:8])
    assert (eo.tokens, eo.top1, eo.top3) == (et.tokens, et.top1, et.top3)
    assert eo.loss == pytest.approx(et.loss, rel=LOSS_RTOL)


@needs_ort
@pytest.mark.parametrize("quant, q4", [("nf4", "packed"), ("q4_0", "int8")])
def test_onnx_keeps_qwen2_biases_in_every_dequantization(family_hf_dir, tmp_path, quant, q4):
    """The onnx target dequantizes nf4 and int8-stored q4_0 weights its own way (and a split
    prefix another, covered above): Qwen2's q/k/v biases must be added on each path."""
    b = pp.export(
        family_hf_dir("qwen2"),
        tmp_path / "b",
        quant=quant,
        lora=_lora("qwen2", False),
        targets=["torch", "onnx"],
        seq_len=SEQ,
        batch_size=BATCH,
        onnx=OnnxOptions(q4=q4),
    )
    ref = _open(b, "torch")
    _check_logits(ref, (_open(b, "onnxruntime"), _open(b, "onnxruntime-infer")), _ids(ref))


# ----------------------------------------------------------------------------------- executorch
@needs_et
@pytest.mark.slow
@pytest.mark.parametrize("model_type", FAMILY)
def test_executorch_matches_torch(bundles, model_type):
    b = bundles(model_type, "executorch")
    ref, et = _open(b, "torch"), _open(b, "executorch")
    ids = _ids(ref)
    _check_logits(ref, (et,), ids)
    inputs, labels = pack_rows(ref.tokenizer, CHAT, SEQ)
    want, got = ref.backend.eval_batch(inputs[:6], labels[:6]), et.backend.eval_batch(inputs[:6], labels[:6])
    assert (got.tokens, got.top1, got.top3) == (want.tokens, want.top1, want.top3)
    assert got.loss_sum == pytest.approx(want.loss_sum, rel=LOSS_RTOL)
    _check_training(b, ref, et)


@needs_et
@pytest.mark.slow
@pytest.mark.parametrize("model_type", FAMILY)
def test_executorch_split_matches_torch(bundles, model_type):
    b = bundles(model_type, "executorch", split=True)
    sig = json.loads((b.root / "executorch/signature.json").read_text())
    # the prefix lowers to XNNPACK (a tanh-GELU stays on the portable kernels, see export_prefix)
    assert sig["split"]["prefix"]["kernels"] == "xnnpack", sig["split"]["prefix"]["xnnpack_failure"]
    ref, et = _open(b, "torch"), _open(b, "executorch")
    assert et.backend.split_layer == 1 and et.backend.prefix_kernels == "xnnpack"
    ids = _ids(ref)
    x = np.stack([ids, ids[::-1]])
    np.testing.assert_allclose(et.backend.prefix(x), ref.backend.prefix(x), atol=PREFIX_ATOL, rtol=0)
    _check_logits(ref, (et,), ids)
    _check_training(b, ref, et)


# --------------------------------------------------------------------------------------- coreml
def _stored_program(bundle):
    """The package's MIL program as coremltools reads it back (test_coreml_target's reader; imported
    here, not at module import: it needs coremltools)."""
    from tests.export.test_coreml_target import _stored_program as read

    return read(bundle)


_BINARY = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "real_div": np.divide,
    "pow": np.power,
    "greater_equal": np.greater_equal,
    "less": np.less,
    "logical_and": np.logical_and,
}


def _run_mil(main, feeds: dict) -> np.ndarray:
    """Evaluate a Core ML main function (the ops these packages use) in numpy: float32 arithmetic,
    every float16-typed result rounded to float16 as Core ML stores it. Core ML itself needs macOS;
    this stands in for it on Linux (an op it doesn't know fails the test, naming it)."""
    import math

    from coremltools.converters.mil.mil import types

    env = {var.name: np.asarray(feeds[name]) for name, var in main.inputs.items()}

    def val(op, key, default=None):
        var = op.inputs.get(key)
        if var is None:
            return default
        if isinstance(var, (list, tuple)):
            return [env[x.name] if x.name in env else x.val for x in var]
        return env[var.name] if var.name in env else var.val

    for op in main.operations:
        t, x = op.op_type, val(op, "x")
        if t == "const":
            out = op.outputs[0].val
        elif t == "constexpr_blockwise_shift_scale":
            data, scale, offset = (
                val(op, "data").astype(np.float32),
                val(op, "scale").astype(np.float32),
                val(op, "offset"),
            )
            offset = np.zeros_like(scale) if offset is None else offset.astype(np.float32)
            r0, r1 = (d // s for d, s in zip(data.shape, scale.shape))

            def rep(a, r0=r0, r1=r1):
                return np.repeat(np.repeat(a, r0, 0), r1, 1)

            out = rep(scale) * (data - rep(offset))
        elif t in _BINARY:
            out = _BINARY[t](x, val(op, "y"))
        elif t == "select":
            out = np.where(val(op, "cond"), val(op, "a"), val(op, "b"))
        elif t == "gather":
            assert val(op, "batch_dims") == 0
            out = np.take(x, val(op, "indices").astype(np.int64), axis=int(val(op, "axis")))
        elif t == "reduce_mean":
            out = x.mean(axis=tuple(val(op, "axes")), keepdims=bool(val(op, "keep_dims")))
        elif t == "rsqrt":
            out = 1.0 / np.sqrt(x + val(op, "epsilon", 1e-12))
        elif t == "cast":
            out = x.astype(
                {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "bool": bool}[str(val(op, "dtype"))]
            )
        elif t == "matmul":
            y = val(op, "y")
            x = np.swapaxes(x, -1, -2) if val(op, "transpose_x") else x
            y = np.swapaxes(y, -1, -2) if val(op, "transpose_y") else y
            out = np.matmul(x.astype(np.float32), y.astype(np.float32))
        elif t == "linear":
            w, b = val(op, "weight").astype(np.float32), val(op, "bias")
            out = x.astype(np.float32) @ w.T + (0 if b is None else b.astype(np.float32))
        elif t == "reshape":
            out = x.reshape(val(op, "shape"))
        elif t == "transpose":
            out = np.transpose(x, val(op, "perm"))
        elif t == "slice_by_index":
            n = x.ndim
            begin, end, stride = val(op, "begin"), val(op, "end"), val(op, "stride", [1] * n)
            bm, em, sq = (val(op, k, [False] * n) for k in ("begin_mask", "end_mask", "squeeze_mask"))
            out = x[tuple(slice(None if bm[i] else begin[i], None if em[i] else end[i], stride[i]) for i in range(n))]
            out = out.squeeze(tuple(i for i in range(n) if sq[i])) if any(sq) else out
        elif t == "concat":
            out = np.concatenate(val(op, "values"), axis=int(val(op, "axis")))
        elif t == "expand_dims":
            out = np.expand_dims(x, tuple(val(op, "axes")))
        elif t == "tile":
            out = np.tile(x, val(op, "reps"))
        elif t == "silu":
            out = x / (1 + np.exp(-x.astype(np.float32)))
        elif t == "gelu":
            x = x.astype(np.float32)
            if val(op, "mode") == "TANH_APPROXIMATION":
                out = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
            else:
                out = 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
        elif t == "scaled_dot_product_attention":
            q, k, v, mask = (val(op, n) for n in ("query", "key", "value", "attn_mask"))
            s = q.astype(np.float32) @ np.swapaxes(k.astype(np.float32), -1, -2) / math.sqrt(q.shape[-1])
            if mask is not None:
                s = np.where(mask, s, -np.inf) if mask.dtype == bool else s + mask
            p = np.exp(s - s.max(-1, keepdims=True))
            out = p / p.sum(-1, keepdims=True) @ v.astype(np.float32)
        else:
            raise NotImplementedError(f"the test's MIL evaluator has no {t!r}")
        dtype = op.outputs[0].dtype
        out = np.asarray(out)
        env[op.outputs[0].name] = out.astype(np.float16) if dtype == types.fp16 else out
    return env[main.outputs[0].name]


@needs_ct
@pytest.mark.parametrize("model_type", FAMILY)
def test_coreml_package(bundles, model_type):
    from collections import Counter

    from safetensors.numpy import load_file

    from pocketpeft.export.coreml_target import PACKAGE, coreml_name, describe
    from pocketpeft.reference.quant import dequantize

    b = bundles(model_type, "coreml")
    b.verify("coreml")
    m = b.manifest
    n_linear = m.arch.num_hidden_layers * len(LINEAR_MODULES)
    d = describe(b.root / PACKAGE)
    expected = {"input_ids": ([1, SEQ], "INT32")}
    expected.update({coreml_name(k): (list(s), "FLOAT32") for k, s in m.trainable.items()})
    assert d["inputs"] == expected and len(m.trainable) == 2 * n_linear
    assert d["outputs"] == {"logits": ([1, SEQ, m.arch.vocab_size], "FLOAT16")}
    assert d["ops"].get("constexpr_blockwise_shift_scale") == n_linear
    main = _stored_program(b).functions["main"]
    for name, var in main.inputs.items():
        assert var.child_ops, f"input {name} is not used by the graph"
    ops = list(main.operations)
    linears = [op for op in ops if op.op_type == "linear"]
    producers = Counter(op.inputs["weight"].op.op_type for op in linears)
    assert producers == Counter({"constexpr_blockwise_shift_scale": n_linear, "const": 1})  # + the tied head
    # every frozen weight is the bundle's, byte for byte (same nibbles, same fp16 scales)
    bufs = load_file(str(b.path_of("torch/model.safetensors")))
    by_weight = {op.inputs["weight"].op.name.replace("_base_layer", ""): op for op in linears}
    for layer in range(m.arch.num_hidden_layers):
        for mod in LINEAR_MODULES:
            part = "self_attn" if mod in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            hf = f"model.layers.{layer}.{part}.{mod}"
            lin = by_weight[coreml_name(hf) + "_weight"]
            w = lin.inputs["weight"].op
            data = w.inputs["data"].val.astype(np.float32)
            scale = np.repeat(w.inputs["scale"].val.astype(np.float32), 32, axis=1)
            offset = np.repeat(w.inputs["offset"].val.astype(np.float32), 32, axis=1)
            ours = {k.rsplit(".", 1)[1]: v for k, v in bufs.items() if k.rsplit(".", 1)[0] == hf}
            want = dequantize(
                {k: torch.from_numpy(v) for k, v in ours.items() if k != "bias"}, "q4_0", data.shape
            ).numpy()
            np.testing.assert_array_equal(scale * (data - offset), want, err_msg=hf)
            # Qwen2's q/k/v biases reach the linear (float16 in Core ML); nothing else has one
            bias = lin.inputs.get("bias")
            if "bias" in ours:
                assert bias is not None and bias.val is not None, f"{hf}: bias dropped"
                np.testing.assert_allclose(bias.val.astype(np.float32), ours["bias"], rtol=2**-10, atol=1e-7)
            else:
                assert bias is None or bias.val is None or not np.any(bias.val), f"{hf}: unexpected bias"
    # the MLP's activation: Gemma's tanh-GELU (not the erf form), SiLU elsewhere
    gelus = [op for op in ops if op.op_type == "gelu"]
    if model_type == "gemma3_text":
        assert len(gelus) == m.arch.num_hidden_layers
        assert all(op.inputs["mode"].val == "TANH_APPROXIMATION" for op in gelus)
    else:
        assert not gelus and d["ops"].get("silu") == m.arch.num_hidden_layers
    # what the package computes (evaluated here, see _run_mil) against the torch backend, with the
    # bundle's adapter and with a zero one: within float16 compute, as on macOS
    ref = pp.runtime.open(b, backend="torch")
    ids, init = _ids(ref), b.initial_adapter().tensors
    for adapter in (init, _zeros(init)):
        ref.set_adapter_tensors(adapter)
        want = ref.logits(ids)
        feeds = {"input_ids": ids[None].astype(np.int32), **{coreml_name(k): v for k, v in adapter.items()}}
        got = _run_mil(main, feeds)[0].astype(np.float32)
        assert np.abs(got - want).max() < COREML_RTOL * np.abs(want).max()
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
