"""The coreml target: the .mlpackage's spec (inputs by PEFT key, logits output, quantized weight
ops), and the weights Core ML stores, read back with coremltools' own MIL loader and dequantized
here in numpy, against the bundle's buffers dequantized by pocketpeft.reference.quant. Running the
package needs macOS; that test skips elsewhere."""

import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

import pocketpeft as pp
from pocketpeft.config import LINEAR_MODULES
from pocketpeft.manifest import Bundle
from pocketpeft.reference.quant import dequantize

ct = pytest.importorskip("coremltools")

from coremltools.converters.mil.mil.types import builtin_to_string  # noqa: E402

from pocketpeft.export.coreml_target import PACKAGE, QUANT_OPS, SIGNATURE, coreml_name, describe  # noqa: E402

LORA = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
SEQ = 16
N_LINEAR = 2 * len(LINEAR_MODULES)  # the tiny model: 2 layers x 7 frozen linears


def _export(src, out, quant):
    return pp.export(
        src, out, quant=quant, lora=pp.LoraConfig(**LORA), targets=["torch", "coreml"], seq_len=SEQ, batch_size=2
    )


@pytest.fixture(scope="module")
def bundles(tiny_hf_dir, tmp_path_factory):
    cache = {}

    def get(quant):
        if quant not in cache:
            cache[quant] = _export(tiny_hf_dir, tmp_path_factory.mktemp(f"coreml_{quant}") / "b", quant)
        return cache[quant]

    return get


def _stored_program(bundle):
    """The package's MIL program as coremltools reads it back from the spec and weight blobs."""
    from coremltools.converters.mil.frontend.milproto.load import load

    path = bundle.root / PACKAGE
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    return load(
        spec,
        specification_version=spec.specificationVersion,
        file_weights_dir=str(path / "Data" / "com.apple.CoreML" / "weights"),
    )


def _bundle_weights(bundle):
    from safetensors.torch import load_file

    return load_file(str(bundle.path_of("torch/model.safetensors")))


