"""Preference (DPO) training: the weighted training step against a direct autograd DPO, on the
torch backend and on ONNX Runtime (whole and split bundles), updates that raise the chosen word
over the rejected one, the keyboard's token conventions, and typed errors.

Parity: the DPO + language-model objective is written out in PyTorch autograd on the reference
model (policy with LoRA, reference log-probs from a frozen copy holding the reference adapter),
independent of :mod:`pocketpeft.runtime.preference`; the gradient our weighted step computes
must equal its gradient within 1e-4 of the tensor's largest entry (measured: ~1e-5 on both,
float32 summation order), the reported DPO and LM losses within rtol 1e-5 (measured: ~1e-7).
"""

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pocketpeft as pp
from pocketpeft.errors import BackendUnavailableError, ConfigError, InputTextError
from pocketpeft.runtime import TrainConfig
from pocketpeft.runtime.preference import (
    Preference,
    PreferenceSteps,
    dpo_coefficients,
    dpo_loss,
    lm_weights,
    pair_rows,
    preference_logps,
    reference_logps,
    validate_preferences,
)
from pocketpeft.runtime.protocol import SupportsWeightedLoss
from pocketpeft.text import pack_rows
from tests.helpers import CHAT, export_split_bundle


def _has_ort() -> bool:
    try:
        import onnxruntime.training  # noqa: F401
    except ImportError:
        return False
    return True


ORT = pytest.mark.skipif(not _has_ort(), reason="needs onnxruntime-training (pip install 'pocketpeft[onnx]')")
BACKENDS = ["torch", pytest.param("onnxruntime", marks=ORT)]

PREFS = [
    Preference("see you at the", "game", "park"),
    Preference("", "hey", "yo"),
    Preference("did you finish the", "homework", "dinner"),
    Preference("ok cool i'll pick you up at", "6", "noon"),
    Preference("ok cool\n", "sounds", "maybe"),
]
BETA, WEIGHT = 0.5, 2.0
#: the parity tests' optimizer: no clipping, so the gradient left by the step is the raw one
PARITY_CFG = TrainConfig(lr=1e-3, warmup_steps=0, total_steps=4, grad_clip=0.0)


@pytest.fixture(scope="module")
def bundle(tiny_hf_dir, tmp_path_factory):
    return pp.export(
        tiny_hf_dir,
        tmp_path_factory.mktemp("pref") / "b",
        quant="q4_0",
        lora=pp.LoraConfig(r=4, lora_alpha=8),
        targets=["torch", "onnx"] if _has_ort() else ["torch"],
        seq_len=32,
        batch_size=4,
    )


@pytest.fixture(scope="module")
def split_bundle(tiny_hf_dir, tmp_path_factory):
    return export_split_bundle(tiny_hf_dir, tmp_path_factory, ["torch", "onnx"] if _has_ort() else ["torch"])


@pytest.fixture(scope="module")
def lm_rows(bundle):
    inputs, labels = pack_rows(bundle.tokenizer(), CHAT, bundle.manifest.seq_len)
    return inputs[:3], labels[:3]


def _adapter(bundle, seed):
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * 0.1).astype(np.float32) for k, s in bundle.manifest.trainable.items()}


# ---------------------------------------------------------------------- the autograd reference


def _reference_model(bundle, adapter):
    """The torch reference model of ``bundle`` with ``adapter``, built here from the bundle's files."""
    from safetensors.torch import load_file

    from pocketpeft.formats.torch import WEIGHTS
    from pocketpeft.reference.lora import inject_lora, load_lora_state_dict
    from pocketpeft.reference.model import build_quantized

    m = bundle.manifest
    model = build_quantized(m.arch, m.quant, load_file(str(bundle.path_of(WEIGHTS))))
    inject_lora(model, m.lora, seed=None)
    load_lora_state_dict(model, {k: torch.as_tensor(v) for k, v in adapter.items()})
    return model.eval()


