"""The user's word counts (runtime.wordcounts): trigram probabilities, prefix completion under
the keystroke protocol, and the mixture with the language model's candidates."""

import math

import pytest

from pocketpeft.runtime.keyboard.wordcounts import WordCounts, mix_scored
from pocketpeft.runtime.keystrokes import keystroke_metrics

CROWD = ["see you later", "see you soon", "see you soon!", "thank you so much", "So, what's up?"]


def test_counts_complete_words_in_context_and_learn_the_users_text():
    crowd = WordCounts(CROWD)
    assert crowd.suggest("see you ", 2) == ["soon", "later"]  # trigram counts, most frequent first
    assert crowd.suggest("see you l", 3) == ["later"]  # the partial word is completed
    assert crowd.suggest("", 1) == ["see"]  # message start
    assert crowd.suggest("Thank You S", 3)[0] == "so"  # case-insensitive context and prefix
    assert crowd.suggest("zzz q", 3) == []  # nothing starts with q: no invention
    assert WordCounts().suggest("see you ", 3) == []
    mine = crowd.personalized(["see you tomorrow"] * 3)
    assert mine.suggest("see you ", 1) == ["tomorrow"]
    assert crowd.suggest("see you ", 2) == ["soon", "later"]  # the crowd's counts are not changed
    before = keystroke_metrics(crowd.suggest, ["see you tomorrow"])
    after = keystroke_metrics(mine.suggest, ["see you tomorrow"])
    assert before["next_word_top3"] < after["next_word_top3"] == 1.0
    assert before["keystroke_savings"] < after["keystroke_savings"]


def test_probabilities_interpolate_the_three_orders():
    w = WordCounts(CROWD)
    p = w.probs("see you ")
    # trigram (see, you): soon 2/3, later 1/3; bigram (you): soon 2/4, later 1/4, so 1/4;
    # unigram over 16 words: soon 2, later 1, so 2 ("so much" and "So, what's")
    n = sum(w.uni.values())
    assert n == 16 and w.uni["so"] == 2
    assert p["soon"] == pytest.approx(0.6 * 2 / 3 + 0.3 * 2 / 4 + 0.1 * 2 / n)
    assert p["so"] == pytest.approx(0.3 * 1 / 4 + 0.1 * 2 / n)
    # an unseen context falls back to the unigrams, renormalized
    q = w.probs("zebra ")
    assert q["see"] == pytest.approx(3 / n) and math.isclose(sum(q.values()), 1.0)


def test_mix_ranks_model_and_counts_together_and_keeps_casing():
    lm = [("Later", 0.30), ("soon", 0.25), ("there", 0.20)]
    counts = {"tomorrow": 0.9, "soon": 0.1}
    assert [w for w, _ in mix_scored(lm, counts, "see you ", 0.0, 3)] == ["Later", "soon", "there"]
    mixed = mix_scored(lm, counts, "see you ", 0.5, 3)
    assert [w for w, _ in mixed] == ["tomorrow", "soon", "Later"]
    assert mixed[0][1] == pytest.approx(0.45) and mixed[1][1] == pytest.approx(0.175)
    assert mix_scored([], {"tomorrow": 1.0}, "see you To", 0.2, 1)[0][0] == "Tomorrow"  # cased like the typed word