def _dense(op) -> np.ndarray:
    """Dequantize a stored constexpr weight in float32 numpy, from its op's definition:
    ``scale * (data - offset)`` blockwise, ``lut[index]`` for a palettized input."""

    def val(name):
        v = op.inputs.get(name)
        return None if v is None else v.val

    if op.op_type == "constexpr_lut_to_dense":
        idx, lut = val("indices").astype(np.int64), val("lut").astype(np.float32)
        assert lut.shape[:2] == (1, 1) and lut.shape[-1] == 1, "one shared scalar LUT expected"
        return lut[0, 0, :, 0][idx]
    assert op.op_type == "constexpr_blockwise_shift_scale", op.op_type
    data = op.inputs["data"]
    data = _dense(data.op) if data.val is None else data.val.astype(np.float32)
    scale = val("scale").astype(np.float32)
    offset = val("offset")
    offset = np.zeros_like(scale) if offset is None else offset.astype(np.float32)
    reps = [d // s for d, s in zip(data.shape, scale.shape)]
    return np.repeat(np.repeat(scale, reps[0], 0), reps[1], 1) * (
        data - np.repeat(np.repeat(offset, reps[0], 0), reps[1], 1)
    )


def test_package_spec_inputs_outputs_and_quantized_ops(bundles):
    b = bundles("q4_0")
    b.verify("coreml")
    m = b.manifest
    assert PACKAGE + "/Manifest.json" in m.targets["coreml"]["files"]
    assert any(f.startswith(PACKAGE + "/Data/") and f.endswith("weight.bin") for f in m.targets["coreml"]["files"])
    assert m.versions["coremltools"] == ct.__version__
    d = describe(b.root / PACKAGE)
    expected = {"input_ids": ([1, SEQ], "INT32")}
    expected.update({coreml_name(k): (shape, "FLOAT32") for k, shape in m.trainable.items()})
    assert d["inputs"] == expected and len(m.trainable) == 8
    assert d["outputs"] == {"logits": ([1, SEQ, m.arch.vocab_size], "FLOAT16")}
    assert d["ops"].get("constexpr_blockwise_shift_scale") == N_LINEAR
    assert d["metadata"]["pocketpeft.reference.quant"] == "q4_0" and d["spec_version"] >= 9  # iOS 18
    sig = json.loads(b.path_of(SIGNATURE).read_text())
    assert {v["peft_key"] for n, v in sig["inputs"].items() if n != "input_ids"} == set(m.trainable)
    assert all(coreml_name(v["peft_key"]) == n for n, v in sig["inputs"].items() if n != "input_ids")


def test_lora_inputs_feed_the_graph_and_no_float_linear_weights_remain(bundles):
    prog = _stored_program(bundles("q4_0"))
    main = prog.functions["main"]
    for name, var in main.inputs.items():
        assert var.child_ops, f"input {name} is not used by the graph"
    linears = [op for op in main.operations if op.op_type == "linear"]
    producers = Counter(op.inputs["weight"].op.op_type for op in linears)
    # every frozen linear reads a compressed weight; the one float linear is the tied output head
    assert producers == Counter({"constexpr_blockwise_shift_scale": N_LINEAR, "const": 1})
    head = next(op for op in linears if op.inputs["weight"].op.op_type == "const")
    assert head.inputs["weight"].shape == (bundles("q4_0").manifest.arch.vocab_size, 64)


@pytest.mark.parametrize("quant", ["q4_0", "nf4", pytest.param("q8_0", marks=pytest.mark.slow)])
def test_stored_weights_are_the_bundles_quantized_weights(bundles, quant):
    b = bundles(quant)
    bufs = _bundle_weights(b)
    prog = _stored_program(b)
    ops = {op.name: op for op in prog.functions["main"].operations if op.op_type in QUANT_OPS}
    checked = 0
    for layer in range(2):
        for mod in LINEAR_MODULES:
            part = "self_attn" if mod.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            hf = f"model.layers.{layer}.{part}.{mod}"
            ours = {k.rsplit(".", 1)[1]: v for k, v in bufs.items() if k.rsplit(".", 1)[0] == hf}
            shape = (ours["qweight"].shape[0], 128 if mod == "down_proj" else 64)
            want = dequantize(ours, quant, shape).numpy()
            op = next(
                o
                for n, o in ops.items()
                if n.startswith(coreml_name(hf)) and o.op_type == "constexpr_blockwise_shift_scale"
            )
            got = _dense(op)
            assert got.shape == want.shape
            if quant == "nf4":  # code values and absmax are float16 in Core ML
                np.testing.assert_allclose(got, want, rtol=2**-10, atol=0)
                assert op.inputs["data"].op.op_type == "constexpr_lut_to_dense"
            else:  # same integers, same fp16 scales: exact in float32
                np.testing.assert_array_equal(got, want)
                bits = "uint4" if quant == "q4_0" else "int8"
                assert builtin_to_string(op.inputs["data"].dtype) == bits
            checked += 1
    assert checked == N_LINEAR


@pytest.mark.slow
def test_f16_bundle_has_float_weights(tiny_hf_dir, tmp_path):
    d = describe(_export(tiny_hf_dir, tmp_path / "b", "f16").root / PACKAGE)
    assert not set(d["ops"]) & set(QUANT_OPS) and d["metadata"]["pocketpeft.reference.quant"] == "f16"


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction needs macOS")
def test_prediction_matches_torch_backend(bundles):
    b = bundles("q4_0")
    sess = pp.runtime.open(b.root, backend="torch")
    ids = np.asarray(sess.tokenizer.encode("see you at the game tonight"), np.int64)[:SEQ]
    want = sess.logits(ids)
    lora = {coreml_name(k): v for k, v in b.initial_adapter().tensors.items()}
    ml = ct.models.MLModel(str(b.root / PACKAGE))
    padded = np.zeros((1, SEQ), np.int32)
    padded[0, : len(ids)] = ids
    got = ml.predict({"input_ids": padded, **lora})["logits"][0, : len(ids)].astype(np.float32)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()  # float16 compute
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


@pytest.mark.slow
def test_cli_exports_smollm2_to_gguf_and_coreml(smollm2_path, tmp_path):
    out = tmp_path / "B"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pocketpeft",
            "export",
            "smollm2",
            "--targets",
            "gguf,coreml",
            "--out",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=3000,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    obj = json.loads(r.stdout)
    assert sorted(obj["targets"]) == ["coreml", "gguf", "torch"]
    b = Bundle(out)
    b.verify("coreml")
    d = describe(b.root / PACKAGE)
    assert d["ops"]["constexpr_blockwise_shift_scale"] == 30 * 7
    assert set(d["inputs"]) == {"input_ids"} | {coreml_name(k) for k in b.manifest.trainable}
    assert d["outputs"]["logits"][0] == [1, 64, 49152]


def test_global_slot_is_inputs_that_feed_the_graph(tiny_hf_dir, tmp_path):
    """Exported with a global slot (two-level adapters), the package takes the global adapter's
    tensors as inputs next to the LoRA's (an app feeds its installed global adapter), each used."""
    b = pp.export(
        tiny_hf_dir,
        tmp_path / "b",
        quant="q4_0",
        lora=pp.LoraConfig(**LORA),
        targets=["torch", "coreml"],
        seq_len=SEQ,
        batch_size=2,
        global_slot=True,
    )
    m = b.manifest
    assert m.global_slot
    d = describe(b.root / PACKAGE)
    glob = {
        k.replace(".lora_A.", ".lora_A.global.").replace(".lora_B.", ".lora_B.global."): s
        for k, s in m.trainable.items()
    }
    expected = {"input_ids": ([1, SEQ], "INT32")}
    expected.update({coreml_name(k): (shape, "FLOAT32") for k, shape in {**m.trainable, **glob}.items()})
    assert d["inputs"] == expected
    sig = json.loads(b.path_of(SIGNATURE).read_text())
    assert {v["peft_key"] for n, v in sig["inputs"].items() if n != "input_ids"} == set(m.trainable) | set(glob)
    main = _stored_program(b).functions["main"]
    for name, var in main.inputs.items():
        assert var.child_ops, f"input {name} is not used by the graph"