def _word_logp(model, tok, pref: Preference, word: str) -> torch.Tensor:
    """log π(word | context): the sequence [eos] + context + " word" (the word alone at a message
    start or after a newline), summed log-probs of the word's tokens."""
    ctx = pref.context.rstrip()
    if not ctx:
        seq, w = [tok.eos_id], tok.encode(word)
    elif pref.context[len(ctx) :].count("\n"):
        seq, w = [tok.eos_id, *tok.encode(ctx + "\n")], tok.encode(word)
    else:
        seq, w = [tok.eos_id, *tok.encode(ctx)], tok.encode(" " + word)
    ids = torch.tensor([seq + w])
    logp = F.log_softmax(model(ids)[0, :-1].float(), -1)
    pos = torch.arange(len(seq) - 1, len(seq) - 1 + len(w))
    return logp[pos, torch.tensor(w)].sum()


def _autograd_objective(bundle, ref_adapter, policy_adapter, prefs, lm, beta, weight):
    """(DPO mean, LM mean CE, {PEFT key: gradient}) of ``LM + weight * mean DPO`` by autograd:
    the policy holds ``policy_adapter``, a frozen copy ``ref_adapter``."""
    from pocketpeft.reference.lora import PEFT_PREFIX, lora_modules

    tok = bundle.tokenizer()
    policy = _reference_model(bundle, policy_adapter)
    reference = _reference_model(bundle, ref_adapter)
    with torch.no_grad():
        ref = [(_word_logp(reference, tok, p, p.chosen), _word_logp(reference, tok, p, p.rejected)) for p in prefs]
    losses = []
    for p, (rw, rl) in zip(prefs, ref):
        pw, pl = _word_logp(policy, tok, p, p.chosen), _word_logp(policy, tok, p, p.rejected)
        losses.append(-F.logsigmoid(beta * ((pw - rw) - (pl - rl))))  # the DPO formula, as written
    dpo = torch.stack(losses).mean()
    ids, labels = (torch.as_tensor(a) for a in lm)
    logits = policy(ids)
    lm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    (lm_loss + weight * dpo).backward()
    grads = {}
    for name, mod in lora_modules(policy):
        grads[f"{PEFT_PREFIX}{name}.lora_A.weight"] = mod.lora_A.weight.grad.numpy().copy()
        grads[f"{PEFT_PREFIX}{name}.lora_B.weight"] = mod.lora_B.weight.grad.numpy().copy()
    return float(dpo.detach()), float(lm_loss.detach()), grads


def _step_gradients(backend) -> dict:
    """The gradient the last training step applied (with ``grad_clip=0`` nothing rescaled it).
    torch: the LoRA parameters' ``.grad``; onnxruntime: its checkpoint's gradient buffers (the
    weighted step divides by nothing, so they are the gradient)."""
    if backend.name == "torch":
        from pocketpeft.reference.lora import PEFT_PREFIX, lora_modules

        out = {}
        for name, mod in lora_modules(backend.model):
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = mod.lora_A.weight.grad.numpy().copy()
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = mod.lora_B.weight.grad.numpy().copy()
        return out
    return {k: np.array(backend._state.parameters[k].grad, copy=True) for k in backend.get_adapter()}


def _assert_grads_close(got: dict, want: dict, rel: float = 1e-4) -> None:
    assert set(got) == set(want)
    for k in want:
        scale = float(np.abs(want[k]).max())
        assert scale > 0, k
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=rel * scale, err_msg=k)


# ---------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", BACKENDS)
def test_weighted_step_follows_the_dpo_gradient(bundle, lm_rows, name):
    """One PreferenceSteps step (reference = adapter A0, policy = adapter A1, all pairs in the
    batch, LM rows mixed in) applies exactly the gradient of LM + weight * mean DPO."""
    a0, a1 = _adapter(bundle, 0), _adapter(bundle, 1)
    sess = pp.runtime.open(bundle, backend=name)
    be = sess.backend
    assert isinstance(be, SupportsWeightedLoss) and be.weighted_loss
    be.configure(PARITY_CFG)
    be.set_adapter(a0)
    rows = pair_rows(sess.tokenizer, PREFS, bundle.manifest.seq_len)
    steps = PreferenceSteps(be, rows, BETA, WEIGHT, batch=len(PREFS), seed=0)  # reference pass on A0
    be.set_adapter(a1)
    got = steps.step(*lm_rows)
    dpo, lm, grads = _autograd_objective(bundle, a0, a1, PREFS, lm_rows, BETA, WEIGHT)
    assert not got.result.skipped
    assert got.dpo_loss == pytest.approx(dpo, rel=1e-5)
    assert got.lm_loss == pytest.approx(lm, rel=1e-5)
    assert 0.0 < got.accuracy < 1.0  # random adapters: the margins are neither 0 nor all one-sided
    _assert_grads_close(_step_gradients(be), grads)
    want_norm = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
    assert got.result.grad_norm == pytest.approx(want_norm, rel=1e-4)


