"""The SentencePiece (GGUF ``tokenizer.ggml.model == "llama"``) tokenizer: Gemma 3's vocabulary
against llama.cpp (and transformers), token bytes, persistence, the predictor's token index, and
metadata errors on tiny hand-built GGUFs."""

from __future__ import annotations

import math
import random
import time

import gguf
import numpy as np
import pytest

from pocketpeft.errors import CorruptFileError, ModelFileNotFoundError, UnsupportedModelError
from pocketpeft.tokenizer import Tokenizer

SPACE = "\u2581"

TEXTS = [
    "Hello, how are you doing today?",
    "hey!! u up? lol",
    "I'm fine, don't worry -- we'll see. It's OK; they've gone, you'd know.",
    "<start_of_turn>user\nCan you help me plan a trip to Lisbon?<end_of_turn>\n<start_of_turn>model\nSure! ",
    "<bos><start_of_turn>user\nhi<end_of_turn>\n<eos>",
    "  two leading spaces",
    "trailing spaces   ",
    " ",
    "",
    "a  b   c    d     e",
    " " * 31 + "x" + " " * 32 + "y" + " " * 70,  # runs longer than the longest space token
    "line one\nline two\n\n\nline five\r\nwindows line",
    "\ttabbed\t\tstuff  \n  \n" + "\n" * 40 + "end",
    "def f(x):\n    return x ** 2  # square\n",
    "12345 and 0.5, 1/3 = 0.333..., 1,000,000; call 555-0199 at 07:30",
    "Wait... what?! (yes) [no] {maybe} — “quoted” ‘single’ «guillemets» …",
    "Café crème brûlée, naïve façade, Ærøskøbing, Ångström, São Paulo, Zürich",
    "Привет, как дела? Γειά σου κόσμε. مرحبا بالعالم. שלום. नमस्ते दुनिया",
    "日本語のテキストと中文文本，한국어 텍스트",
    "emoji zoo: 😂😂 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🤖✨ 🫠 \U0001f9cc\U0002000b\U00010400",
    "e\u0301 (combining), zero\u200bwidth, nbsp\u00a0here, nul\x00byte, bell\x07",
    "ALL CAPS SHOUTING, MixedCase, camelCaseWord, snake_case_word",
    "<pad><eos><bos><unk><mask>[multimodal]<unused0><unused6241><start_of_image><end_of_image>",
    "<table><tr><td>cell</td></tr></table> <b>bold</b> <s>struck</s> <h1>title</h1>",
    "not special: <start_of_turn without closing, <0x41> spelled out, <unused>",
    "ab" * 60 + " " + "x" * 100,
]
#: the ids are llama.cpp's, but "▁" typed in the text reads back as a space
LITERAL_SPACE_MARK = [f"{SPACE}hello{SPACE}{SPACE}world {SPACE} x", SPACE * 3]


def _fuzz_texts(n: int, seed: int = 0) -> list[str]:
    rnd = random.Random(seed)
    alphabet = list("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,;:!?'\"-_()[]{}<>/\\@#$%^&*+=~`|\n\t")
    alphabet += list("éüßñçøå日本語中文한국어Привет مرحبا שלום ☃😂👍🏽🇫🇷\u200b\u00a0\u0301")
    pieces = ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<unk>", "<mask>", "<table>", "</b>", "<s>"]
    pieces += ["[multimodal]", "<unused7>", "<0x41>", "the", " the", " and", "ing", "tion"]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rnd.randint(0, 40)):
            r = rnd.random()
            if r < 0.1:
                parts.append(rnd.choice(pieces))
            elif r < 0.2:
                parts.append(" " * rnd.randint(1, 40))
            elif r < 0.25:
                parts.append("\n" * rnd.randint(1, 35))
            else:
                parts.append(rnd.choice(alphabet))
        out.append("".join(parts))
    return out


# ---- the real Gemma 3 vocabulary ------------------------------------------------------------
@pytest.fixture(scope="session")
def gemma_path():
    from pocketpeft.modelpkg import gemma3_270m_path

    try:
        return gemma3_270m_path()
    except ModelFileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def gemma_reader(gemma_path):
    from pocketpeft.formats.gguf import open_gguf

    return open_gguf(gemma_path)  # ~3 s: gguf parses 262k vocabulary strings


@pytest.fixture(scope="session")
def gemma_tokenizer(gemma_reader):
    return Tokenizer.from_gguf(gemma_reader)


