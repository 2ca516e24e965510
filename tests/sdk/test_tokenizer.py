"""Tokenizer: SmolLM2 from GGUF metadata vs transformers' own GGUF tokenizer, persistence, errors."""

from __future__ import annotations

import json
import re

import pytest

from pocketpeft.errors import CorruptFileError, InputTextError, ModelFileNotFoundError, UnsupportedModelError
from pocketpeft.tokenizer import Tokenizer

TEXTS = [
    "Hello, how are you doing today?",
    "hey!! u up? lol 😂😂",
    "I'm fine, don't worry -- we'll see. It's OK; they've gone, you'd know.",
    "12345",
    "Call me at 555-0199 or 07700 900123, ok?",
    "In 2024, pi ~ 3.14159 and 1/3 = 0.333...",
    "  two leading spaces",
    "trailing spaces   ",
    " ",
    "",
    "line one\nline two\n\n\nline five\r\nwindows line",
    "\ttabbed\t\tstuff  \n  ",
    "<|im_start|>user\nWhat's up?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|><|im_end|><|endoftext|>",
    "not special: <|im_start without closing",
    "Café crème brûlée, naïve façade, Ærøskøbing, Ångström, São Paulo, Zürich",
    "Привет, как дела? Γειά σου κόσμε. مرحبا بالعالم. שלום",
    "日本語のテキストと中文文本，한국어 텍스트",
    "emoji zoo: 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🤖✨",
    "def f(x):\n    return x ** 2  # square\n",
    "ALL CAPS SHOUTING, MixedCase, camelCaseWord, snake_case_word",
    "  42",
    "hello  2 you",
    "version ١٢٣ and ৪৫",
    "zero\u200bwidth\u00a0nbsp\x00nul",
]


def _has_digit(s: str) -> bool:
    return re.search(r"\d", s) is not None or any(c.isnumeric() for c in s)


