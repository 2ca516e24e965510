"""Keyboard suggestions (runtime/predictor.py) and keystroke metrics (runtime/keystrokes.py).

The probabilities are checked against full-sequence ``Session.logits`` (no KV cache, no memo,
no search); the metric arithmetic against a stub whose answers are known.
"""

import copy
import math
import time
import unicodedata

import numpy as np
import pytest
import torch

import pocketpeft as pp
from pocketpeft.errors import ConfigError, InputTextError
from pocketpeft.runtime import TrainConfig
from pocketpeft.runtime.keystrokes import keystroke_metrics, message_words
from pocketpeft.runtime.predictor import Predictor

MESSAGES = ["see you at the game tonight", "i don't know what time it starts"]
PROBES = ["", "see you at the ", "see you at the g", "i don't know what t"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Single-token decoding of the tiny model is all overhead; on a shared 2-core box two
    OpenMP threads fight other processes and run several times slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bundle(tiny_hf_model, smollm2_tokenizer, tmp_path_factory):
    """The tiny random model with its (tied) embeddings scaled by 8: the unscaled one predicts an
    almost uniform distribution (logits are capped by the final norm) that LoRA can barely move."""
    model = copy.deepcopy(tiny_hf_model)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(8.0)
    d = tmp_path_factory.mktemp("peaked")
    model.save_pretrained(d / "hf", safe_serialization=True)
    smollm2_tokenizer.save(d / "hf" / "tokenizer.json")
    return pp.export(
        d / "hf", d / "bundle", quant="q4_0", lora=pp.LoraConfig(r=4, lora_alpha=8), seq_len=32, batch_size=4
    )


@pytest.fixture(scope="module")
def base(bundle):
    return pp.runtime.open(bundle, backend="torch")


@pytest.fixture(scope="module")
def trained(bundle):
    """A session that suggested before a short, strong LoRA update on MESSAGES, and the
    suggestions it gave then."""
    sess = pp.runtime.open(bundle, backend="torch", train_config=TrainConfig(lr=3e-2, warmup_steps=0))
    before = {p: sess.suggest(p) for p in PROBES}
    sess.train(MESSAGES * 4, steps=20)
    return sess, before


@pytest.fixture(scope="module")
def boundary(base):
    """Ids of tokens that end a word, defined here from the decoded token text."""
    tok = base.tokenizer
    special = {i for i, t in tok.hf.get_added_tokens_decoder().items() if t.special}
    out = []
    for i in range(tok.vocab_size):
        s = tok.token_str(i)
        if i in special or (
            s
            and (
                s[0].isspace()
                or not (s[0].isalnum() or s[0] in "'\u2019\ufffd" or unicodedata.category(s[0]).startswith("M"))
            )
        ):
            out.append(i)
    return np.array(out)


def _log_softmax(x):
    x = x.astype(np.float64)
    return x - (x.max(-1, keepdims=True) + np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)))


def reference_probs(sess, boundary, context_text, words, casings=True):
    """{word: P(word, then a word boundary | the message so far)} along each word's own
    tokenization, from full-sequence logits (no KV cache), summed over lower / Capitalized /
    UPPER spellings if ``casings``. Sequences are right-padded and batched (causal: padding after a
    sequence doesn't change its logits); ``Session.logits`` is this call for one sequence."""
    tok = sess.tokenizer
    ctx = [tok.eos_id] + (tok.encode(context_text) if context_text else [])
    rows = [
        (w, ctx + tok.encode((" " if context_text else "") + sp))
        for w in words
        for sp in ({w.lower(), w.capitalize(), w.upper()} if casings else {w})
    ]
    out = dict.fromkeys(words, 0.0)
    for s in range(0, len(rows), 16):
        chunk = rows[s : s + 16]
        width = max(len(ids) for _, ids in chunk)
        batch = np.array([ids + [tok.eos_id] * (width - len(ids)) for _, ids in chunk], np.int64)
        logits = sess.backend.logits(batch)
        for (w, ids), lg in zip(chunk, logits):
            lp = _log_softmax(lg[: len(ids)])
            path = sum(lp[len(ctx) - 1 + j, t] for j, t in enumerate(ids[len(ctx) :]))
            out[w] += math.exp(path) * np.exp(lp[-1, boundary]).sum()
    return out


