"""Learning from taps: feedback entries become preference pairs (runtime/keyboard/feedback.py),
updates train on them with a DPO loss and gate on held-out acceptance (Personalizer), and the
taps benchmark's simulated user at CI size (benchmarks/taps.py) on the tiny model."""

import numpy as np
import pytest

import pocketpeft as pp
from pocketpeft.corpus import general_texts, sender_split, top_senders
from pocketpeft.runtime import TrainConfig
from pocketpeft.runtime.keyboard.feedback import preferences_from_feedback, typed_word
from pocketpeft.runtime.keyboard.personalizer import Personalizer
from pocketpeft.runtime.keyboard.store import NEW, TRAINED, FeedbackRow
from pocketpeft.runtime.preference import Preference, preference_logps

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bundle(keyboard_bundle):
    return keyboard_bundle


def _row(i, prefix, shown, chosen):
    return FeedbackRow(i, 0.0, prefix, shown, chosen, NEW)


def test_taps_and_ignored_bars_become_pairs():
    messages = ["see you at the game tonight", "i don't know  what time it starts"]
    assert typed_word("see you at the g", messages) == "game"
    assert typed_word("i don't know what ", messages) == "time"  # whitespace runs collapsed
    assert typed_word("see you at the park", messages) is None  # no stored message has it
    rows = [
        _row(1, "see you at the g", ["gym", "game", "grocery"], "game"),
        _row(2, "i don't know what ", ["you", "to", "i"], None),  # all ignored: the typed word wins
        _row(3, "nothing stored ", ["a", "b"], None),  # ignored, and no message: no pair
        _row(4, "see you at the ", ["Game", "gym"], None),  # the typed word was shown in another case
    ]
    prefs, ids = preferences_from_feedback(rows, messages)
    assert prefs[:2] == [Preference("see you at the ", "game", "gym"), Preference("see you at the ", "game", "grocery")]
    assert prefs[2:5] == [Preference("i don't know what ", "time", w) for w in ("you", "to", "i")]
    assert prefs[5:] == [Preference("see you at the ", "game", "gym")]  # "Game" is the typed word itself
    assert ids == [1, 1, 2, 2, 2, 4]


def test_an_update_learns_from_taps_and_gates_on_held_out_acceptance(bundle, tmp_path):
    s = top_senders()[5]
    train, _ = sender_split(s)
    sess = pp.runtime.open(bundle, backend="torch", train_config=TrainConfig(lr=5e-2, warmup_steps=1))
    p = Personalizer(
        sess,
        tmp_path / "store",
        general=general_texts(exclude=[s], n=16, seed=3),
        max_general_increase=1.0,
        preference_weight=1.0,
        holdout_fraction=0.2,
        max_acceptance_drop=1.0,
    )
    msgs = train[:80]
    p.observe(msgs)
    # the user always takes "zorblax" over what the keyboard shows, at the start of a message
    for i in range(30):
        p.feedback("", ["the", "i", "you"], None if i % 2 else "you")
        p.feedback("see ", ["you", "it", "zorblax"], "zorblax")
    prefs = [Preference("see ", "zorblax", w) for w in ("you", "it")]
    before = np.subtract(*preference_logps(sess, prefs))
    r = p.update(max_steps=8)
    assert r.accepted, r
    assert r.preference_pairs > 0 and len(r.preference_losses) == r.steps == 8
    assert r.heldout_feedback > 0 and r.heldout_acceptance_before is not None
    assert r.heldout_acceptance_after is not None and "held-out acceptance" in r.reason
    after = np.subtract(*preference_logps(sess, prefs))
    assert (after > before).all()  # "zorblax" gained on the words it was preferred to
    states = {f.state for f in p.texts.feedback_rows()}
    assert TRAINED in states and p.texts.feedback_stats()["trained"] > 0
    v = p.versions()[-1]
    assert v.metrics["preference_pairs"] == r.preference_pairs

    # text only: the same store, no pairs; the held-out acceptance still gates
    p.preference_weight = 0.0
    p.observe(train[80:120])
    p.feedback("see ", ["you", "it", "zorblax"], "zorblax")
    r2 = p.update(max_steps=2)
    assert r2.preference_pairs == 0 and r2.heldout_acceptance_before is not None
    p.close()


def test_a_fall_in_held_out_acceptance_rejects_the_update(bundle, tmp_path):
    sess = pp.runtime.open(bundle, backend="torch", train_config=TrainConfig(lr=5e-2, warmup_steps=0))
    p = Personalizer(
        sess, tmp_path / "store", general=[], holdout_fraction=0.3, max_acceptance_drop=0.0, preference_weight=5.0
    )
    # first the user's taps teach "game" (one token, as "the") after "see" (and the text has it)
    p.observe(["see game now"] * 20)
    for _ in range(10):
        p.feedback("see ", ["the", "game"], "game")
    first = p.update(max_steps=20)
    assert first.accepted and first.heldout_acceptance_after == 1.0, first.reason
    # then text-only training on "see the ..." pushes "the" back over "game" after "see"
    p.preference_weight = 0.0
    p.observe(["see the show", "see the film", "see the list"] * 20)
    r = p.update(max_steps=20)
    assert r.heldout_acceptance_before == 1.0 and r.heldout_acceptance_after < 1.0, r
    assert not r.accepted and "held-out acceptance fell" in r.reason and r.version == first.version
    assert p.version == first.version  # the last good adapter still serves
    p.close()


def test_the_taps_benchmark_at_ci_size(bundle, tmp_path):
    from benchmarks.taps import next_word_metrics, simulate_user, summarize

    s = top_senders()[5]
    train, test = sender_split(s)
    rows = []
    for weight in (0.0, 1.0):
        sess = pp.runtime.open(bundle, backend="torch", train_config=TrainConfig(lr=5e-2, warmup_steps=1))
        p = Personalizer(sess, tmp_path / f"s{weight}", general=[], preference_weight=weight, max_acceptance_drop=1.0)
        days = simulate_user(p, [train[:8], train[8:16]], test[:4], steps=2, log=lambda *_: None)
        assert len(days) == 2 and all(d["typed"]["words"] > 0 for d in days)
        assert sum(d["taps"] + d["ignored"] for d in days) > 0
        assert len(p.texts.feedback_rows()) == sum(d["taps"] + d["ignored"] for d in days)
        if weight:
            assert any(d["update"]["preference_pairs"] > 0 for d in days)
        else:
            assert all(d["update"]["preference_pairs"] == 0 for d in days)
        rows.append(days)
        held = next_word_metrics(p.suggest, test[:4])
        assert held["words"] > 0 and held == days[-1]["heldout"]  # scored after the last update
        p.close()
    out = summarize([{"arms": {"text": rows[0], "taps": rows[1]}}], 2)
    assert set(out["targets"]) == {"heldout_top1_gain_ge_1_point_after_last_day", "heldout_top3_never_below_text_only"}
    assert len(out["per_day"]) == 2 and out["per_day"][0]["taps"]["preference_pairs"] >= 0
