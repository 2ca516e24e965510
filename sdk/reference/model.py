"""An export-friendly decoder of any supported family (Llama, Qwen2, Qwen3, Gemma 3) in plain
torch, with Hugging Face weight names.

One skeleton described by :class:`~pocketpeft.families.Family` data: RMSNorm (Gemma's ``1 + w``
form), RoPE (HF's rotate-half convention, one base per layer type), a gated MLP (SwiGLU or
GeGLU), grouped-query attention with optional q/k/v biases, q/k norms and a sliding window,
Gemma's norms around each sub-block and its embedding scale, tied or untied embeddings. No
data-dependent control flow in ``forward``, so the same module traces with ``torch.export`` for
every target. The frozen linear layers are :class:`QuantLinear` (any :class:`QuantFormat`);
LoRA is injected on top by :mod:`pocketpeft.reference.lora`.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pocketpeft.config import LINEAR_MODULES, ModelConfig, QuantFormat
from pocketpeft.errors import SequenceTooLongError, UnsupportedModelError

from .quant import QuantEmbedding, QuantLinear

#: A factory for the frozen linear layers: (in_features, out_features, hf_name, bias) -> module.
LinearFactory = Callable[[int, int, str, bool], nn.Module]

#: A per-layer key/value cache: one (k, v) pair per layer, each [batch, kv_heads, seen, head_dim].
KVCache = list[tuple[torch.Tensor, torch.Tensor]]

#: What one layer needs besides its input: RoPE tables (cos, sin) [T, D] and a boolean mask
#: [T, S] (True = attend) or None for plain causal attention from position 0.
LayerInputs = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 like transformers' LlamaRMSNorm; with
    ``offset=1`` the weight is applied as ``1 + w`` (Gemma's RMSNorm, zeros = identity)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim) if not offset else torch.zeros(dim), requires_grad=False)
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (self.offset + self.weight.float())).to(dtype)
        return self.weight * h.to(dtype)


def rope_tables(
    cfg: ModelConfig, positions: torch.Tensor, theta: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, head_dim] for integer ``positions`` [T] (HF's cat(freqs, freqs) layout),
    for RoPE base ``theta`` (default: ``cfg.rope_theta``)."""
    dim = cfg.head_dim
    base = cfg.rope_theta if theta is None else theta
    inv_freq = 1.0 / (
        base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device).to(torch.float32) / dim)
    )
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def layer_inputs(cfg: ModelConfig, start_pos: int, t: int, cached: bool, device=None) -> list[LayerInputs]:
    """Per decoder layer: the RoPE tables of its base and its attention mask, for ``t`` new
    tokens at positions ``start_pos..`` (``cached``: keys of the earlier positions come from a
    KV cache). Full-attention layers from position 0 get ``None`` (SDPA's causal path);
    sliding-window layers always get an explicit mask (position distance < window)."""
    positions = torch.arange(start_pos, start_pos + t, device=device)
    tables: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
    masks: dict[bool, torch.Tensor | None] = {}
    out = []
    for i in range(cfg.num_hidden_layers):
        theta = cfg.layer_rope_theta(i)
        if theta not in tables:
            tables[theta] = rope_tables(cfg, positions, theta)
        sliding = cfg.is_sliding(i)
        if sliding not in masks:
            mask = None
            if sliding or (cached and start_pos > 0):
                keys = torch.arange(start_pos + t if cached else t, device=device)
                if not cached:
                    keys = keys + start_pos
                dist = positions[:, None] - keys[None, :]
                mask = dist >= 0
                if sliding:
                    mask = mask & (dist < cfg.sliding_window)
            masks[sliding] = mask
        out.append((*tables[theta], masks[sliding]))
    return out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, T, D] by the tables [T, D]."""
    return x * cos.to(x.dtype) + _rotate_half(x) * sin.to(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with q/k/v/o projections (and q/k norms) named as in HF."""

    def __init__(self, cfg: ModelConfig, make_linear: LinearFactory, prefix: str) -> None:
        super().__init__()
        fam = cfg.family
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = make_linear(h, self.n_heads * self.head_dim, f"{prefix}.q_proj", fam.qkv_bias)
        self.k_proj = make_linear(h, self.n_kv * self.head_dim, f"{prefix}.k_proj", fam.qkv_bias)
        self.v_proj = make_linear(h, self.n_kv * self.head_dim, f"{prefix}.v_proj", fam.qkv_bias)
        self.o_proj = make_linear(self.n_heads * self.head_dim, h, f"{prefix}.o_proj", False)
        if fam.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, fam.norm_offset)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, fam.norm_offset)
        self.qk_norm = fam.qk_norm
        # SDPA scales by head_dim ** -0.5; a model asking for another scale gets q pre-multiplied
        scalar = cfg.query_pre_attn_scalar
        self.q_scale = 1.0 if not scalar or scalar == self.head_dim else math.sqrt(self.head_dim / scalar)

    def forward(self, x, cos, sin, mask=None, past=None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        present = (k, v)
        rep = self.n_heads // self.n_kv
        if rep > 1:  # expand + reshape rather than repeat_interleave: plain view ops for every exporter
            s = k.shape[2]
            k = k[:, :, None].expand(b, self.n_kv, rep, s, self.head_dim).reshape(b, self.n_heads, s, self.head_dim)
            v = v[:, :, None].expand(b, self.n_kv, rep, s, self.head_dim).reshape(b, self.n_heads, s, self.head_dim)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.o_proj(out), present


class MLP(nn.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x)), act = SiLU (SwiGLU) or tanh-GELU (GeGLU)."""

    def __init__(self, cfg: ModelConfig, make_linear: LinearFactory, prefix: str) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = make_linear(h, i, f"{prefix}.gate_proj", False)
        self.up_proj = make_linear(h, i, f"{prefix}.up_proj", False)
        self.down_proj = make_linear(i, h, f"{prefix}.down_proj", False)
        self.gelu = cfg.family.activation == "gelu_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_proj(x)
        g = F.gelu(g, approximate="tanh") if self.gelu else F.silu(g)
        return self.down_proj(g * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, make_linear: LinearFactory, idx: int) -> None:
        super().__init__()
        fam = cfg.family
        prefix = f"model.layers.{idx}"
        self.self_attn = Attention(cfg, make_linear, f"{prefix}.self_attn")
        self.mlp = MLP(cfg, make_linear, f"{prefix}.mlp")
        for name in fam.norm_names():
            setattr(self, name, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fam.norm_offset))
        self.sandwich = fam.sandwich_norms

    def forward(self, x, cos, sin, mask=None, past=None):
        a, present = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        if self.sandwich:
            x = x + self.post_attention_layernorm(a)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))), present
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), present


class Decoder(nn.Module):
    """The ``model.`` part of HF's ``*ForCausalLM``: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig, make_linear: LinearFactory, quant_embedding: bool = False) -> None:
        super().__init__()
        fam = cfg.family
        if quant_embedding:
            self.embed_tokens = QuantEmbedding(cfg.vocab_size, cfg.hidden_size)
        else:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, make_linear, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fam.norm_offset)
        # Gemma scales the embeddings by sqrt(hidden) (transformers rounds the factor to the
        # embedding's dtype; in float32 it is the float32 square root)
        self.embed_scale = float(np.float32(cfg.hidden_size**0.5)) if fam.embed_scale else 1.0

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        return x * self.embed_scale if self.embed_scale != 1.0 else x