def reference_prob(sess, boundary, context_text, word, casings=True):
    return reference_probs(sess, boundary, context_text, [word], casings)[word]


class CountingDecoder:
    """Wraps a Decoder, recording how many tokens each extend ran and where it started."""

    def __init__(self, inner, log):
        self.inner, self.log = inner, log

    @property
    def n_tokens(self):
        return self.inner.n_tokens

    def extend(self, ids):
        self.log.append((self.inner.n_tokens, len(ids)))
        return self.inner.extend(ids)

    def truncate(self, n):
        self.inner.truncate(n)


def counting(monkeypatch, sess):
    log = []
    make = sess.backend.decoder
    monkeypatch.setattr(sess.backend, "decoder", lambda: CountingDecoder(make(), log))
    return log


# ---------------------------------------------------------------------------------------------


def test_suggestions_complete_the_typed_word(base):
    pred = Predictor(base.backend, base.tokenizer)
    cases = [
        ("", ""),
        ("see you at the ", ""),
        ("see you at the g", "g"),
        ("i do", "do"),
        ("i don'", "don'"),
        ("See", "See"),
        ("ok SE", "SE"),
        ("hi\nwha", "wha"),
    ]
    for prefix, partial in cases:
        for k in (1, 3, 5):
            out = pred.suggest(prefix, k)
            assert 1 <= len(out) <= k, (prefix, k, out)
            assert len({w.lower() for w in out}) == len(out), out
            for w in out:
                assert w.lower().startswith(partial.lower()), (prefix, out)
                assert any(c.isalnum() for c in w) and all(c.isalnum() or c == "'" for c in w), (prefix, out)
                if partial[:1].isupper():
                    assert w[0].isupper(), (prefix, out)
                if len(partial) > 1 and partial.isupper():
                    assert w == w.upper(), (prefix, out)
        assert pred.suggest(prefix, 3)[:1] == pred.suggest(prefix, 1)


def test_probabilities_match_full_sequence_logits(base, boundary):
    pred = Predictor(base.backend, base.tokenizer, max_forwards=64)
    for prefix in ["", "see you at the ", "see you at the g", "i don't know what t"]:
        scored = pred.suggest_scored(prefix, 3)
        context_text = prefix[: len(prefix) - len(prefix.split(" ")[-1])].rstrip()
        assert [p for _, p in scored] == sorted((p for _, p in scored), reverse=True)
        for word, p in scored:
            # at least the returned spelling's own path; at most every casing (plus rare tokenizations)
            lo = reference_prob(base, boundary, context_text, word, casings=False)
            hi = reference_prob(base, boundary, context_text, word)
            assert lo * (1 - 1e-3) <= p <= hi * 1.05, (prefix, word, p, lo, hi)
        # exactness: no single-token word among the 30 likeliest next tokens beats the top suggestion
        ctx = [base.tokenizer.eos_id] + (base.tokenizer.encode(context_text) if context_text else [])
        lp = _log_softmax(base.logits(ctx))[-1]
        typed = prefix.split(" ")[-1]
        singles = []
        for t in np.argsort(-lp)[:30]:
            s = base.tokenizer.token_str(int(t))
            w = s[1:] if context_text and s.startswith(" ") else s
            if (s.startswith(" ") == bool(context_text)) and w.isalpha() and w.lower().startswith(typed):
                singles.append(w)
        for w, p in reference_probs(base, boundary, context_text, singles, casings=False).items():
            assert p <= scored[0][1] * (1 + 1e-3), (prefix, w, p, scored)