@ORT
def test_onnxruntime_weighted_step_matches_torch(bundle, lm_rows):
    """The same weighted steps (random weights of both signs) on both backends: losses, gradient
    norms and the adapter after 3 AdamW steps agree (as the unweighted parity tests hold them)."""
    ids, labels = lm_rows
    w = np.random.default_rng(0).standard_normal(labels.shape).astype(np.float32) / 50
    out = {}
    for name in ("torch", "onnxruntime"):
        be = pp.runtime.open(bundle, backend=name).backend
        be.configure(TrainConfig(lr=1e-2, warmup_steps=0, total_steps=3, grad_clip=1.0))
        be.set_adapter(_adapter(bundle, 1))
        out[name] = [be.train_step(ids, labels, w) for _ in range(3)], be.get_adapter()
    (rt, at), (ro, ao) = out["torch"], out["onnxruntime"]
    np.testing.assert_allclose([r.loss for r in ro], [r.loss for r in rt], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([r.grad_norm for r in ro], [r.grad_norm for r in rt], rtol=1e-4)
    for k in at:
        np.testing.assert_allclose(ao[k], at[k], atol=2e-5, err_msg=k)


@pytest.mark.parametrize("name", BACKENDS)
def test_mean_weights_equal_the_unweighted_step(bundle, lm_rows, name):
    """Weights 1/n on the scored tokens reproduce the plain step (mean CE): same loss, gradient
    norm and update; weights on ignored (-100) tokens add nothing."""
    ids, labels = lm_rows
    w = lm_weights(labels) + (labels == -100) * np.float32(7.0)  # junk where nothing is scored
    results = []
    for weights in (None, w):
        be = pp.runtime.open(bundle, backend=name).backend
        be.configure(TrainConfig(lr=1e-2, warmup_steps=0, total_steps=2))
        results.append((be.train_step(ids, labels, weights), be.get_adapter()))
    (r0, a0), (r1, a1) = results
    assert r1.loss == pytest.approx(r0.loss, rel=1e-5) and r1.grad_norm == pytest.approx(r0.grad_norm, rel=1e-5)
    assert r1.tokens == r0.tokens == int((labels != -100).sum())
    for k in a0:
        np.testing.assert_allclose(a1[k], a0[k], atol=1e-6, err_msg=k)


def test_torch_device_step_takes_weights_like_eager(bundle, lm_rows):
    from pocketpeft.runtime.backends import torch_backend

    ids, labels = lm_rows
    w = np.random.default_rng(1).standard_normal(labels.shape).astype(np.float32) / 50
    out = []
    for step in ("eager", "device"):
        be = torch_backend.create(step=step)
        be.load(bundle)
        be.configure(TrainConfig(lr=1e-2, warmup_steps=0, total_steps=3))
        out.append(([be.train_step(ids, labels, w) for _ in range(3)], be.get_adapter()))
    (re, ae), (rd, ad) = out
    np.testing.assert_allclose([r.loss for r in rd], [r.loss for r in re], rtol=1e-5, atol=1e-7)
    for k in ae:
        np.testing.assert_allclose(ad[k], ae[k], atol=1e-5, err_msg=k)


@ORT
def test_split_onnxruntime_weighted_step_matches_torch(split_bundle):
    """The product's default path: a split bundle's suffix trained from prefix outputs with
    weights; onnxruntime's gradient equals torch's, and a PreferenceSteps step on prefix outputs
    equals one on token ids."""
    tok = split_bundle.tokenizer()
    ids, labels = (a[:3] for a in pack_rows(tok, CHAT, split_bundle.manifest.seq_len))
    w = np.random.default_rng(2).standard_normal(labels.shape).astype(np.float32) / 50
    grads = {}
    for name in ("torch", "onnxruntime"):
        be = pp.runtime.open(split_bundle, backend=name).backend
        assert be.split_layer == 1
        be.configure(PARITY_CFG)
        be.set_adapter(_adapter(split_bundle, 1))
        r = be.train_step_hidden(be.prefix(ids), labels, w)
        assert not r.skipped
        grads[name] = _step_gradients(be)
    _assert_grads_close(grads["onnxruntime"], grads["torch"])

    rows = pair_rows(tok, PREFS, split_bundle.manifest.seq_len)
    results = []
    for hidden in (False, True):
        be = pp.runtime.open(split_bundle, backend="onnxruntime").backend
        be.configure(PARITY_CFG)
        fn = (lambda idx, be=be: be.prefix(rows.input_ids[list(idx)])) if hidden else None
        steps = PreferenceSteps(be, rows, BETA, WEIGHT, batch=2, seed=0, hidden=fn)
        be.set_adapter(_adapter(split_bundle, 1))
        s = steps.step(be.prefix(ids) if hidden else ids, labels)
        results.append((s, _step_gradients(be)))
    (s0, g0), (s1, g1) = results
    assert s1.dpo_loss == pytest.approx(s0.dpo_loss, rel=1e-6) and s1.lm_loss == pytest.approx(s0.lm_loss, rel=1e-6)
    _assert_grads_close(g1, g0, rel=1e-5)


# ---------------------------------------------------------------------- the formula


def test_dpo_loss_and_coefficients_match_autograd():
    rng = np.random.default_rng(0)
    pw, pl, rw, rl = (rng.standard_normal(7) * 5 for _ in range(4))
    pw[0], pl[0] = 400.0, -400.0  # extreme margins stay finite
    pw[1], pl[1] = -400.0, 400.0
    for beta in (0.1, 1.0):
        t = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (pw, pl, rw, rl)]
        loss = -F.logsigmoid(beta * ((t[0] - t[2]) - (t[1] - t[3])))
        np.testing.assert_allclose(dpo_loss(pw, pl, rw, rl, beta), loss.detach().numpy(), rtol=1e-12)
        loss.sum().backward()
        # ∂L/∂log π(w) = -c, ∂L/∂log π(l) = +c: the weights the step puts on CE_w and CE_l
        c = dpo_coefficients((pw - rw) - (pl - rl), beta)
        np.testing.assert_allclose(-t[0].grad.numpy(), c, rtol=1e-12)
        np.testing.assert_allclose(t[1].grad.numpy(), c, rtol=1e-12)
    assert dpo_loss(0.0, 0.0, 0.0, 0.0, 0.1) == pytest.approx(math.log(2))