@pytest.fixture(scope="session")
def gemma_llama_cpp(gemma_path):
    """llama.cpp's own tokenizer over the same file (the reference)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(gemma_path), vocab_only=True, verbose=False)


def _llama_ids(llm, text: str) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def test_gemma_known_ids(gemma_tokenizer):
    tk = gemma_tokenizer
    assert tk.spm and tk.vocab_size == 262144
    assert (tk.bos_id, tk.eos_id, tk.pad_id, tk.unk_id) == (2, 1, 0, 3)
    assert tk.encode("<start_of_turn>user\nhi<end_of_turn>") == [105, 2364, 107, 2202, 106]
    assert tk.encode("hello world\n") == [23391, 1902, 107]  # no prefix space (add_space_prefix false)
    assert tk.encode(" pocketpeft") == [19067, 635, 765]
    assert tk.encode("a  b") == [236746, 138, 236763]  # "  " is a user-defined token, kept whole
    assert tk.encode("hi", add_bos=True) == [2] + tk.encode("hi")
    assert tk.encode("") == []
    assert tk.decode(tk.encode("<start_of_turn>x<end_of_turn>"), skip_special_tokens=True) == "x"


def test_gemma_matches_llama_cpp(gemma_tokenizer, gemma_llama_cpp):
    tk = gemma_tokenizer
    for text in TEXTS + LITERAL_SPACE_MARK:
        ids = tk.encode(text)
        assert ids == _llama_ids(gemma_llama_cpp, text), text
        back = text.replace(SPACE, " ")
        assert tk.decode(ids) == back, text
        assert b"".join(tk.token_bytes(i) for i in ids) == back.encode("utf-8"), text


def test_gemma_matches_llama_cpp_on_random_text(gemma_tokenizer, gemma_llama_cpp):
    for text in _fuzz_texts(600):
        ids = gemma_tokenizer.encode(text)
        assert ids == _llama_ids(gemma_llama_cpp, text), repr(text)
        assert gemma_tokenizer.decode(ids) == text, repr(text)


@pytest.mark.slow
def test_gemma_matches_transformers(gemma_tokenizer, gemma_path):
    """transformers' GGUF Gemma tokenizer (an independent reading; ~20 s to build) agrees except
    where it departs from llama.cpp and SentencePiece by design: it respells the user-defined
    space-run tokens ("  ") as "▁▁" and leaves them to the BPE, so a "▁" typed in the text, or a
    run of more than 31 spaces, tokenizes differently there."""
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(str(gemma_path.parent), gguf_file=gemma_path.name)
    assert len(theirs) == gemma_tokenizer.vocab_size
    for text in TEXTS + _fuzz_texts(300, seed=1):
        if SPACE in text or " " * 32 in text:
            continue
        ids = gemma_tokenizer.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), repr(text)
        assert gemma_tokenizer.decode(ids) == theirs.decode(ids), repr(text)
    assert (gemma_tokenizer.bos_id, gemma_tokenizer.eos_id, gemma_tokenizer.pad_id, gemma_tokenizer.unk_id) == tuple(
        theirs.convert_tokens_to_ids(t)
        for t in (theirs.bos_token, theirs.eos_token, theirs.pad_token, theirs.unk_token)
    )


def test_gemma_token_bytes(gemma_tokenizer):
    tk = gemma_tokenizer
    assert tk.token_bytes(tk.token_to_id(SPACE)) == b" "
    assert tk.token_bytes(tk.token_to_id(f"{SPACE}world")) == b" world"
    assert tk.token_str(tk.token_to_id(f"{SPACE}world")) == " world"
    e2 = tk.token_to_id("<0xE2>")
    assert tk.token_bytes(e2) == b"\xe2" and tk.token_str(e2) == "\ufffd"  # one byte of a character
    assert tk.token_bytes(tk.token_to_id("<0x41>")) == b"A"
    assert tk.token_bytes(105) == b"<start_of_turn>"  # control tokens: their text
    assert tk.token_bytes(tk.token_to_id("\n")) == b"\n" and tk.token_bytes(138) == b"  "  # user-defined
    ids = tk.encode("\U0001f9cc x")  # no piece for U+1F9CC: byte fallback
    assert [tk.hf.id_to_token(i) for i in ids[:4]] == ["<0xF0>", "<0x9F>", "<0xA7>", "<0x8C>"]
    assert b"".join(tk.token_bytes(i) for i in ids) == "\U0001f9cc x".encode()


def test_gemma_build_is_fast(gemma_reader):
    t0 = time.perf_counter()
    Tokenizer.from_gguf(gemma_reader)
    assert time.perf_counter() - t0 < 15  # ~2 s on 2 shared cores; deriving merges naively takes minutes


def test_gemma_save_from_file_round_trip(gemma_tokenizer, tmp_path):
    tk = gemma_tokenizer
    tk.save(tmp_path)
    back = Tokenizer.from_file(tmp_path)
    assert back.to_json_str() == tk.to_json_str()
    assert back.spm
    assert (back.vocab_size, back.bos_id, back.eos_id, back.pad_id, back.unk_id) == (262144, 2, 1, 0, 3)
    for text in TEXTS:
        assert back.encode(text) == tk.encode(text), text
    for i in (0, 105, 138, 464, 1902, 236743, 262143):
        assert back.token_bytes(i) == tk.token_bytes(i)


def test_gemma_predictor_index(gemma_tokenizer):
    from pocketpeft.runtime.predictor.tokens import _vocab_of

    tk = gemma_tokenizer
    v = _vocab_of(tk)
    sample = range(0, tk.vocab_size, 997)
    assert [v.raw[i] for i in sample] == [tk.token_bytes(i) for i in sample]
    world, pe, nl, e2 = tk.token_to_id(f"{SPACE}world"), tk.token_to_id("pe"), 107, tk.token_to_id("<0xE2>")
    assert v.raw[world] == b" world" and v.word_start[world] and v.space_start[world]
    assert pe in set(v.cont_ids.tolist())  # continues a word
    boundary = set(v.boundary_ids.tolist())
    assert {world, nl, 105, 106, tk.eos_id} <= boundary and pe not in boundary and e2 not in boundary
    assert world in set(v.consistent(b" wor").tolist()) and pe not in set(v.consistent(b" wor").tolist())


class _BigramStub:
    """A backend whose next-token logits depend on the last token alone (all else at -30)."""

    def __init__(self, vocab_size: int, table: dict[int, dict[int, float]]) -> None:
        self.vocab_size, self.table = vocab_size, table

    def logits(self, input_ids):
        ids = np.asarray(input_ids)
        out = np.full((*ids.shape, self.vocab_size), -30.0, np.float32)
        for b, row in enumerate(ids):
            for t, tok in enumerate(row):
                for nxt, logit in self.table.get(int(tok), {}).items():
                    out[b, t, nxt] = logit
        return out


def test_gemma_predictor_suggests_words(gemma_tokenizer):
    from pocketpeft.runtime.predictor import Predictor

    tk = gemma_tokenizer
    (hello,) = tk.encode("hello")
    (world,), (there,) = tk.encode(" world"), tk.encode(" there")
    pocket, pe, ft = tk.encode(" pocketpeft")
    nl = tk.encode("\n")[0]
    table = {
        hello: {world: 6.0, pocket: 5.0, there: 4.0},
        pocket: {pe: 9.0},
        pe: {ft: 9.0},
        **{t: {nl: 9.0} for t in (world, there, ft)},
    }
    pred = Predictor(_BigramStub(tk.vocab_size, table), tk, background=False)
    assert pred.suggest("hello ", k=3) == ["world", "pocketpeft", "there"]
    assert pred.suggest("hello poc", k=1) == ["pocketpeft"]
    assert pred.suggest("hello Wor", k=1) == ["World"]


# ---- tiny hand-built SentencePiece GGUFs ----------------------------------------------------
_PIECES = [SPACE, "a", "b", "c", "h", "i", f"{SPACE}a", "ab", "bc", f"{SPACE}ab", "abc", f"{SPACE}abc", "hi"]
_PIECES += [f"{SPACE}hi", "ca", "cab", SPACE * 2]


def _tiny_vocab() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + _PIECES + ["<tool>", "\n"]
    scores = [0.0] * 259 + [-float(i) for i in range(len(_PIECES))] + [0.0, 0.0]
    types = [2, 3, 3] + [6] * 256 + [1] * len(_PIECES) + [4, 4]
    return tokens, scores, types


def write_spm_gguf(path, tokens=None, scores=None, types=None, *, model="llama", space_prefix=None, ids=None):
    """A vocabulary-only llama GGUF with a SentencePiece tokenizer (``None``: the tiny default;
    ``False`` for scores/types: leave the key out)."""
    t, s, ty = _tiny_vocab()
    tokens = t if tokens is None else tokens
    scores = s if scores is None else scores
    types = ty if types is None else types
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(1)
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    if scores is not False:
        w.add_token_scores(scores)
    if types is not False:
        w.add_token_types(types)
    for key, v in ({"bos": 1, "eos": 2, "unk": 0} if ids is None else ids).items():
        getattr(w, f"add_{key}_token_id")(v)
    if space_prefix is not None:
        w.add_add_space_prefix(space_prefix)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


TINY_TEXTS = ["abc", " abc hi", "x<tool>abc\nhi", "  abc", "ü", "<unk>", "<s>abc</s>", "cabcabc", "abcab", ""]
TINY_TEXTS += ["<tool>", "\n\n abc  ", "hi  hi   hi", "abc\n"]


@pytest.mark.parametrize("space_prefix", [None, False, True])
def test_tiny_matches_llama_cpp(tmp_path, space_prefix):
    """The prefix space (llama.cpp's default when the key is absent) goes before every text
    fragment, also after an added token; byte fallback for characters no piece covers."""
    llama_cpp = pytest.importorskip("llama_cpp")
    path = write_spm_gguf(tmp_path / "tiny.gguf", space_prefix=space_prefix)
    tk = Tokenizer.from_gguf(path)
    ref = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in TINY_TEXTS:
        assert tk.encode(text) == _llama_ids(ref, text), text
    prefix = space_prefix is not False
    assert tk.encode("abc") == [tk.token_to_id(f"{SPACE}abc" if prefix else "abc")]
    assert tk.decode(tk.encode("abc hi")) == "abc hi"  # the prefix space is not decoded back
    assert tk.token_bytes(tk.token_to_id(f"{SPACE}abc")) == b" abc"
    assert (tk.bos_id, tk.eos_id, tk.unk_id, tk.pad_id) == (1, 2, 0, None)


def test_tiny_special_ids_default_like_llama_cpp(tmp_path):
    tk = Tokenizer.from_gguf(write_spm_gguf(tmp_path / "t.gguf", ids={}))
    assert (tk.bos_id, tk.eos_id, tk.unk_id, tk.pad_id) == (1, 2, 0, None)


def test_tiny_errors(tmp_path):
    tokens, scores, types = _tiny_vocab()
    with pytest.raises(CorruptFileError, match="scores"):
        Tokenizer.from_gguf(write_spm_gguf(tmp_path / "noscores.gguf", scores=False))
    with pytest.raises(CorruptFileError, match="disagrees"):
        Tokenizer.from_gguf(write_spm_gguf(tmp_path / "short.gguf", scores=scores[:-1]))
    with pytest.raises(CorruptFileError, match="disagrees"):
        Tokenizer.from_gguf(write_spm_gguf(tmp_path / "types.gguf", types=types[:-2]))
    with pytest.raises(CorruptFileError, match="duplicate"):
        Tokenizer.from_gguf(write_spm_gguf(tmp_path / "dup.gguf", tokens=[*tokens[:-1], "abc"]))
    with pytest.raises(CorruptFileError, match="NaN"):
        Tokenizer.from_gguf(write_spm_gguf(tmp_path / "nan.gguf", scores=[*scores[:-1], math.nan]))
    with pytest.raises(CorruptFileError, match="bos_id"):
        Tokenizer.from_gguf(write_spm_gguf(tmp_path / "bos.gguf", ids={"bos": 100000}))
    with pytest.raises(UnsupportedModelError, match="'bert'.*'gpt2'.*'llama'"):
        Tokenizer.from_gguf(write_spm_gguf(tmp_path / "bert.gguf", model="bert"))
    # no token types: every token is normal (llama.cpp's reading too)
    tk = Tokenizer.from_gguf(write_spm_gguf(tmp_path / "notypes.gguf", types=False))
    assert tk.encode("abc") == [tokens.index(f"{SPACE}abc")]


def test_tiny_save_from_file_round_trip(tmp_path):
    tk = Tokenizer.from_gguf(write_spm_gguf(tmp_path / "t.gguf", space_prefix=True))
    back = Tokenizer.from_file(tk.save(tmp_path / "tok"))
    assert back.spm and back.to_json_str() == tk.to_json_str()
    for text in TINY_TEXTS:
        assert back.encode(text) == tk.encode(text)
        assert back.decode(back.encode(text)) == tk.decode(tk.encode(text))