def test_incremental_typing_matches_a_fresh_predictor(trained):
    sess, _ = trained
    inc = Predictor(sess.backend, sess.tokenizer, max_forwards=64)
    for msg in MESSAGES:
        for i in range(len(msg) + 1):
            a = inc.suggest_scored(msg[:i], 3)
            if i % 2 and i != len(msg):
                continue  # every keystroke typed, every other one checked
            b = Predictor(sess.backend, sess.tokenizer, max_forwards=64).suggest_scored(msg[:i], 3)
            wa, wb = [w for w, _ in a], [w for w, _ in b]
            pa, pb = [p for _, p in a], [p for _, p in b]
            assert wa == wb or np.allclose(pa, pb, rtol=1e-4), (msg[:i], a, b)  # only a near-tie may reorder
            np.testing.assert_allclose(pa, pb, rtol=1e-3)


def test_next_keystroke_reuses_the_cache(trained, monkeypatch):
    sess, _ = trained
    log = counting(monkeypatch, sess)
    pred = Predictor(sess.backend, sess.tokenizer)
    pred.suggest("see you at the ga")
    first = sum(n for _, n in log)
    assert first >= 5  # eos see you at the, at least once
    del log[:]
    pred.suggest("see you at the gam")
    second = sum(n for _, n in log)
    assert second == pred.last_forward_tokens and second <= 2 * 3 and second < first, (first, second)
    pred.suggest("see you at the gam")
    assert pred.last_forward_tokens == 0  # the same keystroke again: all memoized
    msg = MESSAGES[0]
    for i in range(len("see you at the gam") + 1, len(msg) + 1):
        pred.suggest(msg[:i])
    # the context is never recomputed: every extend starts at or after "eos see you at the"
    assert min(start for start, _ in log) >= 5
    assert max(n for _, n in log) <= pred.max_word_tokens + 1


def test_prefetch_answers_next_keystrokes_without_forwards(trained):
    """Idle-time prefetch fills the memo: the keystrokes it foresaw then need no forward pass,
    and their suggestions equal a fresh predictor's (no budget cut either way)."""
    sess, _ = trained
    pred = Predictor(sess.backend, sess.tokenizer, max_forwards=64)
    typed = "see you at the g"
    pred.suggest(typed)
    assert pred.prefetch(typed, seconds=0.0) == 0 and pred.last_forwards > 0  # no idle time: no work
    ran = pred.prefetch(typed, seconds=60.0, width=3)
    assert ran > 0
    foreseen = [typed + w[1] for w in pred.suggest(typed, 3) if len(w) > 1]
    assert foreseen
    for text in foreseen:
        got = pred.suggest_scored(text, 3)
        assert pred.last_forwards == 0, text
        ref = Predictor(sess.backend, sess.tokenizer, max_forwards=64).suggest_scored(text, 3)
        assert [w for w, _ in got] == [w for w, _ in ref]
        np.testing.assert_allclose([p for _, p in got], [p for _, p in ref], rtol=1e-4)
    with pytest.raises(ConfigError, match="seconds"):
        pred.prefetch(typed, seconds=-1)


def test_training_personalizes_and_invalidates_the_cache(trained):
    sess, before = trained
    after = {p: sess.suggest(p) for p in PROBES}
    assert after != before  # adapter_version moved: caches dropped
    fresh = Predictor(sess.backend, sess.tokenizer)
    assert after == {p: fresh.suggest(p) for p in PROBES}
    assert after["see you at the g"][0] == "game" and "game" not in before["see you at the g"]
    assert after["i don't know what t"][0] == "time" and "time" not in before["i don't know what t"]
    assert "game" in after["see you at the "] and "game" not in before["see you at the "]


def test_adapter_swap_and_reset_invalidate(bundle, trained):
    tsess, _ = trained
    sess = pp.runtime.open(bundle, backend="torch")
    p0 = sess.suggest("see you at the g")
    sess.set_adapter_tensors(tsess.get_adapter_tensors())
    assert sess.suggest("see you at the g") == tsess.suggest("see you at the g")
    sess.reset_adapter()
    assert sess.suggest("see you at the g") == p0


