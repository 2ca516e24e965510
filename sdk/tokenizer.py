"""The base model's tokenizer: a ``tokenizers.Tokenizer`` plus its special token ids.

Built from an HF ``tokenizer.json`` or from the vocabulary a GGUF file carries as metadata.
For a ``gpt2`` GGUF we rebuild the byte-level BPE that the model's own ``tokenizer.json``
describes, so that ids match the original Hugging Face tokenizer (and llama.cpp) token for token.
For a ``llama`` (SentencePiece) GGUF we rebuild llama.cpp's SPM tokenizer as a byte-fallback BPE
whose merges come from the vocabulary and its scores (see :func:`_spm_merges`).
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer

from .errors import CorruptFileError, InputTextError, ModelFileNotFoundError, UnsupportedModelError
from .fsutil import read_json

_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4  # llama.cpp token types

#: GGUF ``tokenizer.ggml.model`` values we can build
SUPPORTED_GGUF_TOKENIZERS = {"gpt2": "byte-level BPE", "llama": "SentencePiece BPE"}

_SPACE = "\u2581"  # SentencePiece's "▁": a space inside a piece
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte-fallback piece

# llama.cpp's LLAMA3 pre-tokenizer regex (also in Meta's tokenizer.json).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(use_regex: bool = True) -> pre_tokenizers.ByteLevel:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


# tokenizer.ggml.pre -> (pre-tokenizer factory, BPE ignore_merges). "smollm"/"starcoder" split
# every digit first (HF: Digits(individual_digits) then GPT-2 ByteLevel; llama.cpp: "\p{N}" then
# the GPT-2 regex); without that, "  42" would tokenize differently.
_PRE_TOKENIZERS = {
    "smollm": (lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level()]), False),
    "gpt-2": (_byte_level, False),
    "llama-bpe": (
        lambda: pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), "isolated"), _byte_level(use_regex=False)]
        ),
        True,
    ),
}
_PRE_TOKENIZERS["starcoder"] = _PRE_TOKENIZERS["smollm"]
_PRE_TOKENIZERS["llama3"] = _PRE_TOKENIZERS["llama-v3"] = _PRE_TOKENIZERS["llama-bpe"]


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@functools.lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in _bytes_to_unicode().items()}


def _spm_piece_bytes(piece: str) -> bytes:
    """The bytes a SentencePiece piece stands for: ``<0xE2>`` is the single byte 0xE2, "▁" a space."""
    m = _BYTE_PIECE.fullmatch(piece)
    if m is not None:
        return bytes([int(m.group(1), 16)])
    return piece.replace(_SPACE, " ").encode("utf-8")


def _spm_merges(tokens: list[str], scores: list[float], skip: set[int]) -> list[tuple[str, str]]:
    """BPE merges that make a byte-fallback BPE tokenize as llama.cpp's SPM tokenizer does.

    SPM repeatedly merges the adjacent pair whose concatenation is the highest-scoring token. So
    every split ``(left, right)`` of a token into two tokens is a merge, ranked by the token's score
    (best first; a token's splits by where they cut). Tokens in ``skip`` (added tokens: cut out
    of the text before the model sees it) are never built by merges. Two corners a rank can't
    reproduce: SPM breaks a tie between equal scores by position, and it can merge a character
    that is no token (here: byte tokens, which don't merge). Neither occurs in Gemma's vocabulary
    (distinct scores for normal tokens; the one character that is no token is " ", written "▁").
    """
    vocab = set(tokens)
    order = sorted((i for i, t in enumerate(tokens) if len(t) > 1 and i not in skip), key=lambda i: (-scores[i], i))
    merges = []
    for i in order:
        t = tokens[i]
        for k in range(1, len(t)):
            left = t[:k]
            if left in vocab:
                right = t[k:]
                if right in vocab:
                    merges.append((left, right))
    return merges


def _special_content(v: Any) -> str | None:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with the model's special ids.

    Attributes: ``vocab_size`` (including added tokens), ``bos_id``, ``eos_id``, ``pad_id``,
    ``unk_id`` (ints or ``None``), ``hf`` (the wrapped ``tokenizers.Tokenizer``) and ``spm``
    (a byte-fallback BPE with SentencePiece spelling: "▁" for a space, ``<0xXX>`` byte pieces).
    """

    def __init__(
        self,
        hf: _HFTokenizer,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        unk_id: int | None = None,
    ) -> None:
        """Wrap ``hf``; raise :class:`CorruptFileError` when a special id is outside the vocabulary."""
        self.hf = hf
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        for name, v in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id), ("unk_id", unk_id)):
            if v is not None and not (isinstance(v, int) and 0 <= v < self.vocab_size):
                raise CorruptFileError(f"tokenizer {name}={v!r} is outside the vocabulary of {self.vocab_size}")
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        model = hf.model
        #: SentencePiece conventions: pieces spell a space "▁", ``<0xXX>`` pieces are single bytes
        self.spm = isinstance(model, models.BPE) and bool(model.byte_fallback)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_file(
        cls, path: str | os.PathLike, bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None
    ) -> "Tokenizer":
        """Read a ``tokenizer.json`` (or the one inside folder ``path``).

        Special ids come from the arguments, else ``tokenizer_config.json`` next to it (token
        strings, as HF and :meth:`save` write them), else ``config.json`` (``*_token_id``).
        Raises :class:`ModelFileNotFoundError` if missing, :class:`CorruptFileError` if unparsable.
        """
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise ModelFileNotFoundError(f"tokenizer file {p} does not exist")
        try:
            hf = _HFTokenizer.from_str(p.read_text(encoding="utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception; also UnicodeDecodeError
            raise CorruptFileError(f"cannot parse tokenizer file {p}: {e}") from e
        ids: dict[str, int | None] = {"bos": bos_id, "eos": eos_id, "pad": pad_id, "unk": None}
        tcfg, mcfg = (read_json(p.parent / n) for n in ("tokenizer_config.json", "config.json"))
        for k in ids:
            if ids[k] is None:
                content = _special_content(tcfg.get(f"{k}_token"))
                ids[k] = hf.token_to_id(content) if content is not None else None
            if ids[k] is None and isinstance(mcfg.get(f"{k}_token_id"), (int, list)):
                v = mcfg[f"{k}_token_id"]
                ids[k] = (v[0] if v else None) if isinstance(v, list) else v
        return cls(hf, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"], unk_id=ids["unk"])

    @classmethod
    def from_gguf(cls, reader_or_path: Any) -> "Tokenizer":
        """Build the tokenizer a GGUF file describes (a ``gguf.GGUFReader`` or a path).

        Supports ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE) with pre-tokenizers
        ``smollm``, ``starcoder``, ``gpt-2`` and ``llama-bpe``, and ``"llama"`` (SentencePiece
        BPE with scores and byte fallback, as Gemma and Llama 2 ship it; ids match llama.cpp's
        SPM tokenizer). Raises :class:`UnsupportedModelError` naming any other tokenizer model or
        pre-tokenizer, :class:`CorruptFileError` when the metadata is missing or inconsistent.
        """
        from .formats.gguf import gguf_field, open_gguf

        reader = open_gguf(reader_or_path) if isinstance(reader_or_path, (str, os.PathLike)) else reader_or_path
        kind = gguf_field(reader, "tokenizer.ggml.model")
        if kind == "llama":
            return cls._from_spm_gguf(reader)
        if kind != "gpt2":
            supported = ", ".join(f"{k!r} ({v})" for k, v in SUPPORTED_GGUF_TOKENIZERS.items())
            raise UnsupportedModelError(f"GGUF tokenizer model {kind!r} is not supported; supported: {supported}")
        pre = gguf_field(reader, "tokenizer.ggml.pre", "gpt-2")
        if pre not in _PRE_TOKENIZERS:
            raise UnsupportedModelError(
                f"GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(sorted(_PRE_TOKENIZERS))}"
            )
        tokens, merges = gguf_field(reader, "tokenizer.ggml.tokens"), gguf_field(reader, "tokenizer.ggml.merges")
        if not tokens or not merges:
            raise CorruptFileError("GGUF has a gpt2 tokenizer without tokenizer.ggml.tokens / tokenizer.ggml.merges")
        types = gguf_field(reader, "tokenizer.ggml.token_type", None) or [1] * len(tokens)
        b2u = _bytes_to_unicode()
        alphabet = set(b2u.values())
        # A few converters store added tokens as raw text: respell those in the byte alphabet.
        spelled = [t if set(t) <= alphabet else "".join(b2u[b] for b in t.encode("utf-8")) for t in tokens]
        vocab = {t: i for i, t in enumerate(spelled)}
        if len(vocab) != len(spelled):
            raise CorruptFileError("GGUF tokenizer.ggml.tokens has duplicate tokens")
        pairs = [tuple(m.split(" ")) for m in merges]
        if any(len(pr) != 2 for pr in pairs):
            raise CorruptFileError("GGUF tokenizer.ggml.merges has an entry that is not 'left right'")
        make_pre, ignore_merges = _PRE_TOKENIZERS[pre]
        hf = _HFTokenizer(
            models.BPE(vocab, pairs, unk_token=None, fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges)
        )
        hf.pre_tokenizer = make_pre()
        hf.decoder = decoders.ByteLevel()
        hf.post_processor = processors.ByteLevel(trim_offsets=False)
        # Control tokens stay whole and are skippable; one not spelled in the byte alphabet would
        # get a new id past the embedding, so it is left to the BPE (as transformers does).
        hf.add_special_tokens(
            [
                AddedToken(t, special=True, normalized=False)
                for t, ty in zip(tokens, types)
                if ty == _CONTROL and set(t) <= alphabet
            ]
        )
        hf.add_tokens(
            [
                AddedToken(t, special=False, normalized=False)
                for t, ty in zip(tokens, types)
                if ty == _USER_DEFINED and t in vocab
            ]
        )
        ids = {
            k: gguf_field(reader, f"tokenizer.ggml.{k}", None)
            for k in ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id")
        }
        return cls(
            hf,
            bos_id=ids["bos_token_id"],
            eos_id=ids["eos_token_id"],
            pad_id=ids["padding_token_id"],
            unk_id=ids["unknown_token_id"],
        )

    @classmethod
    def _from_spm_gguf(cls, reader: Any) -> "Tokenizer":
        """The ``tokenizer.ggml.model == "llama"`` tokenizer: llama.cpp's SPM as a ``tokenizers`` BPE.

        llama.cpp first cuts control, unknown and user-defined tokens out of the text (here: added
        tokens, ``normalized=False``), then, per remaining fragment, writes spaces as "▁" (after a
        leading space when ``tokenizer.ggml.add_space_prefix``, default true), and merges the
        adjacent pair whose concatenation is the highest-scoring token, leftmost first, until no
        pair is a token; a character no token covers becomes its ``<0xXX>`` byte tokens.
        """
        from .formats.gguf import gguf_field

        tokens = gguf_field(reader, "tokenizer.ggml.tokens", None)
        scores = gguf_field(reader, "tokenizer.ggml.scores", None)
        if not tokens or not scores:
            raise CorruptFileError(
                "GGUF has a llama (SentencePiece) tokenizer without tokenizer.ggml.tokens / tokenizer.ggml.scores"
            )
        types = gguf_field(reader, "tokenizer.ggml.token_type", None) or [1] * len(tokens)
        if not (len(tokens) == len(scores) == len(types)):
            raise CorruptFileError(
                f"GGUF tokenizer metadata disagrees: {len(tokens)} tokens, {len(scores)} scores, {len(types)} token types"
            )
        if any(x != x for x in scores):
            raise CorruptFileError("GGUF tokenizer.ggml.scores has NaN scores")
        vocab = {t: i for i, t in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise CorruptFileError("GGUF tokenizer.ggml.tokens has duplicate tokens")
        added = {i for i, ty in enumerate(types) if ty in (_UNKNOWN, _CONTROL, _USER_DEFINED)}
        missing = {"bos_token_id": 1, "eos_token_id": 2, "unknown_token_id": 0}  # llama.cpp's SPM defaults
        ids = {
            k: gguf_field(reader, f"tokenizer.ggml.{k}", missing.get(k))
            for k in ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id")
        }
        unk = ids["unknown_token_id"]
        unk_token = tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None
        hf = _HFTokenizer(
            models.BPE(
                vocab, _spm_merges(tokens, scores, added), unk_token=unk_token, fuse_unk=True, byte_fallback=True
            )
        )
        replace = normalizers.Replace(" ", _SPACE)
        decode = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        if gguf_field(reader, "tokenizer.ggml.add_space_prefix", True):  # llama.cpp's default for SPM
            # Normalizers run on each fragment between added tokens: a space before each, as llama.cpp does.
            hf.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE), replace])
            decode.append(decoders.Strip(" ", 1, 0))
        else:
            hf.normalizer = replace
        hf.decoder = decoders.Sequence(decode)
        hf.add_special_tokens(
            [
                AddedToken(t, special=True, normalized=False)
                for t, ty in zip(tokens, types)
                if ty in (_UNKNOWN, _CONTROL)
            ]
        )
        hf.add_tokens(
            [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
        )
        return cls(
            hf,
            bos_id=ids["bos_token_id"],
            eos_id=ids["eos_token_id"],
            pad_id=ids["padding_token_id"],
            unk_id=unk,
        )

    # ---- use ------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text`` (special tokens written in the text, like ``<|im_start|>``, are
        recognised), with ``bos_id`` first when ``add_bos``. Accepts UTF-8 ``bytes`` too.

        Raises :class:`InputTextError` for non-text input or text that is not valid UTF-8.
        """
        from pocketpeft.text import as_text

        text = as_text(text)
        ids = self.hf.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise InputTextError("add_bos=True but this tokenizer has no BOS token")
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (invalid UTF-8 becomes U+FFFD). Raises :class:`InputTextError` for an id
        outside the vocabulary or a non-integer."""
        return self.hf.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)

    def token_str(self, id: int) -> str:
        """The text piece of one token as it appears in decoded output (``" hello"``, not
        ``"Ġhello"``; a partial UTF-8 character becomes U+FFFD). Raises :class:`InputTextError`."""
        return self.token_bytes(id).decode("utf-8", errors="replace")

    def token_bytes(self, id: int) -> bytes:
        """The exact bytes one token stands for. Raises :class:`InputTextError` for a bad id."""
        (i,) = self._check_ids([id])
        piece = self.hf.id_to_token(i)
        u2b = _unicode_to_bytes()
        if isinstance(self.hf.decoder, decoders.ByteLevel) and all(c in u2b for c in piece):
            return bytes(u2b[c] for c in piece)
        if self.spm:
            return _spm_piece_bytes(piece)
        return self.hf.decode([i], skip_special_tokens=False).encode("utf-8")

    def token_to_id(self, piece: str) -> int | None:
        """The id of a vocabulary entry spelled as stored (``"<|im_end|>"``, ``"Ġhello"``), or None."""
        return self.hf.token_to_id(piece)

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        if hasattr(ids, "tolist"):  # torch / numpy
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        out = []
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size:
                raise InputTextError(f"token id {i!r} is not an integer in [0, {self.vocab_size})")
            out.append(i)
        return out

    # ---- persistence ----------------------------------------------------------------------
    def to_json_str(self) -> str:
        """The ``tokenizer.json`` text (special ids are not part of it; see :meth:`save`)."""
        return self.hf.to_str(pretty=False)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` at ``path`` (or inside folder ``path``) and the special tokens
        into ``tokenizer_config.json`` beside it (merged into an existing one), so that
        :meth:`from_file` reads back the same tokenizer. Returns the tokenizer.json path."""
        from .fsutil import write_bytes_atomic

        p = Path(path)
        if p.is_dir() or not p.suffix:
            p = p / "tokenizer.json"
        write_bytes_atomic(p, self.to_json_str().encode("utf-8"))
        cfg_path = p.parent / "tokenizer_config.json"
        cfg = read_json(cfg_path)
        for k, v in (("bos", self.bos_id), ("eos", self.eos_id), ("pad", self.pad_id), ("unk", self.unk_id)):
            cfg[f"{k}_token"] = self.hf.id_to_token(v) if v is not None else None
        cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        write_bytes_atomic(cfg_path, (json.dumps(cfg, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
        return p

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id})"
        )