@pytest.fixture(scope="module")
def hf_gguf_tokenizer(smollm2_path):
    """transformers' tokenizer built from the same GGUF (an independent reading of the metadata)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_tokenizer(smollm2_tokenizer, hf_gguf_tokenizer):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import pre_tokenizers

    ours = smollm2_tokenizer
    theirs = hf_gguf_tokenizer.backend_tokenizer
    # transformers has no entry for pre="smollm" and falls back to plain GPT-2 ByteLevel, which
    # lacks SmolLM2's Digits split; give its tokenizer the original SmolLM2 pre-tokenizer.
    original = HFTok.from_str(theirs.to_str())
    original.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    assert ours.vocab_size == theirs.get_vocab_size() == 49152
    assert ours.hf.get_vocab() == theirs.get_vocab()
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == original.encode(text, add_special_tokens=False).ids, text
        if not _has_digit(text):
            assert ids == hf_gguf_tokenizer.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == text == hf_gguf_tokenizer.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == hf_gguf_tokenizer.decode(ids, skip_special_tokens=True)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == tuple(
        hf_gguf_tokenizer.convert_tokens_to_ids(t)
        for t in (hf_gguf_tokenizer.bos_token, hf_gguf_tokenizer.eos_token, hf_gguf_tokenizer.pad_token)
    )


def test_smollm2_known_ids(smollm2_tokenizer):
    tk = smollm2_tokenizer
    assert (tk.bos_id, tk.eos_id, tk.pad_id, tk.unk_id) == (1, 2, 2, 0)
    assert tk.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    # every digit is its own token, and a run of spaces before a digit stays one token, as in
    # the original tokenizer.json and llama.cpp ("smollm": split \p{N} first).
    assert tk.encode("12345") == [33, 34, 35, 36, 37]
    assert tk.encode("  42") == [256, 36, 34]
    assert tk.encode("hi", add_bos=True) == [1] + tk.encode("hi")
    assert tk.encode("") == []
    assert tk.decode(tk.encode("<|im_start|>x<|im_end|>"), skip_special_tokens=True) == "x"


def test_token_str_and_bytes(smollm2_tokenizer):
    tk = smollm2_tokenizer
    hello = tk.token_to_id("Ġhello")
    assert hello is not None and tk.token_str(hello) == " hello"
    assert tk.token_str(1) == "<|im_start|>" and tk.token_bytes(1) == b"<|im_start|>"
    ids = tk.encode("😂")
    assert len(ids) > 1 and b"".join(tk.token_bytes(i) for i in ids) == "😂".encode()
    assert "\ufffd" in tk.token_str(ids[0])  # a partial UTF-8 character
    assert tk.token_str(tk.token_to_id("Ċ")) == "\n"


def test_save_from_file_round_trip(smollm2_tokenizer, tmp_path):
    tk = smollm2_tokenizer
    path = tk.save(tmp_path / "tokenizer.json")
    assert path == tmp_path / "tokenizer.json"
    for src in (path, tmp_path):
        back = Tokenizer.from_file(src)
        assert back.to_json_str() == tk.to_json_str()
        assert (back.vocab_size, back.bos_id, back.eos_id, back.pad_id, back.unk_id) == (
            tk.vocab_size,
            tk.bos_id,
            tk.eos_id,
            tk.pad_id,
            tk.unk_id,
        )
        for text in TEXTS:
            assert back.encode(text) == tk.encode(text)
    # special tokens live in an HF-style tokenizer_config.json, merged into an existing one
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "x", "bos_token": "<|im_end|>"}))
    tk.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == "x" and cfg["bos_token"] == "<|im_start|>"


def test_from_file_special_ids_from_model_config(smollm2_tokenizer, tmp_path):
    (tmp_path / "tokenizer.json").write_text(smollm2_tokenizer.to_json_str())
    assert Tokenizer.from_file(tmp_path).bos_id is None
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [2, 0]}))
    tk = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert (tk.bos_id, tk.eos_id, tk.pad_id) == (0, 2, None)
    assert Tokenizer.from_file(tmp_path, bos_id=1).bos_id == 1


@pytest.mark.parametrize("bad", [b"\xff\xfe not utf8", "\udcff lone surrogate", 123, None, ["a"]])
def test_encode_rejects_non_text(smollm2_tokenizer, bad):
    with pytest.raises(InputTextError):
        smollm2_tokenizer.encode(bad)
    with pytest.raises(ValueError):
        smollm2_tokenizer.encode(bad)


def test_encode_accepts_utf8_bytes(smollm2_tokenizer):
    assert smollm2_tokenizer.encode("café".encode()) == smollm2_tokenizer.encode("café")


@pytest.mark.parametrize("ids", [[-1], [49152], [1.5], ["a"], [True]])
def test_decode_rejects_bad_ids(smollm2_tokenizer, ids):
    with pytest.raises(InputTextError, match="token id"):
        smollm2_tokenizer.decode(ids)


def test_decode_accepts_tensors(smollm2_tokenizer):
    torch = pytest.importorskip("torch")
    ids = smollm2_tokenizer.encode("tensor ids")
    assert smollm2_tokenizer.decode(torch.tensor(ids)) == "tensor ids"


def test_from_file_errors(tmp_path):
    with pytest.raises(ModelFileNotFoundError):
        Tokenizer.from_file(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match="tokenizer.json"):
        Tokenizer.from_file(tmp_path)


def test_from_gguf_rejects_other_tokenizer_models(tmp_path, tiny_hf_model, write_gguf):
    sd = {k: v for k, v in tiny_hf_model.state_dict().items() if k != "lm_head.weight"}
    path = write_gguf(tmp_path / "bert.gguf", sd, tokenizer_model="bert", n_tokens=300)
    with pytest.raises(UnsupportedModelError, match="'bert'"):
        Tokenizer.from_gguf(path)
    with pytest.raises(ModelFileNotFoundError):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")


def test_from_gguf_pre_tokenizers(tmp_path, tiny_hf_model, write_gguf):
    sd = {k: v for k, v in tiny_hf_model.state_dict().items() if k != "lm_head.weight"}
    llama3 = Tokenizer.from_gguf(write_gguf(tmp_path / "l3.gguf", sd, n_tokens=300, pre="llama-bpe"))
    assert llama3.decode(llama3.encode("Hi  there 12345\n")) == "Hi  there 12345\n"
    with pytest.raises(UnsupportedModelError, match="'qwen2'"):
        Tokenizer.from_gguf(write_gguf(tmp_path / "q.gguf", sd, n_tokens=300, pre="qwen2"))
