"""Backend ``peft``: the server side. Real transformers (the ``*ForCausalLM`` of the bundle's family) + ``peft`` +
``bitsandbytes`` built from the same bundle the devices run; CUDA when present, CPU otherwise.

* Architecture from the manifest; base weights from the bundle's ``torch`` target.
* ``nf4`` bundles: every frozen linear becomes a ``bitsandbytes.nn.Linear4bit`` (nf4, block 64,
  uncompressed absmax) holding *the same bytes* as the bundle (ours are byte-identical to
  ``bitsandbytes.functional.quantize_4bit``) — QLoRA over the device's own base.
* ``q4_0`` / ``q8_0`` / ``f16`` / ``f32`` bundles: bitsandbytes has no such format, so the frozen
  linears are ordinary ``nn.Linear`` holding the *dequantized* weights in the compute dtype
  (fp32 by default, bf16 on request). Same values as the device computes with, not the same bytes.
* LoRA: ``peft.get_peft_model`` with the manifest's LoraConfig, then the bundle's initial adapter
  loaded with ``peft.set_peft_model_state_dict`` — every backend starts from the same tensors.
* Training: the torch reference's recipe (AdamW, global-norm clipping, warmup + cosine,
  non-finite steps skipped), see :class:`~pocketpeft.runtime.protocol.TrainConfig`.

The live ``peft.PeftModel`` is ``backend.model`` for anything server-side beyond the protocol.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from pocketpeft._deps import available, require
from pocketpeft.adapter import peft_key
from pocketpeft.errors import AdapterShapeError, ConfigError, UnsupportedModelError
from pocketpeft.formats.torch import WEIGHTS
from pocketpeft.manifest import Bundle

from ..protocol import Capabilities, EvalSums, Probe, StepResult, TrainConfig

_NEEDS = (("transformers", "peft"), ("peft", "peft"), ("bitsandbytes", "bnb"))
DTYPES = ("float32", "bfloat16")


def probe() -> Probe:
    """Available when transformers, peft and bitsandbytes are installed: CUDA devices (tier gpu)
    when torch sees them, and the CPU (tier cpu; bitsandbytes' nf4 runs there too)."""
    missing = [f"{mod} (extra {extra})" for mod, extra in _NEEDS if not available(mod)]
    if missing:
        return Probe("peft", False, (), "not installed: " + ", ".join(missing))
    import torch

    notes = "transformers + peft + bitsandbytes (nf4 bases as Linear4bit)"
    devices, caps = [], {}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            dev = f"cuda:{i}"
            devices.append(dev)
            caps[dev] = Capabilities(
                train=True, infer=True, tier="gpu", kv_cache=True, notes=f"{notes}; {torch.cuda.get_device_name(i)}"
            )
    devices.append("cpu")
    caps["cpu"] = Capabilities(train=True, infer=True, tier="cpu", kv_cache=True, notes=f"{notes}; fp32")
    return Probe("peft", True, tuple(devices), "", caps)


def _torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise ConfigError(f"peft backend compute dtype {dtype!r} is not supported; expected one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def nf4_linear(qweight, absmax, in_features: int, out_features: int, compute_dtype):
    """A ``bitsandbytes.nn.Linear4bit`` (nf4, block 64, no double quantization) holding exactly the
    given packed bytes ``qweight`` [out, in/2] (uint8) and ``absmax`` [out*in/64] (float32)."""
    import torch

    bnb = require("bitsandbytes", extra="bnb")
    from bitsandbytes.functional import QuantState, get_4bit_type

    if tuple(qweight.shape) != (out_features, in_features // 2) or absmax.numel() != out_features * in_features // 64:
        raise UnsupportedModelError(
            f"nf4 buffers {tuple(qweight.shape)} / {absmax.numel()} don't fit a [{out_features}, {in_features}] weight"
        )
    lin = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=False,
        compute_dtype=compute_dtype,
        compress_statistics=False,
        quant_type="nf4",
        device="meta",
    )
    state = QuantState(
        absmax=absmax.detach().to(torch.float32).reshape(-1).clone(),
        shape=torch.Size([out_features, in_features]),
        code=get_4bit_type("nf4", device="cpu"),
        blocksize=64,
        quant_type="nf4",
        dtype=compute_dtype,
    )
    lin.weight = bnb.nn.Params4bit(
        qweight.detach().reshape(-1, 1).clone(),
        requires_grad=False,
        quant_state=state,
        blocksize=64,
        compress_statistics=False,
        quant_type="nf4",
        quant_storage=torch.uint8,
        module=lin,
        bnb_quantized=True,
    )
    lin.quant_state = state
    # On CPUs with AVX512-BF16, bitsandbytes repacks the weight in place for inference: keep the
    # bundle's bytes (and its arithmetic) instead.
    lin.support_avx512bf16_for_cpu = False
    return lin


def build_hf_model(bundle: Bundle, dtype: str = "float32"):
    """The transformers ``*ForCausalLM`` of the bundle's family (no LoRA) with the bundle's base:
    nf4 linears as bitsandbytes Linear4bit over the same bytes, other formats dequantized to
    ``dtype``; q/k/v biases (Qwen2) as they are.

    Raises the bundle's file errors, :class:`UnsupportedModelError` if the weights don't fit the
    architecture, :class:`ConfigError` for an unsupported ``dtype``.
    """
    import torch
    from safetensors.torch import load_file

    require("transformers", extra="peft")
    from pocketpeft.config import QuantFormat
    from pocketpeft.reference.hf import hf_class, hf_config, restore_meta_buffers
    from pocketpeft.reference.model import build_quantized
    from pocketpeft.reference.quant import QuantEmbedding, QuantLinear

    tdt = _torch_dtype(dtype)
    m = bundle.manifest
    ours = build_quantized(m.arch, m.quant, load_file(str(bundle.path_of(WEIGHTS))))
    cfg = hf_config(m.arch)
    cfg._attn_implementation = "sdpa"
    cls = hf_class(m.arch)
    with torch.device("meta"):
        hf = cls(cfg)
    linears = {}
    for name, mod in ours.named_modules():
        if not isinstance(mod, QuantLinear):
            continue
        if m.quant is QuantFormat.NF4:
            new = nf4_linear(mod.qweight, mod.absmax, mod.in_features, mod.out_features, tdt)
        else:
            new = torch.nn.Linear(mod.in_features, mod.out_features, bias=False, dtype=tdt)
            new.weight = torch.nn.Parameter(mod.dequantized_weight(torch.float32).to(tdt), requires_grad=False)
        if mod.bias is not None:
            new.bias = torch.nn.Parameter(mod.bias.to(tdt), requires_grad=False)
        hf.set_submodule(name, new)
        linears[name] = new
    rest = {k: v.to(tdt) for k, v in ours.state_dict().items() if k.rsplit(".", 1)[0] not in linears}
    if isinstance(ours.model.embed_tokens, QuantEmbedding):  # a q8_0 embedding: transformers takes its values
        rest = {k: v for k, v in rest.items() if not k.startswith("model.embed_tokens.")}
        rest["model.embed_tokens.weight"] = ours.model.embed_tokens.weight.to(tdt)
    missing, unexpected = hf.load_state_dict(rest, strict=False, assign=True)
    missing = [k for k in missing if k != "lm_head.weight" and k.rsplit(".", 1)[0] not in linears]
    if unexpected or missing:
        raise UnsupportedModelError(
            f"bundle base weights don't fit transformers' {cls.__name__}: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}"
        )
    if m.arch.tie_word_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    restore_meta_buffers(hf, m.arch)  # RoPE tables, Gemma's embedding scale: made on the meta device
    if m.quant is QuantFormat.NF4:
        hf.is_loaded_in_4bit = True  # peft then wraps the Linear4bit layers with its bitsandbytes LoRA layer
    return hf.requires_grad_(False).eval()


class PeftBackend:
    """Server-side backend over real transformers + peft + bitsandbytes; see the module docstring."""

    name = "peft"

    def __init__(self, device: str = "cpu", dtype: str = "float32") -> None:
        self.device = device
        self.dtype = dtype
        _torch_dtype(dtype)
        self.model = None  # peft.PeftModel once loaded
        self.cfg = TrainConfig()
        self.step = 0
        self._opt = None
        self._params: dict = {}  # PEFT key -> live parameter

    def capabilities(self) -> Capabilities:
        return probe().capabilities[self.device]

    def load(self, bundle: Bundle) -> None:
        peft = require("peft", extra="peft")
        hf = build_hf_model(bundle, self.dtype)
        model = peft.get_peft_model(hf, bundle.manifest.lora.to_peft())
        self.model = model.to(self.device).eval()
        self._lora = bundle.manifest.lora
        self._params = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                self._params[peft_key(name)] = p
        expected = bundle.manifest.trainable
        mine = {k: list(p.shape) for k, p in self._params.items()}
        if mine != {k: list(v) for k, v in expected.items()}:
            raise AdapterShapeError(
                f"peft built LoRA tensors {sorted(mine)[:2]}… that differ from the bundle's "
                f"trainable tensors {sorted(expected)[:2]}…"
            )
        self.set_adapter(bundle.initial_adapter().tensors)

    def configure(self, cfg: TrainConfig) -> None:
        import torch

        self.cfg, self.step = cfg, 0
        self._opt = torch.optim.AdamW(
            list(self._p.values()), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )

    def _loaded(self) -> None:
        if self.model is None:
            raise RuntimeError("backend not loaded: call load(bundle) first")

    @property
    def _p(self) -> dict:
        self._loaded()
        return self._params

    def _ids(self, a: np.ndarray):
        import torch

        return torch.as_tensor(np.asarray(a, dtype=np.int64), device=self.device)

    def _logits(self, ids):
        return self.model(input_ids=ids, use_cache=False).logits

    def train_step(self, input_ids: np.ndarray, labels: np.ndarray) -> StepResult:
        from .torch_backend import lora_step

        ids, lab = self._ids(input_ids), self._ids(labels)
        self.model.train()
        try:
            r = lora_step(self._logits, self._opt, list(self._p.values()), self.cfg, self.step, ids, lab)
        finally:
            self.model.eval()
        self.step += not r.skipped
        return r

    def eval_batch(self, input_ids: np.ndarray, labels: np.ndarray) -> EvalSums:
        import torch

        from .torch_backend import eval_sums

        self._loaded()
        with torch.no_grad():
            return eval_sums(self._logits(self._ids(input_ids)), self._ids(labels))

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        import torch

        self._loaded()
        with torch.no_grad():
            return self._logits(self._ids(input_ids)).float().cpu().numpy()

    def get_adapter(self) -> dict[str, np.ndarray]:
        peft = require("peft", extra="peft")
        self._loaded()
        sd = peft.get_peft_model_state_dict(self.model)
        return {k: v.detach().float().cpu().numpy().copy() for k, v in sd.items()}

    def set_adapter(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Replace the LoRA tensors through peft's own ``set_peft_model_state_dict`` after checking
        names, shapes and finiteness (nothing changes unless all pass); optimizer state is reset."""
        import torch

        peft = require("peft", extra="peft")
        expected = self._p
        given = {peft_key(k): v for k, v in tensors.items()}
        missing, extra = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
        if missing or extra:
            raise AdapterShapeError(
                f"adapter tensors don't match the model's LoRA layers: {len(missing)} missing "
                f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})"
            )
        sd = {}
        for k, p in expected.items():
            t = torch.as_tensor(np.asarray(given[k]))
            if tuple(t.shape) != tuple(p.shape):
                raise AdapterShapeError(
                    f"adapter tensor {k} has shape {tuple(t.shape)}, the model expects {tuple(p.shape)}"
                )
            if not bool(torch.isfinite(t).all()):
                raise AdapterShapeError(f"adapter tensor {k} holds NaN or inf values")
            sd[k] = t.to(p.dtype)
        res = peft.set_peft_model_state_dict(self.model, sd)
        if getattr(res, "unexpected_keys", None):
            raise AdapterShapeError(f"peft did not place adapter tensors {res.unexpected_keys[:2]}")
        self.configure(self.cfg)

    def set_global(self, tensors: Mapping[str, np.ndarray] | None) -> None:
        """The global adapter as peft's own second adapter, named "global": both active, only
        "default" (the personal adapter) trainable — peft's multi-adapter LoRA (see SupportsGlobal)."""
        import dataclasses

        import torch

        peft = require("peft", extra="peft")
        self._loaded()
        lora = self.model.base_model
        if tensors is not None:  # check before touching the model: a bad global leaves the current one
            shapes = {k: list(p.shape) for k, p in self._p.items()}
            given = {peft_key(k): np.asarray(v) for k, v in tensors.items()}
            if {k: list(v.shape) for k, v in given.items()} != shapes:
                raise AdapterShapeError("global adapter tensors don't match the model's LoRA layers (names or shapes)")
            if not all(np.isfinite(v).all() for v in given.values()):
                raise AdapterShapeError("global adapter tensors hold NaN or inf values")
        lora.set_adapter("default")
        if "global" in self.model.peft_config:
            self.model.delete_adapter("global")
        if tensors is not None:
            cfg = dataclasses.replace(self._lora, lora_dropout=0.0).to_peft()
            self.model.add_adapter("global", cfg)
            sd = {k: torch.as_tensor(v) for k, v in given.items()}
            peft.set_peft_model_state_dict(self.model, sd, adapter_name="global")
            lora.set_adapter(["default", "global"])
            for name, p in self.model.named_parameters():
                if ".global." in name:
                    p.requires_grad_(False)
            self.model.to(self.device)
        self.configure(self.cfg)

    def decoder(self) -> "PeftDecoder":
        """A KV-cached decoder (transformers' DynamicCache) over the current weights."""
        self._loaded()
        return PeftDecoder(self.model, self.device, self.model.config.vocab_size)


class PeftDecoder:
    """Incremental decoding with transformers' DynamicCache (see protocol.Decoder)."""

    def __init__(self, model, device: str, vocab_size: int) -> None:
        self.model, self.device, self.vocab_size = model, device, vocab_size
        self._n = 0
        self._cache = None

    @property
    def n_tokens(self) -> int:
        return self._n

    def extend(self, ids: list[int]) -> np.ndarray:
        import torch

        if not ids:
            return np.zeros((0, self.vocab_size), np.float32)
        transformers = require("transformers", extra="peft")
        if self._cache is None:
            self._cache = transformers.DynamicCache()
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        with torch.no_grad():
            out = self.model(input_ids=x, past_key_values=self._cache, use_cache=True)
        self._cache = out.past_key_values
        self._n += len(ids)
        return out.logits[0].float().cpu().numpy()

    def truncate(self, n: int) -> None:
        if n >= self._n:
            return
        n = max(0, n)
        if n == 0:
            self._cache = None
        else:  # transformers 5 crops by a negative count of tokens to drop
            self._cache.crop(n - self._n)
        self._n = n


def create(device: str = "cpu", dtype: str = "float32") -> PeftBackend:
    """A new, unloaded peft backend on ``device`` computing in ``dtype`` (``float32`` — the
    parity default — or ``bfloat16``, the usual QLoRA compute dtype on a GPU)."""
    return PeftBackend(device, dtype)