def test_eval_keystrokes_agrees_with_brute_force(trained, boundary):
    sess, _ = trained
    res = sess.eval_keystrokes(MESSAGES, k=3)
    positions = [(m, s, w) for m in MESSAGES for s, w, _ in message_words(m)]
    assert res["words"] == len(positions) == 13 and res["messages"] == 2
    assert res["chars"] == sum(map(len, MESSAGES))
    assert 0 <= res["next_word_top1"] <= res["next_word_top3"] <= 1
    assert 0 < res["keystroke_savings"] < 1
    vocab = {w.lower() for _, _, w in positions}
    hits = 0
    for msg, start, word in positions:
        context_text = msg[:start].rstrip()
        cands = sorted(vocab | {w.lower() for w in sess.suggest(msg[:start], 3)})
        probs = reference_probs(sess, boundary, context_text, cands, casings=False)
        best = max(probs, key=probs.get)
        hits += best == word.lower()
    assert hits > 0 and res["next_word_top1"] == pytest.approx(hits / len(positions))


def test_keystroke_metrics_arithmetic():
    answers = {
        "": ["hello", "hi", "hey"],
        "hello ": ["there", "you", "we"],
        "hello w": ["world"],
        "ok, ": ["see", "so", "sure"],
        "ok, see ": ["u", "ya", "you"],
        "o": ["ok"],
    }
    calls = []

    def stub(prefix, k):
        calls.append((prefix, k))
        return answers.get(prefix, [])[:k]

    res = keystroke_metrics(stub, ["hello   world", "ok, see you!", " :) "], k=3)
    # hello: tapped at once (5 + space - tap); world: tapped after "w" (4 - tap); ok: tapped after
    # "o" but no space follows ("ok,"): 0; see: 3 + space - tap; you: 3 - tap ("you!"); ":)" no word
    assert res == {
        "next_word_top1": 2 / 5,
        "next_word_top3": 3 / 5,
        "keystroke_savings": 13 / 25,
        "words": 5,
        "chars": 11 + 12 + 2,
        "messages": 3,
    }
    assert ("", 3) in calls and ("hello w", 3) in calls
    calls.clear()
    res1 = keystroke_metrics(stub, ["ok, see you!"], k=1)
    assert ("ok, see ", 3) in calls and ("ok, see y", 1) in calls  # word starts ask for 3 (top-3)
    assert res1["keystroke_savings"] == 3 / 12 and res1["next_word_top3"] == 2 / 3
    assert message_words("ok :) bye-bye 6!") == [(0, "ok", True), (6, "bye", False), (14, "6", False)]
    assert keystroke_metrics(stub, ["a b", "c d", "e f"], max_messages=2)["messages"] == 2


def test_bad_input(base):
    pred = Predictor(base.backend, base.tokenizer)
    for bad in (None, 123, b"\xff\xfe", "\udcff", ["hi"]):
        with pytest.raises(InputTextError):
            pred.suggest(bad)
        with pytest.raises(InputTextError):
            base.suggest(bad)
    for k in (0, -1, True, "3", 2.0):
        with pytest.raises(ConfigError):
            base.suggest("hi", k=k)
    assert pred.suggest(b"see you at the g") == pred.suggest("see you at the g")
    with pytest.raises(InputTextError):
        base.eval_keystrokes([])
    with pytest.raises(ConfigError):
        base.eval_keystrokes(["hi there"], max_messages=0)
    for opts in ({"beam_width": 0}, {"max_word_tokens": 0}, {"max_context": 3}, {"min_ratio": 1.5}):
        with pytest.raises(ConfigError):
            Predictor(base.backend, base.tokenizer, **opts)


