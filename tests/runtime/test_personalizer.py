"""The Personalizer on a tiny random Llama bundle: the quality gate (real text accepted, spam and
garbage rejected, the previous adapter put back), serving only whole committed adapters while an
update runs, and crash safety (SIGKILL at random moments, every reopen finds the last commit)."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import pocketpeft as pp
from pocketpeft.corpus import general_texts, sender_split, top_senders
from pocketpeft.errors import BaseModelMismatchError, ConfigError, InputTextError
from pocketpeft.runtime import TrainConfig
from pocketpeft.runtime.keyboard.personalizer import Personalizer
from pocketpeft.runtime.keyboard.store import AdapterStore, TextStore, tensors_sha256
from pocketpeft.runtime.keyboard.wordcounts import keystrokes_with_words

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bundle(keyboard_bundle):
    return keyboard_bundle


@pytest.fixture(scope="module")
def user():
    """(user's earlier messages, general texts from other people) from the chitchat corpus."""
    s = top_senders()[5]
    train, _ = sender_split(s)
    return train, general_texts(exclude=[s], n=24, seed=3)


def _open(bundle, lr=5e-2):
    return pp.runtime.open(bundle, backend="torch", train_config=TrainConfig(lr=lr, warmup_steps=1))


def test_gate_accepts_real_text_and_rejects_spam_and_garbage(bundle, user, tmp_path):
    train, general = user
    # A random-init model predicts almost uniformly, so changes of the general-text loss are small;
    # the stated threshold here is "must not get worse at all".
    p = Personalizer(_open(bundle), tmp_path, general=general, holdout_max=20, max_general_increase=0.0)
    assert p.version is None
    p.observe(train[:400])
    r = p.update(max_steps=10)
    assert r.accepted and r.version == 1 and r.steps == 10, r
    assert r.heldout_loss_after < r.heldout_loss_before and r.general_loss_after <= r.general_loss_before
    committed = p.adapters.version(1).sha256
    assert p.version == 1 and tensors_sha256(p.serving()[1]) == committed
    assert p.texts.stats()["trained"] == 400 - r.heldout_messages

    rng = np.random.default_rng(0)
    junk = {
        "spam": ["BUY CHEAP WATCHES NOW at www.cheap-watches.biz !!!"] * 200,
        "garbage": ["".join(chr(c) for c in rng.integers(33, 0x2000, 40)) for _ in range(200)],
    }
    for kind, texts in junk.items():
        p.observe(texts)
        r = p.update(max_steps=10)
        assert not r.accepted and r.steps == 10, (kind, r)
        assert "general-text loss rose" in r.reason or "held-out loss did not improve" in r.reason, r.reason
        assert r.version == 1 and p.adapters.current_version() == 1 and len(p.versions()) == 1
        # the previous adapter is back in training and still served
        assert tensors_sha256(p.session.backend.get_adapter()) == committed
        assert tensors_sha256(p.serving()[1]) == committed
    assert p.update(max_steps=2).reason == "no new text to learn from"
    rows = p.texts.stats()
    assert rows["rejected"] > 0 and rows["trained"] == 380  # 400 minus the 20 held out then


def test_bad_input_and_foreign_store(bundle, user, tmp_path):
    train, general = user
    p = Personalizer(_open(bundle), tmp_path / "s", general=general)
    for bad in ("", b"\xc3\x28", "a\x00b", "x" * (64 << 10)):
        with pytest.raises(InputTextError):
            p.observe(bad)
    with pytest.raises(ConfigError):
        p.update(max_steps=0)
    with pytest.raises(ConfigError):
        p.update(max_seconds=float("nan"))
    with pytest.raises(ConfigError):
        Personalizer(_open(bundle), tmp_path / "t", general=general, holdout_fraction=2)
    assert p.texts.stats()["messages"] == 0
    out = p.wipe()
    assert out["messages"] == 0
    other = tmp_path / "other"
    TextStore(other / "text.sqlite", "f" * 64).close()
    with pytest.raises(BaseModelMismatchError):
        Personalizer(_open(bundle), other, general=general)


def test_restore_and_reopen(bundle, user, tmp_path):
    train, general = user
    p = Personalizer(_open(bundle), tmp_path, general=general, holdout_fraction=0.0, max_general_increase=1.0)
    p.observe(train[:100])
    assert p.update(max_steps=3).version == 1
    p.observe(train[100:200])
    assert p.update(max_steps=3).version == 2
    assert [v.version for v in p.versions()] == [1, 2] and p.versions()[1].metrics["steps"] == 3
    p.restore(1)
    one = p.adapters.version(1).sha256
    assert tensors_sha256(p.session.backend.get_adapter()) == one and tensors_sha256(p.serving()[1]) == one
    p.close()
    q = Personalizer(_open(bundle), tmp_path, general=general)  # a fresh process would see the same
    assert q.version == 1 and tensors_sha256(q.session.backend.get_adapter()) == one


def test_serving_during_update_sees_only_committed_adapters(bundle, user, tmp_path):
    train, general = user
    p = Personalizer(_open(bundle), tmp_path, general=general, holdout_fraction=0.0, max_general_increase=1.0)
    initial = tensors_sha256(p.serving()[1])
    seen, answers = [], []
    ids = p.serve_session.tokenizer.encode("see you at the game tonight")
    for i in range(2):
        p.observe(train[i * 100 : (i + 1) * 100])
        t = threading.Thread(target=p.update, kwargs={"max_steps": 4})
        t.start()
        while t.is_alive():
            v, tensors = p.serving()
            seen.append((v, tensors_sha256(tensors), t.is_alive()))
            assert len(p.suggest("see you at the", k=3)) > 0
            with p._serve_lock:  # (version, logits) of one moment
                answers.append((p.version, p.logits(ids)))
        t.join()
    assert sum(alive for *_, alive in seen) > 3, "suggestions were not answered while updates ran"
    committed = {v.version: v.sha256 for v in p.versions()}
    assert sorted(committed) == [1, 2]
    for v, h, _ in seen:
        assert h == (initial if v is None else committed[v]), (
            f"served tensors of version {v} are not the committed ones"
        )
    # what was served under each version is what a fresh session with that version computes
    ref = {}
    for v, got in answers:
        if v not in ref:
            s = _open(bundle)
            if v is not None:
                s.load_adapter(p.adapters.versions_dir / str(v))
            ref[v] = s.logits(ids)
        np.testing.assert_allclose(got, ref[v], atol=1e-4, err_msg=f"version {v}")


CHILD = textwrap.dedent("""
    import json, sys, hashlib
    import torch
    torch.set_num_threads(1)
    import pocketpeft as pp
    from pocketpeft.runtime import TrainConfig
    from pocketpeft.runtime.keyboard.personalizer import Personalizer
    bundle, store, data = sys.argv[1:4]
    d = json.load(open(data))
    sess = pp.runtime.open(bundle, backend="torch", train_config=TrainConfig(lr=5e-2, warmup_steps=1))
    p = Personalizer(sess, store, general=d["general"], holdout_fraction=0.0, max_general_increase=10.0)
    print("ready", p.version, flush=True)
    i = 0
    while True:
        p.observe(d["texts"][i % len(d["texts"])])
        r = p.update(max_steps=1)
        if r.accepted:
            print("committed", r.version, p.adapters.version(r.version).sha256, flush=True)
        i += 1
""")


@pytest.mark.slow  # every run starts a fresh Python process (> 30 s in all)
@pytest.mark.parametrize("kills", [4, 20])
def test_sigkill_at_random_moments_keeps_last_commit(bundle, user, tmp_path, kills):
    train, general = user
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"texts": [train[i : i + 5] for i in range(0, 200, 5)], "general": general[:10]}))
    (tmp_path / "child.py").write_text(CHILD)
    store = tmp_path / "store"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    rnd = random.Random(0)
    last: tuple[int, str] | None = None
    total_commits = 0
    for k in range(kills):
        proc = subprocess.Popen(
            [sys.executable, str(tmp_path / "child.py"), str(bundle.root), str(store), str(data)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=ROOT,
        )
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
        reader.start()
        deadline = time.monotonic() + 120
        while not any(x.startswith("ready") for x in lines) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lines and lines[0].startswith("ready"), f"child did not start: {lines}"
        ready_v = lines[0].split()[1]
        assert ready_v == (str(last[0]) if last else "None"), "the restarted child did not resume from the last commit"
        # kill at a random moment of the update loop: while training, evaluating, or committing
        time.sleep(rnd.uniform(0.05, 2.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reader.join(5)
        commits = [x.split() for x in lines if x.startswith("committed")]
        total_commits += len(commits)
        if commits:
            last = (int(commits[-1][1]), commits[-1][2])
        st = AdapterStore(store / "adapters", bundle.manifest.base_sha256, bundle.manifest.lora)
        cur = st.current_version()
        if last is None:
            assert cur in (None, 1)
        else:
            # the kill may land after the pointer moved but before "committed" was printed
            assert cur in (last[0], last[0] + 1), (cur, last)
        if cur is not None:
            v = st.version(cur)  # loads, tensors match their recorded sha256
            if last and cur == last[0]:
                assert v.sha256 == last[1]
            last = (cur, v.sha256)
            sess = pp.runtime.open(bundle, backend="torch")
            sess.load_adapter(v.path)  # and loads into a session
        assert not [p.name for p in st.versions_dir.glob(".*")] if st.versions_dir.exists() else True
        texts = TextStore(store / "text.sqlite", bundle.manifest.base_sha256)
        texts.rows()
        texts.close()
    assert total_commits >= kills // 2, f"only {total_commits} commits in {kills} runs: the test exercised little"


def test_interactive_loop_suggests_and_learns(bundle, user, tmp_path):
    from pocketpeft.apps.demo import interactive_loop

    train, general = user
    p = Personalizer(_open(bundle), tmp_path, general=general, holdout_fraction=0.0, max_general_increase=1.0)
    p.observe(train[:60])
    lines = iter(["see you at the game tonight", "", ":versions", "ok cool", ":wipe", None, "never read"])
    out: list[str] = []
    taps: list[tuple] = []
    record = p.feedback
    p.feedback = lambda *a: taps.append(a) or record(*a)  # a spy: every tap is still stored
    reports = interactive_loop(p, lambda: next(lines), out.append, update_seconds=15)
    text = "\n".join(out)
    assert "see" in text and "game" in text and "next:" in text  # per-word and next-word suggestions
    assert reports and reports[0]["steps"] > 0, reports
    assert "wiped {'messages': 62, 'bytes':" in text and "'feedback': 8," in text  # 60 + 2 typed; a tap per word
    assert len(taps) == 8  # one per typed word: tapped at the first keystroke it was shown, or all ignored
    for prefix, bar, chosen in taps:
        assert 1 <= len(bar) <= 3 and (chosen is None or chosen in bar)
        assert any(m.startswith(prefix) for m in ("see you at the game tonight", "ok cool"))
    assert p.texts.stats()["messages"] == 0 and p.texts.feedback_rows() == []  # wiped


def test_deadline_suggestions_come_from_the_word_counts_while_a_version_is_swapped_in(bundle, tmp_path):
    p = Personalizer(_open(bundle), tmp_path / "store", general=[])
    p.observe(["see you at zorblax tonight"] * 3)
    full = p.suggest("see you at zo", 3, deadline_ms=5000)
    assert full.complete and full[0] == "zorblax"
    held, release = threading.Event(), threading.Event()

    def swap():
        with p._serve_lock:  # what _serve() holds while the new version goes in
            held.set()
            release.wait(30)

    t = threading.Thread(target=swap)
    t.start()
    try:
        held.wait(30)
        got = p.suggest("see you at zo", 3, deadline_ms=50)
        assert not got.complete and got[0] == "zorblax"  # the user's words, no model
    finally:
        release.set()
        t.join()
    with pytest.raises(ConfigError, match="deadline_ms"):
        p.suggest("see", 3, deadline_ms=-1)


def test_feedback_is_validated_stored_and_wiped(bundle, tmp_path):
    p = Personalizer(_open(bundle), tmp_path / "store", general=[])
    i = p.feedback("see you at the ", ["game", "gym", "Park"], "park")
    assert p.feedback("see you at the g", ["game", "gym"], None) > i
    rows = p.texts.feedback_rows()
    assert [(r.prefix, r.shown, r.chosen) for r in rows] == [
        ("see you at the ", ["game", "gym", "Park"], "Park"),
        ("see you at the g", ["game", "gym"], None),
    ]
    for bad in (("see", [], None), ("see", ["a", "b"], "c"), ("see", [b"\xff\xfe"], None), (b"\xff", ["a"], None)):
        with pytest.raises(InputTextError):
            p.feedback(*bad)
    assert len(p.texts.feedback_rows()) == 2  # nothing stored by the bad ones
    assert p.wipe()["feedback"] == 2 and p.texts.feedback_rows() == []


def test_observed_words_are_suggested_at_once_and_wiped_with_the_text(bundle, user, tmp_path):
    train, general = user
    sess = _open(bundle)
    p = Personalizer(sess, tmp_path / "store", general=general[:8])
    assert "zorblax" not in [w.lower() for w in p.suggest("see you zo", 3)]
    p.observe(["see you at zorblax tonight"] * 3 + train[:50])
    assert p.suggest("see you at zo", 3)[0] == "zorblax"  # before any update
    assert p.suggest("See you at Zo", 1) == ["Zorblax"]  # cased like the typed word
    mixed = p.eval_keystrokes(["see you at zorblax tonight"])
    # the benchmark's one-pass scoring ranks exactly as suggest() does
    pair = keystrokes_with_words(p.serve_session.predictor, p.words, ["see you at zorblax tonight"], p.word_weight)
    assert pair[1] == mixed
    model_only = p.serve_session.suggest("see you at zo", 3)
    p.word_weight = 0.0
    assert p.suggest("see you at zo", 3) == model_only  # weight 0: the model alone
    alone = p.eval_keystrokes(["see you at zorblax tonight"])
    assert mixed["words"] == alone["words"] == 5
    assert mixed["next_word_top3"] >= 0.8 > alone["next_word_top3"]
    assert mixed["keystroke_savings"] > alone["keystroke_savings"]
    p.word_weight = 0.2
    p.close()
    p = Personalizer(_open(bundle), tmp_path / "store", general=general[:8])  # counts rebuilt from the store
    assert p.suggest("see you at zo", 1) == ["zorblax"]
    p.wipe()
    assert "zorblax" not in [w.lower() for w in p.suggest("see you at zo", 3)]
    p.close()
    with pytest.raises(ConfigError, match="word_weight"):
        Personalizer(_open(bundle), tmp_path / "store2", general=general[:8], word_weight=1.5)


def test_general_text_comes_from_the_bundle_or_the_check_is_skipped(bundle, user, tiny_hf_dir, tmp_path):
    train, _ = user
    p = Personalizer(_open(bundle), tmp_path / "a")
    assert p.general and p.general == bundle.general_texts()  # the bundle's general.txt
    p.close()
    bare = pp.export(
        tiny_hf_dir,
        tmp_path / "bare",
        quant="q4_0",
        lora=pp.LoraConfig(r=4, lora_alpha=8),
        seq_len=32,
        batch_size=4,
        general_text=[],
    )
    assert bare.general_texts() == []
    q = Personalizer(_open(bare), tmp_path / "b", holdout_fraction=0.0)
    assert q.general == []
    q.observe(train[:30])
    r = q.update(max_steps=3)
    assert r.general_loss_before is None and r.general_loss_after is None
    assert "general-text check skipped" in r.reason, r.reason
    q.close()


def test_install_global_regates_the_personal_adapter(bundle, user, tmp_path):
    """A newer global adapter: the personal adapter is kept while it still helps on the user's
    held-out text, relearned (or dropped) when it doesn't, and a bad global changes nothing."""
    import shutil

    from pocketpeft.adapter import Adapter
    from pocketpeft.errors import CorruptFileError
    from pocketpeft.global_adapter import GlobalInfo, save_global

    b = tmp_path / "bundle"
    shutil.copytree(bundle.root, b)
    b = pp.Bundle(b)
    m = b.manifest
    train, general = user
    p = Personalizer(_open(b), tmp_path / "s", general=general, holdout_max=20, serve_session=_open(b))
    rep = p.install_global(
        save_global(
            Adapter(m.lora, {k: np.zeros(s, np.float32) for k, s in m.trainable.items()}, m.base_sha256),
            GlobalInfo(version=1),
            tmp_path / "g0",
        )
    )
    assert rep.decision == "none" and rep.version == 1 and p.session.global_info.version == 1
    p.observe(train[:300])
    assert p.update(max_steps=10).accepted
    personal = p.session.get_adapter_tensors()
    assert p.versions()[-1].metrics["global_version"] == 1

    rng = np.random.default_rng(0)
    tiny = {k: (rng.standard_normal(s) * 1e-4).astype(np.float32) for k, s in m.trainable.items()}
    rep = p.install_global(save_global(Adapter(m.lora, tiny, m.base_sha256), GlobalInfo(version=2), tmp_path / "g1"))
    assert rep.decision == "kept", rep
    assert rep.heldout_loss_personal < rep.heldout_loss_global
    assert tensors_sha256(p.serving()[1]) == tensors_sha256(personal)

    # the global adapter now already holds what the personal one learned: on top of it, the
    # personal adapter counts twice and no longer helps
    rep = p.install_global(
        save_global(Adapter(m.lora, personal, m.base_sha256), GlobalInfo(version=3), tmp_path / "g2")
    )
    assert rep.decision in ("retrained", "dropped"), rep
    assert rep.heldout_loss_personal >= rep.heldout_loss_global and rep.update is not None
    assert p.serve_session.global_info.version == 3

    before = (p.version, tensors_sha256(p.serving()[1]), len(p.versions()))
    bad = save_global(Adapter(m.lora, tiny, m.base_sha256), GlobalInfo(version=4), tmp_path / "g3")
    (bad / "adapter_model.safetensors").write_bytes(b"junk")
    with pytest.raises(CorruptFileError):
        p.install_global(bad)
    assert (p.version, tensors_sha256(p.serving()[1]), len(p.versions())) == before
    assert p.session.global_info.version == 3 and pp.Bundle(b.root).global_info().version == 3