# ---------------------------------------------------------------------- rows and conventions


def test_rows_follow_the_keyboard_conventions(bundle):
    """Contexts are tokenized as the predictor parses a message typed up to the word, the word's
    tokens are the only ones scored, and log-probs equal the logits' (one sequence per pair)."""
    sess = pp.runtime.open(bundle, backend="torch")
    tok, pred = sess.tokenizer, sess.predictor
    rows = pair_rows(tok, PREFS, bundle.manifest.seq_len)
    for i, p in enumerate(PREFS):
        ctx, required, partial = pred._parse(p.context + ("" if p.context.endswith("\n") else " "))
        assert partial == ""
        for j, word in enumerate((p.chosen, p.rejected)):
            r, n = 2 * i + j, int(rows.lengths[2 * i + j])
            w = tok.encode(required.decode() + word)
            assert list(rows.input_ids[r, :n]) + [w[-1]] == [*ctx, *w]
            assert list(rows.labels[r, len(ctx) - 1 : n]) == w
            assert (rows.labels[r, : len(ctx) - 1] == -100).all() and (rows.labels[r, n:] == -100).all()
    lw, ll = preference_logps(sess, PREFS)
    for i, p in enumerate(PREFS):
        for word, got in ((p.chosen, lw[i]), (p.rejected, ll[i])):
            r = 2 * i + (word == p.rejected)
            n = int(rows.lengths[r])
            logp = torch.log_softmax(torch.as_tensor(sess.logits(rows.input_ids[r, :n])), -1).numpy()
            pos = np.flatnonzero(rows.labels[r, :n] != -100)
            assert got == pytest.approx(float(logp[pos, rows.labels[r, pos]].sum()), rel=1e-5)