class CausalLM(nn.Module):
    """Causal LM of any supported family. ``forward(input_ids) -> logits``; state-dict keys match
    HF's ``*ForCausalLM`` of the family (frozen linears carry their quantized buffer names
    instead of ``weight``).

    Every base parameter is frozen; only injected LoRA tensors are trainable.
    """

    def __init__(
        self, cfg: ModelConfig, make_linear: LinearFactory | None = None, quant_embedding: bool = False
    ) -> None:
        super().__init__()
        self.config = cfg
        make_linear = make_linear or (lambda i, o, name, bias: QuantLinear(i, o, QuantFormat.F32, bias))
        self.model = Decoder(cfg, make_linear, quant_embedding)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            self.lm_head.weight.requires_grad_(False)
        #: in training mode with gradients on, return :class:`HeadInput` instead of logits (see
        #: :func:`head_loss`)
        self.fused_head = False

    def output_weight(self) -> torch.Tensor:
        """The [vocab, hidden] output projection (the embedding matrix when tied)."""
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def hidden_states(self, input_ids: torch.Tensor, start_pos: int = 0, past: KVCache | None = None):
        """Final-norm hidden states [B, T, H] and the updated KV cache.

        ``start_pos`` is the position of the first token; ``past`` the cache of the tokens before it.
        """
        t = input_ids.shape[-1]
        if start_pos + t > self.config.max_position_embeddings:
            raise SequenceTooLongError(
                f"sequence of {start_pos + t} tokens exceeds the model's context of "
                f"{self.config.max_position_embeddings}"
            )
        inputs = layer_inputs(self.config, start_pos, t, past is not None, input_ids.device)
        x = self.model.embed(input_ids)
        present: KVCache = []
        for i, layer in enumerate(self.model.layers):
            x, kv = layer(x, *inputs[i], None if past is None else past[i])
            present.append(kv)
        return self.model.norm(x), present

    def prefix_hidden(self, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
        """The residual stream [B, T, H] entering decoder layer ``layer`` (the embedding and layers
        ``< layer``, positions from 0): what a split model's frozen prefix computes."""
        return SplitPart(self, 0, layer)(input_ids)

    def suffix_logits(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """Logits [B, T, vocab] from the residual stream ``hidden`` entering layer ``layer``:
        layers ``>= layer``, the final norm and the output projection (a split model's suffix)."""
        return SplitPart(self, layer, self.config.num_hidden_layers)(hidden)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor | HeadInput:
        """Logits [B, T, vocab] for ``input_ids`` [B, T] (int64), positions starting at 0 (in
        training with ``fused_head`` set: the :class:`HeadInput` the loss takes instead)."""
        h, _ = self.hidden_states(input_ids)
        if self.fused_head and self.training and torch.is_grad_enabled():
            return HeadInput(h, self.output_weight())
        return F.linear(h, self.output_weight())

    def forward_cached(self, input_ids: torch.Tensor, start_pos: int, past: KVCache | None):
        """Incremental decoding: logits for the new tokens and the extended cache."""
        h, present = self.hidden_states(input_ids, start_pos, past)
        return F.linear(h, self.output_weight()), present


class SplitPart(nn.Module):
    """Layers ``[start, stop)`` of a :class:`CausalLM` as a module of their own, sharing its
    weights under the same names (``model.layers.22.self_attn.q_proj...``, a ModuleDict keyed by
    the layer index), so an exported part keeps HF/PEFT names.

    ``start == 0``: the part begins with the embedding and takes ``input_ids`` [B, T]; otherwise it
    takes the residual stream [B, T, H] entering layer ``start``. ``stop`` = the layer count: the
    part ends with the final norm and the output projection and returns logits; otherwise it
    returns the residual stream leaving layer ``stop - 1``. Positions start at 0.
    """

    def __init__(self, lm: CausalLM, start: int, stop: int) -> None:
        super().__init__()
        cfg = lm.config
        n = cfg.num_hidden_layers
        if not 0 <= start < stop <= n:
            raise ValueError(f"SplitPart: layers [{start}, {stop}) outside the model's 0..{n}")
        self.config, self.start, self.stop = cfg, start, stop
        self.head = stop == n
        self.embed_scale = lm.model.embed_scale
        self.lm = [lm]  # a list: not a submodule (its fused_head flag is read at call time)
        self.model = nn.Module()
        self.model.layers = nn.ModuleDict({str(i): lm.model.layers[i] for i in range(start, stop)})
        if start == 0 or (self.head and cfg.tie_word_embeddings):
            self.model.embed_tokens = lm.model.embed_tokens
        if self.head:
            self.model.norm = lm.model.norm
            if not cfg.tie_word_embeddings:
                self.lm_head = lm.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = layer_inputs(self.config, 0, x.shape[1], False, x.device)
        if self.start == 0:
            x = self.model.embed_tokens(x)
            if self.embed_scale != 1.0:
                x = x * self.embed_scale
        for i, layer in self.model.layers.items():
            x, _ = layer(x, *inputs[int(i)])
        if not self.head:
            return x
        w = self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        if self.lm[0].fused_head and self.training and torch.is_grad_enabled():
            return HeadInput(self.model.norm(x), w)
        return F.linear(self.model.norm(x), w)


class HeadInput(NamedTuple):
    """What the output projection would take: final-norm hidden states [B, T, H] and the frozen
    [vocab, H] matrix. A model with ``fused_head`` returns this in training so the loss never
    holds the [B, T, vocab] logits (:func:`head_loss`)."""

    hidden: torch.Tensor
    weight: torch.Tensor


#: vocabularies at least this large train with the fused head in the torch backend (Gemma 3's
#: 262k: [8, 64, 262144] float32 logits and their gradient would be 1 GiB)
FUSED_HEAD_VOCAB = 100_000
#: vocabularies at least this large keep their embedding as q8_0 where that is exact
QUANT_EMBED_VOCAB = 100_000
#: tokens per slice of the fused head: 64 x 262144 float32 = 64 MiB of logits at a time
HEAD_ROWS = 64


class _FusedHeadLoss(torch.autograd.Function):
    """``sum(coeff * CE(hidden @ weight.T, labels))`` and its gradient for ``hidden``, computed
    ``rows`` tokens at a time: each slice's logits are made, reduced and turned into that slice's
    gradient (softmax - one-hot) @ weight at once, so the peak is one slice of logits instead of
    all of them, and the compute is the same two matmuls as the unfused loss. ``weight`` is
    frozen (no gradient)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, coeff, rows: int):
        valid = labels != -100
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        c = torch.where(valid, coeff.float(), torch.zeros_like(coeff, dtype=torch.float32))
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for s in range(0, hidden.shape[0], rows):
            lg = F.linear(hidden[s : s + rows], weight).float()
            lse = torch.logsumexp(lg, -1)
            tgt = lg.gather(1, safe[s : s + rows, None]).squeeze(1)
            total = total + ((lse - tgt) * c[s : s + rows]).sum()
            if grad is not None:
                p = lg.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                p[torch.arange(p.shape[0], device=p.device), safe[s : s + rows]] -= 1.0
                p.mul_(c[s : s + rows, None])
                grad[s : s + rows] = (p.to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None, None, None, None


def head_loss(head: HeadInput, labels: torch.Tensor, coeff: torch.Tensor, rows: int = HEAD_ROWS) -> torch.Tensor:
    """``sum(coeff * CE)`` over every token of ``head`` (labels -100 add nothing): the same value
    and hidden-state gradient as cross-entropy over ``F.linear(hidden, weight)``, with at most
    ``rows`` tokens' logits alive at once. ``labels`` / ``coeff`` are shaped like the tokens."""
    h = head.hidden.reshape(-1, head.hidden.shape[-1])
    return _FusedHeadLoss.apply(h, head.weight, labels.reshape(-1), coeff.reshape(-1), rows)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; ``labels`` [B, T] are already aligned targets, -100 ignored."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


def linear_names(cfg: ModelConfig) -> list[str]:
    """HF names of every frozen linear layer, e.g. ``model.layers.0.self_attn.q_proj``."""
    names = []
    for i in range(cfg.num_hidden_layers):
        for m in LINEAR_MODULES:
            part = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            names.append(f"model.layers.{i}.{part}.{m}")
    return names


def build_from_float(
    cfg: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    quant: QuantFormat | str = QuantFormat.F32,
    progress: bool = False,
    quant_embedding: bool | None = None,
) -> CausalLM:
    """Build a :class:`CausalLM` from an HF-named float state dict, quantizing every frozen
    linear layer to ``quant``. The embedding is kept as q8_0 (:class:`QuantEmbedding`) when
    ``quant_embedding`` is True, or by default (``None``) when the vocabulary has at least
    :data:`QUANT_EMBED_VOCAB` entries and q8_0 holds the matrix exactly (it came from Q8_0
    blocks, as Gemma 3's GGUF stores it). Raises :class:`UnsupportedModelError` for
    missing/misshapen tensors."""
    quant = QuantFormat.parse(quant)
    emb = state_dict.get("model.embed_tokens.weight")
    if quant_embedding is None:
        quant_embedding = (
            emb is not None and cfg.vocab_size >= QUANT_EMBED_VOCAB and QuantEmbedding.holds_exactly(emb.float())
        )
    names = set(linear_names(cfg))
    todo = None
    if progress:
        from tqdm.auto import tqdm

        todo = tqdm(total=len(names), desc=f"quantize {quant.value}", unit="layer", leave=False)

    def make(i: int, o: int, name: str, bias: bool) -> nn.Module:
        w = state_dict.get(f"{name}.weight")
        if w is None or tuple(w.shape) != (o, i):
            got = None if w is None else tuple(w.shape)
            raise UnsupportedModelError(f"base weights: {name}.weight is {got}, expected ({o}, {i})")
        b = state_dict.get(f"{name}.bias")
        if bias and (b is None or tuple(b.shape) != (o,)):
            got = None if b is None else tuple(b.shape)
            raise UnsupportedModelError(f"base weights: {name}.bias is {got}, expected ({o},)")
        if todo is not None:
            todo.update()
        return QuantLinear.from_float(w.to(torch.float32), quant, name=name, bias=b if bias else None)

    with torch.device("cpu"):
        model = CausalLM(cfg, make, quant_embedding)
    if todo is not None:
        todo.close()
    rest = {k: v for k, v in state_dict.items() if k.rsplit(".", 1)[0] not in names}
    if quant_embedding:
        if emb is None:
            raise UnsupportedModelError("base weights: model.embed_tokens.weight is missing")
        model.model.embed_tokens = QuantEmbedding.from_float(rest.pop("model.embed_tokens.weight").float())
    quantized = {"model.embed_tokens"} if quant_embedding else set()
    biased = {n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.bias is not None}
    stray = sorted(k for k in state_dict if k.endswith(".bias") and k[:-5] in names and k[:-5] not in biased)
    if stray:
        raise UnsupportedModelError(f"base weights have biases a {cfg.model_type} model doesn't use, e.g. {stray[:3]}")
    if cfg.tie_word_embeddings:
        rest.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if k.rsplit(".", 1)[0] not in names and k.rsplit(".", 1)[0] not in quantized]
    if missing or unexpected:
        raise UnsupportedModelError(
            f"base weights don't match the architecture: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.requires_grad_(False).eval()


def build_quantized(cfg: ModelConfig, quant: QuantFormat | str, state_dict: Mapping[str, torch.Tensor]) -> CausalLM:
    """Build a :class:`CausalLM` from a state dict that already holds quantized buffers
    (what :func:`build_from_float` produced and a bundle stores)."""
    quant = QuantFormat.parse(quant)
    with torch.device("meta"):
        model = CausalLM(
            cfg, lambda i, o, name, bias: QuantLinear(i, o, quant, bias), "model.embed_tokens.qweight" in state_dict
        )
    model.load_state_dict(dict(state_dict), strict=True, assign=True)
    return model.requires_grad_(False).eval()


@torch.no_grad()
def dequantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base weights of ``model`` as a float32 HF ``*ForCausalLM`` state dict of its family:
    every frozen quantized linear dequantized (what transformers/peft need to reproduce our
    logits), biases as they are. LoRA tensors are left out; ``lm_head.weight`` is included (tied
    or not)."""
    out: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            out[f"{name.replace('.base_layer', '')}.weight"] = mod.dequantized_weight(torch.float32).cpu()
        elif isinstance(mod, QuantEmbedding):
            out[f"{name}.weight"] = mod.weight.float().cpu()
    for k, v in model.state_dict().items():
        k = k.replace(".base_layer.", ".")
        if (k.rsplit(".", 1)[0] + ".weight" in out and not k.endswith(".bias")) or ".lora_" in k:
            continue
        out[k] = v.float().cpu()
    if "lm_head.weight" not in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out
