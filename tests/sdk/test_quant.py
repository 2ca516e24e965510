"""pocketpeft.reference.quant against the real references: gguf.quants (q8_0, q4_0) and bitsandbytes' CPU nf4."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pocketpeft.config import QuantFormat
from pocketpeft.errors import QuantizationError
from pocketpeft.reference.quant import (
    BLOCK,
    NF4_CODE,
    QuantLinear,
    dequantize,
    from_bnb,
    from_gguf_blocks,
    quantize,
    storage_bytes,
    to_bnb,
    to_gguf_blocks,
)

gguf = pytest.importorskip("gguf")
GT = gguf.GGMLQuantizationType
GGUF_TYPE = {"q8_0": GT.Q8_0, "q4_0": GT.Q4_0}
ALL = [f.value for f in QuantFormat]
SHAPES = [(576, 576), (192, 576), (1536, 576), (3, 64)]


def _bnb():
    return pytest.importorskip("bitsandbytes.functional")


def _edge_weight() -> torch.Tensor:
    """Rows of 64 (two gguf blocks / one nf4 block) hitting the rounding corner cases."""
    g = torch.Generator().manual_seed(1)
    rows = [torch.zeros(64)]  # all-zero blocks
    r = torch.zeros(64)
    r[:32] = torch.randn(32, generator=g)
    rows.append(r)  # one zero block, one not
    r = torch.full((64,), 0.5)
    r[0] = 127.0
    r[32] = 127.0  # q8_0: d = 1, exact .5 ties
    r[1:8] = torch.tensor([1.5, -2.5, 2.5, -0.5, 126.5, -126.5, 0.49999997])
    rows.append(r)
    r = torch.randn(64, generator=g)
    r[3], r[9] = -4.0, 4.0
    r[35], r[40] = 4.0, -4.0  # q4_0: |max| ties, both signs
    rows.append(r)
    r = torch.arange(64, dtype=torch.float32) / 4 - 8
    r[0] = -8.0
    rows.append(r)  # q4_0: x*id + 8.5 on integers
    r = torch.zeros(64)
    r[0] = 1.0
    r[1:16] = (NF4_CODE[:-1] + NF4_CODE[1:])[:15] / 2  # nf4: values on midpoints
    r[16:31] = -r[1:16]
    rows.append(r)
    rows.append(torch.randn(64, generator=g) * 1e5)  # huge (fp16 scale still finite)
    rows.append(torch.randn(64, generator=g) * 1e-6)  # tiny (fp16 scale subnormal)
    rows.append(torch.randn(64, generator=g) * 1e-30)  # fp16 scale underflows to 0
    r = torch.full((64,), -3.0)
    r[5] = 3.0
    rows.append(r)  # constant magnitude
    return torch.stack(rows)


WEIGHTS = [pytest.param(s, id="x".join(map(str, s))) for s in SHAPES] + [pytest.param(None, id="edge")]


def _weight(shape) -> torch.Tensor:
    if shape is None:
        return _edge_weight()
    return torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 0.05


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
@pytest.mark.parametrize("shape", WEIGHTS)
def test_gguf_byte_identical(shape, fmt):
    w = _weight(shape)
    bufs = quantize(w, fmt)
    ours = to_gguf_blocks(bufs, fmt)
    ref = gguf.quants.quantize(w.numpy(), GGUF_TYPE[fmt])
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    assert ours.tobytes() == ref.tobytes()
    deq = dequantize(bufs, fmt, tuple(w.shape))
    np.testing.assert_array_equal(deq.numpy(), gguf.quants.dequantize(ref, GGUF_TYPE[fmt]))
    back = from_gguf_blocks(ref, fmt, tuple(w.shape))
    assert all(torch.equal(back[k], bufs[k]) and back[k].dtype == bufs[k].dtype for k in bufs)
    assert to_gguf_blocks(back, fmt).tobytes() == ref.tobytes()


@pytest.mark.parametrize("shape", WEIGHTS)
def test_nf4_byte_identical_to_bitsandbytes(shape):
    bnbf = _bnb()
    w = _weight(shape)
    bufs = quantize(w, "nf4")
    ref_packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    packed, absmax = to_bnb(bufs)
    assert packed.dtype == ref_packed.dtype and packed.shape == ref_packed.shape
    assert torch.equal(packed, ref_packed)
    assert absmax.dtype == state.absmax.dtype == torch.float32 and torch.equal(absmax, state.absmax)
    assert torch.equal(dequantize(bufs, "nf4", tuple(w.shape)), bnbf.dequantize_4bit(ref_packed, state))
    back = from_bnb(ref_packed, state.absmax, tuple(w.shape))
    assert all(torch.equal(back[k], bufs[k]) for k in bufs)
    assert all(torch.equal(a, b) for a, b in zip(to_bnb(back), (ref_packed, state.absmax)))


def test_nf4_code_is_bitsandbytes_table():
    bnbf = _bnb()
    assert NF4_CODE.dtype == torch.float32
    assert torch.equal(NF4_CODE, bnbf.get_4bit_type("nf4", device="cpu").float())


def test_layouts_and_storage():
    w = _weight((64, 128))
    expect = {
        "f32": {"weight": ((64, 128), torch.float32)},
        "f16": {"weight": ((64, 128), torch.float16)},
        "q8_0": {"qweight": ((64, 128), torch.int8), "scales": ((64, 4), torch.float16)},
        "q4_0": {"qweight": ((64, 64), torch.uint8), "scales": ((64, 4), torch.float16)},
        "nf4": {"qweight": ((64, 64), torch.uint8), "absmax": ((128,), torch.float32)},
    }
    for fmt, spec in expect.items():
        bufs = quantize(w, fmt)
        assert {k: (tuple(v.shape), v.dtype) for k, v in bufs.items()} == spec
        assert storage_bytes(fmt, (64, 128)) == sum(v.numel() * v.element_size() for v in bufs.values())
    assert torch.equal(dequantize(quantize(w, "f32"), "f32", (64, 128)), w)
    assert torch.equal(dequantize(quantize(w, "f16"), "f16", (64, 128)), w.half().float())
    assert BLOCK == {QuantFormat.Q8_0: 32, QuantFormat.Q4_0: 32, QuantFormat.NF4: 64}
    # q4_0 nibble order: byte j of a block = element j (low) | element j+16 (high)
    q = quantize(torch.tensor([[-8.0] + [0.0] * 15 + [7.0] + [0.0] * 15]), "q4_0")["qweight"]
    assert q[0, 0].item() == (0 | (15 << 4)) and q[0, 1].item() == (8 | (8 << 4))


def test_dtypes_of_input_and_output():
    w = _weight((32, 64))
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        for fmt in ALL:
            ref = quantize(w.to(dt).float(), fmt)
            assert all(torch.equal(a, b) for a, b in zip(quantize(w.to(dt), fmt).values(), ref.values()))
    for fmt in ALL:
        out = dequantize(quantize(w, fmt), fmt, (32, 64), dtype=torch.bfloat16)
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, dequantize(quantize(w, fmt), fmt, (32, 64)).bfloat16())


@pytest.mark.parametrize("fmt", ALL)
def test_quant_linear(fmt):
    w = _weight((48, 128))
    mod = QuantLinear.from_float(w, fmt)
    assert list(mod.parameters()) == []
    assert (mod.in_features, mod.out_features, mod.fmt) == (128, 48, QuantFormat(fmt))
    assert set(mod.state_dict()) == set(quantize(w, fmt)) and f"fmt={fmt}" in repr(mod)
    x = torch.randn(2, 5, 128, requires_grad=True)
    y = mod(x)
    wd = mod.dequantized_weight()
    assert torch.equal(y, F.linear(x, wd))
    y.sum().backward()
    assert x.grad is not None and torch.allclose(x.grad, wd.sum(0).expand(2, 5, 128))
    assert all(not b.requires_grad for b in mod.buffers())
    fresh = QuantLinear(128, 48, fmt)
    assert all(int(torch.count_nonzero(b)) == 0 for b in fresh.buffers())
    fresh.load_state_dict(mod.state_dict())
    assert torch.equal(fresh(x), y)
    assert mod(x.detach().bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", ALL)
def test_quant_linear_exports(fmt):
    mod = QuantLinear.from_float(_weight((32, 128)), fmt).eval()
    x = torch.randn(3, 128)
    ep = torch.export.export(mod, (x,))
    assert torch.equal(ep.module()(x), mod(x))
    targets = " ".join(str(n.target) for n in ep.run_decompositions().graph.nodes if n.op == "call_function")
    assert "shift" not in targets
    if fmt in ("q4_0", "nf4"):
        assert "bitwise_and" in targets


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(64), r"2-D"),
        (torch.zeros(2, 2, 64), r"2-D"),
        (torch.zeros(4, 48), r"multiple of the q8_0 block size 32"),
        (torch.zeros(4, 64, dtype=torch.int32), r"floating-point"),
        (torch.full((4, 64), float("nan")), r"NaN"),
        (torch.full((4, 64), float("inf")), r"NaN or inf"),
        (torch.full((4, 64), 1e7), r"overflows float16"),
    ],
)
def test_quantize_errors(bad, match):
    with pytest.raises(QuantizationError, match=match) as ei:
        quantize(bad, "q8_0", name="layers.0.q_proj")
    assert isinstance(ei.value, ValueError) and "layers.0.q_proj" in str(ei.value)


def test_other_errors():
    with pytest.raises(QuantizationError, match="unknown quant format 'q5_k'"):
        quantize(torch.zeros(4, 64), "q5_k")
    with pytest.raises(QuantizationError, match="block size 64"):
        quantize(torch.zeros(4, 32), "nf4")
    with pytest.raises(QuantizationError, match="float16"):
        quantize(torch.full((2, 2), 1e5), "f16")
    with pytest.raises(QuantizationError, match="multiple"):
        QuantLinear(33, 4, "q4_0")
    with pytest.raises(QuantizationError, match="only for q8_0 and q4_0"):
        to_gguf_blocks(quantize(torch.zeros(4, 64), "nf4"), "nf4")
    with pytest.raises(QuantizationError, match="expected 136 bytes"):
        from_gguf_blocks(np.zeros(10, np.uint8), "q8_0", (4, 32))
    with pytest.raises(QuantizationError, match="packed bytes"):
        from_bnb(torch.zeros(10, 1, dtype=torch.uint8), torch.zeros(2), (4, 64))
    with pytest.raises(QuantizationError, match="lack 'scales'"):
        dequantize({"qweight": torch.zeros(4, 32, dtype=torch.int8)}, "q8_0", (4, 32))
    assert quantize(torch.zeros(4, 48), "f16")["weight"].shape == (4, 48)  # no block constraint


@pytest.mark.parametrize("fmt", ["q4_0", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pair_table_dequantize_is_bit_identical(fmt, dtype):
    """The GPU's eager path (a 256-entry byte table) gives exactly the exportable path's values."""
    from pocketpeft.reference.quant import dequantize_lut

    torch.manual_seed(1)
    w = torch.randn(48, 256) * torch.logspace(-3, 1, 48)[:, None]
    bufs = quantize(w, fmt)
    want = dequantize(bufs, fmt, tuple(w.shape), dtype)
    assert torch.equal(dequantize_lut(bufs, QuantFormat.parse(fmt), tuple(w.shape), dtype), want)
    assert not torch.equal(want, dequantize(quantize(w.flip(0), fmt), fmt, tuple(w.shape), dtype))