def test_long_context_keeps_its_last_tokens(bundle):
    tok = bundle.tokenizer()
    ctx = " ".join(CHAT[:6])
    rows = pair_rows(tok, [Preference(ctx, "yes", "no")], 16)
    assert (rows.lengths <= 16).all()
    want = tok.encode(ctx)
    n = int(rows.lengths[0])
    first = int(np.flatnonzero(rows.labels[0] != -100)[0])
    assert list(rows.input_ids[0, : first + 1]) == want[-(first + 1) :]  # the separator scrolled out
    assert list(rows.labels[0, first:n]) == tok.encode(" yes")


# ---------------------------------------------------------------------- training


@pytest.mark.parametrize("name", BACKENDS)
def test_preferences_raise_the_chosen_words(bundle, name):
    """Training with preferences moves every pair's margin up, far more than the same run
    without them; the report follows (DPO loss log 2 at the first step, where the policy is the
    reference; accuracy over all pairs after the last step)."""
    cfg = TrainConfig(lr=5e-3, warmup_steps=0)
    base = pp.runtime.open(bundle, backend=name, train_config=cfg)
    ref_w, ref_l = reference_logps(base, PREFS)
    plain = base.train(CHAT, steps=6, seed=0)
    assert plain.preference_losses == [] and plain.preference_accuracy is None
    pw, pl = preference_logps(base, PREFS)
    plain_margin = (pw - ref_w) - (pl - ref_l)

    sess = pp.runtime.open(bundle, backend=name, train_config=cfg)
    rep = sess.train(CHAT, steps=6, seed=0, preferences=PREFS, preference_weight=WEIGHT, beta=BETA)
    pw, pl = preference_logps(sess, PREFS)
    margin = (pw - ref_w) - (pl - ref_l)
    assert (margin > 0).all() and (margin > plain_margin).all(), (margin, plain_margin)
    assert len(rep.preference_losses) == rep.steps == len(rep.losses) == 6 and not rep.skipped_steps
    assert rep.preference_losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert rep.preference_losses[-1] < rep.preference_losses[0]
    assert rep.preference_accuracy == 1.0
    assert rep.losses[0] == pytest.approx(plain.losses[0], rel=1e-4)  # the LM loss, as without preferences
    assert rep.to_dict()["preference_accuracy"] == 1.0


@ORT
def test_preferences_on_a_split_bundle(split_bundle):
    """The default update path (onnxruntime, split): prefix outputs of pair rows are computed
    once and the margins rise."""
    sess = pp.runtime.open(split_bundle, backend="onnxruntime", train_config=TrainConfig(lr=5e-3, warmup_steps=0))
    ref_w, ref_l = reference_logps(sess, PREFS)
    rep = sess.train(CHAT, steps=5, seed=0, preferences=PREFS, preference_weight=WEIGHT, beta=BETA, preference_batch=3)
    pw, pl = preference_logps(sess, PREFS)
    assert ((pw - ref_w) - (pl - ref_l) > 0).mean() >= 0.8
    assert rep.preference_accuracy >= 0.8 and len(rep.preference_losses) == 5
    n_lm_rows = len(pack_rows(sess.tokenizer, CHAT, split_bundle.manifest.seq_len)[0])
    assert rep.prefix_rows_computed == min(n_lm_rows, 5 * 4) + 2 * len(PREFS)


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "args, match",
    [
        (("ctx", "", "no"), "whole word"),
        (("ctx", "two words", "no"), "whole word"),
        (("ctx", "same", "same"), "same word"),
        (("ctx", b"\xff\xfe", "no"), "UTF-8"),
        (("ctx\x00", "yes", "no"), "NUL"),
        (("ctx", 3, "no"), "expected str"),
    ],
)
def test_bad_preferences_are_input_errors(args, match):
    with pytest.raises(InputTextError, match=match):
        Preference(*args)


