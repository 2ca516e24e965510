import numpy as np
import pytest

from pocketpeft.corpus import sender_split, top_senders
from pocketpeft.errors import InputTextError, ModelFileNotFoundError
from pocketpeft.text import IGNORE, pack_rows, read_text_file, validate_texts


def test_pack_rows_aligns_targets_and_pads(smollm2_tokenizer):
    tok = smollm2_tokenizer
    texts = ["hello there", "see you at the game tonight", "ok"]
    x, y = pack_rows(tok, texts, seq_len=8)
    stream = []
    for t in texts:
        stream += [tok.eos_id] + tok.encode(t)
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    n = len(stream) - 1
    assert list(flat_x[:n]) == stream[:-1] and list(flat_y[:n]) == stream[1:]
    assert (flat_y[n:] == IGNORE).all() and x.shape[1] == 8 and x.dtype == np.int64
    xf, yf = pack_rows(tok, texts, seq_len=8, pad_to_full=False)
    assert (yf != IGNORE).all() and len(xf) == n // 8


def test_read_text_file(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("one\n\n  \ntwo\n", encoding="utf-8")
    assert read_text_file(p) == ["one", "two"]
    p.write_bytes(b"ok\ncaf\xe9\n")
    with pytest.raises(InputTextError, match="not valid UTF-8"):
        read_text_file(p)
    p.write_bytes(b"\x7fELF\x00\x00binary")
    with pytest.raises(InputTextError, match="binary"):
        read_text_file(p)
    p.write_text("\n \n")
    with pytest.raises(InputTextError, match="empty"):
        read_text_file(p)
    with pytest.raises(ModelFileNotFoundError):
        read_text_file(tmp_path / "nope.txt")
    with pytest.raises(InputTextError, match="surrogate|UTF-8"):
        validate_texts(["bad \udcff"])


def test_chitchat_split_is_by_time():
    pytest.importorskip("chitchat_dataset")
    senders = top_senders(5000)
    assert len(senders) >= 10
    train, test = sender_split(senders[0])
    assert train and test and len(test) == pytest.approx(0.2 * (len(train) + len(test)), abs=1)
    from pocketpeft.corpus import chitchat_messages

    msgs = chitchat_messages()[senders[0]]
    assert msgs[len(train) - 1].timestamp <= msgs[len(train)].timestamp