def test_long_prefix_is_trimmed_to_the_last_words(base, monkeypatch):
    log = counting(monkeypatch, base)
    pred = Predictor(base.backend, base.tokenizer, max_context=48)
    budget = 48 - pred.max_word_tokens - 1
    for reps in (12, 40):  # ~90 tokens; ~1100 characters (pre-cut)
        out = pred.suggest("see you at the game tonight " * reps + "ga", 3)
        assert pred.last_trimmed and out and all(w.lower().startswith("ga") for w in out)
        assert max(start + n for start, n in log) <= 48
    first = [n for start, n in log if start == 0]  # each trimmed context, run once
    assert first and all(n <= budget for n in first)
    assert len(base.tokenizer.encode("see you at the game tonight " * 12)) > budget
    pred.suggest("see you at the ga")
    assert not pred.last_trimmed
    sess = pp.runtime.open(base.bundle, backend="torch", need_train=False)
    assert len(sess.suggest("tonight " * 3000 + "see you at the ga")) >= 1  # beyond the 2048 context
    assert sess._predictor.last_trimmed


@pytest.mark.slow
def test_smollm2_suggests_plausible_words(tmp_path):
    bundle = pp.export("smollm2", tmp_path / "bundle", quant="q4_0", targets=["torch"])
    sess = pp.runtime.open(bundle, backend="torch", need_train=False)
    completions = sess.suggest("see you at the", k=3)  # "the" is still being typed
    assert len(completions) == 3 and all(w.startswith("the") for w in completions), completions
    pred = sess._predictor
    scored = pred.suggest_scored("see you at the ", k=3)  # the next word
    assert len(scored) == 3 and all(w.isalpha() and w.islower() and p > 1e-3 for w, p in scored), scored
    lat = []
    for msg in ["see you at the game tonight", "sorry to cut this short, good luck"]:
        for i in range(len(msg) + 1):
            t = time.perf_counter()
            sess.suggest(msg[:i])
            lat.append(time.perf_counter() - t)
    print(
        f"\nsuggest('see you at the') = {completions}; next word: {scored}\n"
        f"per-keystroke latency over {len(lat)} keystrokes: p50 {np.median(lat) * 1e3:.0f} ms, "
        f"p95 {np.percentile(lat, 95) * 1e3:.0f} ms (torch {torch.get_num_threads()} threads)"
    )


def test_adapter_version_moves_with_every_weight_change(bundle, tmp_path):
    sess = pp.runtime.open(bundle, backend="torch")
    train_step = type(sess.backend).train_step
    sess.suggest("see you")
    assert sess.backend.train_step.__func__ is train_step  # no monkeypatched verbs
    v = sess.adapter_version
    sess.train(MESSAGES, steps=2)
    assert sess.adapter_version == v + 2
    sess.save_adapter(tmp_path / "ad")
    sess.set_adapter_tensors(sess.get_adapter_tensors())
    sess.reset_adapter()
    sess.load_adapter(tmp_path / "ad")
    assert sess.adapter_version == v + 5


def test_backend_without_decoder_gets_the_recompute_decoder(base):
    from pocketpeft.runtime.predictor import RecomputeDecoder
    from pocketpeft.runtime.protocol import SupportsBranchLogits, SupportsDecoder

    class NoDecoder:
        name, device = "nodecoder", "cpu"

        def logits(self, ids):
            return base.backend.logits(ids)

    nd = NoDecoder()
    assert isinstance(base.backend, SupportsDecoder) and not isinstance(nd, SupportsDecoder)
    assert not isinstance(base.backend.decoder(), SupportsBranchLogits)
    pred, ref = Predictor(nd, base.tokenizer), Predictor(base.backend, base.tokenizer)
    for p in PROBES:
        got, want = pred.suggest_scored(p), ref.suggest_scored(p)
        assert [w for w, _ in got] == [w for w, _ in want]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=1e-3)
    assert isinstance(pred._decoder, RecomputeDecoder)