def test_bad_collections_and_parameters(bundle):
    assert validate_preferences([("a", b"yes", "no")]) == [Preference("a", "yes", "no")]
    for bad in ([], PREFS[0], ["a b c"]):
        with pytest.raises(InputTextError):
            validate_preferences(bad)
    sess = pp.runtime.open(bundle, backend="torch")
    with pytest.raises(InputTextError, match="empty"):
        sess.train(CHAT, steps=1, preferences=[])
    for kw in (
        dict(beta=0.0),
        dict(beta=-1.0),
        dict(beta=float("nan")),
        dict(beta=float("inf")),
        dict(preference_weight=-0.5),
        dict(preference_weight=float("nan")),
        dict(preference_batch=0),
    ):
        with pytest.raises(ConfigError):
            sess.train(CHAT, steps=1, preferences=PREFS, **kw)
    with pytest.raises(ConfigError):
        dpo_loss(0.0, 0.0, 0.0, 0.0, beta=0)
    with pytest.raises(InputTextError, match="does not fit"):
        pair_rows(sess.tokenizer, [Preference("", "x" * 400, "no")], 32)
    with pytest.raises(ConfigError, match="shape"):
        sess.backend.train_step(np.zeros((2, 8), np.int64), np.zeros((2, 8), np.int64), np.zeros((2, 7), np.float32))


@ORT
def test_backends_without_weights_name_themselves(bundle, tmp_path):
    """A forward-only backend has no weighted step; an onnxruntime bundle exported before the
    training graph took weights (io.json without them) says to re-export. Nothing is trained."""
    fo = pp.runtime.open(bundle, backend="onnxruntime-infer", update="forward-only")
    before = fo.get_adapter_tensors()
    with pytest.raises(BackendUnavailableError, match="onnxruntime-infer"):
        fo.train(CHAT, steps=1, preferences=PREFS)
    after = fo.get_adapter_tensors()
    assert all(np.array_equal(before[k], after[k]) for k in before)

    from pocketpeft.fsutil import sha256_file

    root = tmp_path / "old"
    shutil.copytree(bundle.root, root)
    path = root / "onnx" / "io.json"
    io = json.loads(path.read_text())
    del io["training_model"]["inputs"]["weights"]
    path.write_text(json.dumps(io))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"]["onnx/io.json"].update(bytes=path.stat().st_size, sha256=sha256_file(path))
    (root / "manifest.json").write_text(json.dumps(manifest))
    old = pp.runtime.open(root, backend="onnxruntime")
    assert isinstance(old.backend, SupportsWeightedLoss) and not old.backend.weighted_loss
    with pytest.raises(BackendUnavailableError, match="re-export"):
        old.train(CHAT, steps=1, preferences=PREFS)
    ids, labels = pack_rows(old.tokenizer, CHAT, 32)
    with pytest.raises(BackendUnavailableError, match="re-export"):
        old.backend.train_step(ids[:2], labels[:2], np.ones(labels[:2].shape, np.float32))


def test_reference_pass_sees_the_loaded_adapter(bundle):
    """reference_logps is the current adapter's: another adapter gives other log-probs."""
    sess = pp.runtime.open(bundle, backend="torch")
    a = reference_logps(sess, PREFS)
    sess.set_adapter_tensors(_adapter(bundle, 3))
    b = reference_logps(sess, PREFS)
    assert not np.allclose(a[0], b[0])


def test_executorch_refuses_weights(tiny_hf_dir, tmp_path):
    """executorch's train.pte computes the mean cross-entropy: weights raise a typed error that
    names the backend, in the backend and in Session.train."""
    pytest.importorskip("executorch", reason="needs executorch (pip install 'pocketpeft[executorch]')")
    b = pp.export(
        tiny_hf_dir,
        tmp_path / "b",
        quant="q4_0",
        lora=pp.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]),
        targets=["executorch"],
        seq_len=16,
        batch_size=2,
    )
    sess = pp.runtime.open(b, backend="executorch")
    assert isinstance(sess.backend, SupportsWeightedLoss) and not sess.backend.weighted_loss
    ids, labels = pack_rows(sess.tokenizer, CHAT, 16)
    with pytest.raises(BackendUnavailableError, match="executorch"):
        sess.backend.train_step(ids[:2], labels[:2], np.ones(labels[:2].shape, np.float32))
    with pytest.raises(BackendUnavailableError, match="executorch"):
        sess.train(CHAT, steps=1, preferences=PREFS)
