"""Block quantization of frozen linear weights: f32, f16, GGUF's q8_0 / q4_0 and bitsandbytes' nf4.

Quantization is our own vectorized torch code whose arithmetic replicates ``gguf.quants`` and
bitsandbytes' CPU ``quantize_4bit`` bit for bit, so the buffers convert losslessly to and from
those libraries' layouts. Dequantization uses only core ATen ops (no right shift, no loops,
no data-dependent control flow) so it exports with torch.export / ExecuTorch / ONNX.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from pocketpeft.config import QuantFormat
from pocketpeft.errors import ConfigError, QuantizationError

__all__ = [
    "BLOCK",
    "NF4_CODE",
    "QuantLinear",
    "dequantize",
    "dequantize_lut",
    "from_bnb",
    "from_gguf_blocks",
    "quantize",
    "storage_bytes",
    "to_bnb",
    "to_gguf_blocks",
]

#: Elements per block (along in_features) of each block format.
BLOCK = {QuantFormat.Q8_0: 32, QuantFormat.Q4_0: 32, QuantFormat.NF4: 64}

#: The 16 NF4 values, exactly bitsandbytes' ``get_4bit_type("nf4")`` table (float32, sorted).
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
# bitsandbytes buckets by the float32 midpoints between neighbouring code values.
_NF4_BOUNDS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
_GGUF_BLOCK_BYTES = {QuantFormat.Q8_0: 34, QuantFormat.Q4_0: 18}
_F16_MAX = 65504.0


def _fmt(fmt: QuantFormat | str) -> QuantFormat:
    try:
        return QuantFormat.parse(fmt)
    except ConfigError as e:
        raise QuantizationError(str(e)) from None


def _check_shape(shape, fmt: QuantFormat, name: str = "weight") -> tuple[int, int]:
    if len(shape) != 2 or any(int(s) <= 0 for s in shape):
        raise QuantizationError(f"{name}: expected a 2-D [out, in] shape with positive sizes, got {tuple(shape)}")
    out, inf = int(shape[0]), int(shape[1])
    blk = BLOCK.get(fmt)
    if blk and inf % blk:
        raise QuantizationError(
            f"{name} {tuple(shape)}: in_features={inf} is not a multiple of the {fmt.value} block size {blk}"
        )
    return out, inf


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    # gguf's np_roundf; floor(|x| + 0.5) would be wrong for 0.49999997 (the sum rounds up).
    a = x.abs()
    fl = a.floor()
    return x.sign() * (fl + (2 * (a - fl)).floor())


def quantize(weight: torch.Tensor, fmt: QuantFormat | str, *, name: str = "weight") -> dict[str, torch.Tensor]:
    """Quantize a 2-D float weight ``[out, in]`` into the named frozen buffers of ``fmt``.

    Returns ``{"weight"}`` for f32/f16; ``{"qweight", "scales"}`` for q8_0 (int8 [out,in], fp16
    [out,in/32]) and q4_0 (uint8 [out,in/2] with GGUF's nibble order, fp16 [out,in/32]);
    ``{"qweight", "absmax"}`` for nf4 (bitsandbytes' packing, uint8 [out,in/2], float32 [out*in/64]).
    Math is float32 whatever the input dtype. ``name`` only labels error messages.
    Raises QuantizationError for an unknown format, a non-tensor / non-float / non-2-D weight,
    in_features not a multiple of the block, non-finite values, or values beyond float16's range
    where the format stores float16.
    """
    fmt = _fmt(fmt)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise QuantizationError(f"{name}: expected a floating-point torch.Tensor, got {got}")
    if weight.dim() != 2:
        raise QuantizationError(f"{name}: expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    out, inf = _check_shape(weight.shape, fmt, name)
    w = weight.detach().to(torch.float32).contiguous()
    if not bool(torch.isfinite(w).all()):
        raise QuantizationError(f"{name} {tuple(weight.shape)}: contains NaN or inf; expected finite values")
    if fmt is QuantFormat.F32:
        return {"weight": w.clone()}
    if fmt is QuantFormat.F16:
        if float(w.abs().max()) > _F16_MAX:
            raise QuantizationError(f"{name} {tuple(weight.shape)}: |value| exceeds float16's max {_F16_MAX}")
        return {"weight": w.to(torch.float16)}
    if fmt is QuantFormat.NF4:
        return _quantize_nf4(w)
    blocks = w.view(out, inf // 32, 32)
    if fmt is QuantFormat.Q8_0:  # gguf Q8_0.quantize_blocks
        d = blocks.abs().amax(-1, keepdim=True) / 127
        q = _round_half_away(blocks * torch.where(d == 0, 0.0, 1 / d)).to(torch.int8)
        qweight = q.view(out, inf)
    else:  # gguf Q4_0.quantize_blocks: d comes from the signed value of max |x| (first on ties)
        imax = blocks.abs().argmax(-1, keepdim=True)
        d = torch.gather(blocks, -1, imax) / -8
        q = torch.trunc(blocks * torch.where(d == 0, 0.0, 1 / d) + 8.5).clamp(0, 15).to(torch.uint8)
        qweight = (q[..., :16] + q[..., 16:] * 16).view(out, inf // 2)
    scales = d.squeeze(-1).to(torch.float16)
    if not bool(torch.isfinite(scales).all()):
        raise QuantizationError(
            f"{name} {tuple(weight.shape)}: a block scale overflows float16 (max |value| {float(w.abs().max()):g})"
        )
    return {"qweight": qweight, "scales": scales}


def _quantize_nf4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    # bitsandbytes' CPU quantize_4bit (backends/default/ops.py): it multiplies by 1/absmax,
    # clamps to [-1, 1], and bucketize sends a value equal to a midpoint to the LOWER code.
    out, inf = w.shape
    blocks = w.view(-1, 64)
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1)
    q = torch.bucketize(scaled.reshape(-1), _NF4_BOUNDS.to(w.device), out_int32=True).to(torch.uint8)
    return {"qweight": (q[::2] * 16 + q[1::2]).view(out, inf // 2), "absmax": absmax}


def _nibbles(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) nibbles of a uint8 tensor as int32, via & and floor-divide (no right shift)."""
    q = packed.to(torch.int32)
    return q & 15, torch.div(q, 16, rounding_mode="floor")


def dequantize(
    buffers: dict[str, torch.Tensor], fmt: QuantFormat | str, shape: tuple[int, int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Rebuild the ``[out, in]`` weight of ``shape`` from ``quantize``'s buffers, as ``dtype``.

    Values are computed in float32 exactly as ggml (``d * (q - 8)``, ``d * q``) and bitsandbytes
    (``code[q] * absmax``) do, then cast. Uses only core ATen ops, so it traces with torch.export.
    Raises QuantizationError for an unknown format, a bad shape or missing buffers.
    """
    fmt = _fmt(fmt)
    out, inf = _check_shape(shape, fmt)
    try:
        if fmt in (QuantFormat.F32, QuantFormat.F16):
            return buffers["weight"].reshape(out, inf).to(dtype)
        qw = buffers["qweight"]
        if fmt is QuantFormat.Q8_0:
            q = qw.reshape(out, inf // 32, 32).to(torch.float32)
            w = q * buffers["scales"].reshape(out, inf // 32, 1).to(torch.float32)
        elif fmt is QuantFormat.Q4_0:
            lo, hi = _nibbles(qw.reshape(out, inf // 32, 16))
            q = torch.cat([lo, hi], dim=-1).to(torch.float32) - 8
            w = buffers["scales"].reshape(out, inf // 32, 1).to(torch.float32) * q
        else:
            lo, hi = _nibbles(qw.reshape(out, inf // 2))
            idx = torch.stack([hi, lo], dim=-1).reshape(-1, 64)
            w = NF4_CODE.to(qw.device)[idx] * buffers["absmax"].reshape(-1, 1).to(torch.float32)
    except KeyError as e:
        raise QuantizationError(f"{fmt.value} buffers lack {e.args[0]!r}; got {sorted(buffers)}") from None
    except RuntimeError as e:  # reshape of a wrongly sized buffer
        raise QuantizationError(f"{fmt.value} buffers do not fit shape {tuple(shape)}: {e}") from None
    return w.reshape(out, inf).to(dtype)


_PAIR_LUT: dict[tuple[QuantFormat, torch.device], torch.Tensor] = {}


def _pair_lut(fmt: QuantFormat, device: torch.device) -> torch.Tensor:
    """[256, 2] float32: the two values each packed byte holds, in storage order (nf4: code of
    the high nibble, then the low; q4_0: low nibble - 8, high nibble - 8). One per device."""
    lut = _PAIR_LUT.get((fmt, device))
    if lut is None:
        lo, hi = _nibbles(torch.arange(256, dtype=torch.uint8))
        pair = NF4_CODE[torch.stack([hi, lo], -1)] if fmt is QuantFormat.NF4 else torch.stack([lo, hi], -1).float() - 8
        lut = _PAIR_LUT[(fmt, device)] = pair.to(device)
    return lut


def dequantize_lut(
    buffers: dict[str, torch.Tensor], fmt: QuantFormat, shape: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """:func:`dequantize` for eager GPU work: the same float32 values (bit for bit), in a few
    kernels instead of a dozen, by looking each packed byte up in a 256-entry pair table.
    4-bit formats only (the others are already a cast and a multiply); not for export (a graph
    should keep the standard ops of :func:`dequantize`)."""
    out, inf = shape
    qw = buffers["qweight"]
    pairs = _pair_lut(fmt, qw.device)[qw.reshape(-1).long()]  # [out*in/2, 2]
    if fmt is QuantFormat.NF4:
        w = pairs.view(-1, 64) * buffers["absmax"].reshape(-1, 1).to(torch.float32)
    else:  # a q4_0 block's 16 bytes hold elements j (low nibble) and j + 16 (high nibble)
        q = pairs.view(out, inf // 32, 16, 2).transpose(-1, -2)
        w = buffers["scales"].reshape(out, inf // 32, 1, 1).to(torch.float32) * q
    return w.reshape(out, inf).to(dtype)


def _buffer_specs(fmt: QuantFormat, out: int, inf: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    if fmt is QuantFormat.F32:
        return {"weight": ((out, inf), torch.float32)}
    if fmt is QuantFormat.F16:
        return {"weight": ((out, inf), torch.float16)}
    if fmt is QuantFormat.Q8_0:
        return {"qweight": ((out, inf), torch.int8), "scales": ((out, inf // 32), torch.float16)}
    if fmt is QuantFormat.Q4_0:
        return {"qweight": ((out, inf // 2), torch.uint8), "scales": ((out, inf // 32), torch.float16)}
    return {"qweight": ((out, inf // 2), torch.uint8), "absmax": ((out * inf // 64,), torch.float32)}


def storage_bytes(fmt: QuantFormat | str, shape: tuple[int, int]) -> int:
    """Bytes the frozen buffers of a ``shape`` weight take in ``fmt``; raises QuantizationError."""
    fmt = _fmt(fmt)
    out, inf = _check_shape(shape, fmt)
    return sum(math.prod(s) * dt.itemsize for s, dt in _buffer_specs(fmt, out, inf).values())


def _gguf_fmt(fmt) -> QuantFormat:
    fmt = _fmt(fmt)
    if fmt not in _GGUF_BLOCK_BYTES:
        raise QuantizationError(f"GGUF blocks exist only for q8_0 and q4_0, not {fmt.value}")
    return fmt


def to_gguf_blocks(buffers: dict[str, torch.Tensor], fmt: QuantFormat | str) -> np.ndarray:
    """Lay q8_0 / q4_0 buffers out as ggml stores them: uint8 ``[out, (in/32) * block_bytes]``,
    each block its fp16 scale then its quants (byte-identical to ``gguf.quants.quantize``).
    Raises QuantizationError for another format."""
    fmt = _gguf_fmt(fmt)
    scales = buffers["scales"].detach().to(torch.float16).contiguous().cpu()
    out, nb = scales.shape
    d = scales.view(torch.uint8).reshape(out, nb, 2)  # little-endian, as ggml writes it
    q = buffers["qweight"].detach().contiguous().cpu().view(torch.uint8).reshape(out, nb, -1)
    return torch.cat([d, q], dim=-1).reshape(out, -1).numpy()


def from_gguf_blocks(raw: np.ndarray, fmt: QuantFormat | str, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_gguf_blocks`: split ggml q8_0 / q4_0 block bytes of a ``shape``
    weight into our buffers. Raises QuantizationError for a wrong size or format."""
    fmt = _gguf_fmt(fmt)
    out, inf = _check_shape(shape, fmt)
    raw = np.ascontiguousarray(raw).view(np.uint8)
    nb, bb = inf // 32, _GGUF_BLOCK_BYTES[fmt]
    if raw.size != out * nb * bb:
        raise QuantizationError(
            f"{fmt.value} data for shape {tuple(shape)}: expected {out * nb * bb} bytes, got {raw.size}"
        )
    blocks = torch.from_numpy(raw.copy()).reshape(out, nb, bb)
    scales = blocks[..., :2].contiguous().view(torch.float16).reshape(out, nb)
    q = blocks[..., 2:].contiguous()
    if fmt is QuantFormat.Q8_0:
        return {"qweight": q.view(torch.int8).reshape(out, inf), "scales": scales}
    return {"qweight": q.reshape(out, inf // 2), "scales": scales}


def to_bnb(buffers: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return nf4 buffers as bitsandbytes' ``quantize_4bit`` gives them (blocksize 64, uncompressed
    statistics): packed uint8 ``[out*in/2, 1]`` and float32 absmax ``[out*in/64]``."""
    return buffers["qweight"].detach().reshape(-1, 1).clone(), buffers["absmax"].detach().float().clone()


def from_bnb(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_bnb` for a ``shape`` weight; raises QuantizationError on size mismatch."""
    out, inf = _check_shape(shape, QuantFormat.NF4)
    packed = packed.detach().contiguous().view(torch.uint8) if packed.dtype != torch.uint8 else packed.detach()
    if packed.numel() != out * inf // 2 or absmax.numel() != out * inf // 64:
        raise QuantizationError(
            f"nf4 data for shape {tuple(shape)}: expected {out * inf // 2} packed bytes and {out * inf // 64} "
            f"absmax values, got {packed.numel()} and {absmax.numel()}"
        )
    return {"qweight": packed.reshape(out, inf // 2).clone(), "absmax": absmax.detach().float().reshape(-1).clone()}


class QuantLinear(torch.nn.Module):
    """Frozen linear layer over quantized buffers: ``forward(x) = F.linear(x, W, bias)`` with
    ``W`` dequantized on the fly (in ``x``'s dtype) and an optional float32 ``bias`` buffer (kept
    unquantized, as llama.cpp keeps Qwen2's q/k/v biases). Holds buffers only, never parameters;
    gradients flow to ``x``. ``QuantLinear(in, out, fmt)`` makes zero buffers for state_dict loading."""

    def __init__(self, in_features: int, out_features: int, fmt: QuantFormat | str, bias: bool = False) -> None:
        super().__init__()
        self.fmt = _fmt(fmt)
        self.out_features, self.in_features = _check_shape((out_features, in_features), self.fmt)
        for key, (shape, dt) in _buffer_specs(self.fmt, self.out_features, self.in_features).items():
            self.register_buffer(key, torch.zeros(shape, dtype=dt), persistent=True)
        self.register_buffer("bias", torch.zeros(self.out_features) if bias else None, persistent=True)
        self._dequant_cache: torch.Tensor | None = None  # not state: see cache_dequantized()

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        fmt: QuantFormat | str,
        *,
        name: str = "weight",
        bias: torch.Tensor | None = None,
    ) -> "QuantLinear":
        """Quantize a float ``[out, in]`` weight (and keep ``bias`` [out] as float32) into a new
        layer; raises QuantizationError."""
        bufs = quantize(weight, fmt, name=name)
        mod = cls(weight.shape[1], weight.shape[0], fmt, bias=bias is not None)
        for key, t in bufs.items():
            setattr(mod, key, t.to(weight.device))
        if bias is not None:
            if tuple(bias.shape) != (weight.shape[0],):
                raise QuantizationError(f"{name}: bias shape {tuple(bias.shape)} != ({weight.shape[0]},)")
            mod.bias = bias.detach().to(torch.float32, copy=True).to(weight.device)
        return mod

    def _buffers_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in _buffer_specs(self.fmt, self.out_features, self.in_features)}

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``[out, in]`` weight as ``dtype``. 4-bit formats on a GPU take the pair-table path
        (:func:`dequantize_lut`, same values; see :meth:`prepare`); the CPU, and so every
        exported graph, keeps :func:`dequantize`."""
        shape = (self.out_features, self.in_features)
        if self._gpu_table():
            return dequantize_lut(self._buffers_dict(), self.fmt, shape, dtype)
        return dequantize(self._buffers_dict(), self.fmt, shape, dtype)

    def _gpu_table(self) -> bool:
        return self.fmt in (QuantFormat.Q4_0, QuantFormat.NF4) and self.qweight.is_cuda

    def prepare(self) -> None:
        """Build the lookup table for the device the buffers are on, ahead of compiling or
        capturing a graph (neither may copy a host tensor to the GPU). Idempotent."""
        if self._gpu_table():
            _pair_lut(self.fmt, self.qweight.device)

    def cache_dequantized(self, enabled: bool = True, dtype: torch.dtype = torch.float32) -> None:
        """Keep (or drop) a dequantized copy of the weight for eager serving.

        Decoding one token at a time would otherwise dequantize every weight per token; the copy
        costs ``4 * in * out`` bytes at fp32. Never used while exporting a graph (the copy is a
        plain attribute, not a buffer, so exported graphs keep the quantized bytes).
        """
        self._dequant_cache = self.dequantized_weight(dtype).detach() if enabled else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._dequant_cache
        b = None if self.bias is None else self.bias.to(x.dtype)
        if w is not None and w.dtype == x.dtype and w.device == x.device and not torch.compiler.is_compiling():
            return F.linear(x, w, b)
        return F.linear(x, self.dequantized_weight(x.dtype), b)

    def extra_repr(self) -> str:
        bias = "" if self.bias is None else ", bias=True"
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt.value}{bias}"


class QuantEmbedding(torch.nn.Module):
    """A frozen embedding matrix ``[num, dim]`` kept as q8_0 blocks (int8 ``qweight``, float16
    ``scales`` per 32 values): a lookup gathers and dequantizes only the rows it needs, and
    :attr:`weight` (the output projection of a tied model) is the dequantized matrix.

    Used where the embedding dwarfs the rest (Gemma 3's 262k x 640: 640 MiB as float32, 170 MiB
    as q8_0) and q8_0 holds it exactly (the source GGUF stored it as Q8_0), so nothing changes but
    the bytes. ``QuantEmbedding(num, dim)`` makes zero buffers for state_dict loading.
    """

    def __init__(self, num: int, dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = _check_shape((num, dim), QuantFormat.Q8_0)
        for key, (shape, dt) in _buffer_specs(QuantFormat.Q8_0, num, dim).items():
            self.register_buffer(key, torch.zeros(shape, dtype=dt), persistent=True)
        self._dequant_cache: torch.Tensor | None = None

    @classmethod
    def from_float(cls, weight: torch.Tensor, *, name: str = "embedding") -> "QuantEmbedding":
        """Quantize ``weight`` [num, dim] to q8_0; raises QuantizationError."""
        mod = cls(*weight.shape)
        for key, t in quantize(weight, QuantFormat.Q8_0, name=name).items():
            setattr(mod, key, t.to(weight.device))
        return mod

    @staticmethod
    def holds_exactly(weight: torch.Tensor) -> bool:
        """Whether q8_0 reproduces ``weight`` bit for bit (a matrix that came from Q8_0 blocks)."""
        if weight.dim() != 2 or weight.shape[1] % 32:
            return False
        bufs = quantize(weight, QuantFormat.Q8_0)
        return bool(torch.equal(dequantize(bufs, QuantFormat.Q8_0, tuple(weight.shape)), weight.float()))

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized ``[num, dim]`` float32 matrix (the kept copy when cached)."""
        if self._dequant_cache is not None and not torch.compiler.is_compiling():
            return self._dequant_cache
        return dequantize(
            {"qweight": self.qweight, "scales": self.scales},
            QuantFormat.Q8_0,
            (self.num_embeddings, self.embedding_dim),
        )

    def cache_dequantized(self, enabled: bool = True, dtype: torch.dtype = torch.float32) -> None:
        """Keep (or drop) the dequantized matrix for eager serving (see QuantLinear's)."""
        self._dequant_cache = None
        self._dequant_cache = self.weight.to(dtype).detach() if enabled else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.qweight[ids].to(torch.float32)  # [..., dim]
        scales = self.scales[ids].to(torch.float32)  # [..., dim / 32]
        shape = rows.shape
        return (rows.reshape(*shape[:-1], -1, 32) * scales[..., None]).reshape(shape)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, fmt=q8_0"
