"""The torch reference backend: training, schedule, accumulation, skips, metrics, errors."""

import math

import numpy as np
import pytest
import torch

import pocketpeft as pp
from pocketpeft.errors import ConfigError, InputTextError, SequenceTooLongError
from pocketpeft.runtime import TrainConfig
from pocketpeft.text import pack_rows
from tests.helpers import CHAT, assert_skips_non_finite_steps


@pytest.fixture(scope="module")
def bundle(tiny_hf_dir, tmp_path_factory):
    return pp.export(
        tiny_hf_dir,
        tmp_path_factory.mktemp("b") / "bundle",
        quant="q4_0",
        lora=pp.LoraConfig(r=4, lora_alpha=8),
        seq_len=32,
        batch_size=4,
    )


def test_training_lowers_loss_and_only_lora_moves(bundle):
    sess = pp.runtime.open(bundle, backend="torch", train_config=TrainConfig(lr=1e-2, warmup_steps=1, total_steps=15))
    base_state = {k: v.clone() for k, v in sess.backend.model.state_dict().items() if ".lora_" not in k}
    before = sess.eval(CHAT)
    rep = sess.train(CHAT, steps=15)
    after = sess.eval(CHAT)
    assert rep.steps == 15 and not rep.skipped_steps and rep.tokens_per_s > 0 and rep.peak_rss_mb > 0
    assert after.loss < before.loss - 0.1, (before.loss, after.loss)
    assert np.mean(rep.losses[-3:]) < np.mean(rep.losses[:3])
    for k, v in sess.backend.model.state_dict().items():
        if ".lora_" not in k:
            assert torch.equal(v, base_state[k]), f"frozen tensor {k} changed"


def test_eval_metrics_match_logits(bundle):
    sess = pp.runtime.open(bundle, backend="torch")
    texts = CHAT[:8]
    rep = sess.eval(texts)
    inputs, labels = pack_rows(sess.tokenizer, texts, bundle.manifest.seq_len)
    lg = np.concatenate([sess.backend.logits(inputs[i : i + 1]) for i in range(len(inputs))])
    valid = labels != -100
    tgt = labels[valid]
    flat = lg[valid]
    logp = (
        flat - np.log(np.exp(flat - flat.max(-1, keepdims=True)).sum(-1, keepdims=True)) - flat.max(-1, keepdims=True)
    )
    nll = -logp[np.arange(len(tgt)), tgt].mean()
    top3 = np.argsort(-flat, axis=-1)[:, :3]
    assert rep.tokens == len(tgt)
    assert rep.loss == pytest.approx(nll, rel=1e-4)
    assert rep.perplexity == pytest.approx(math.exp(nll), rel=1e-3)
    assert rep.top1 == pytest.approx((top3[:, 0] == tgt).mean())
    assert rep.top3 == pytest.approx((top3 == tgt[:, None]).any(-1).mean())


def test_grad_accumulation_equals_full_batch(bundle):
    a = pp.runtime.open(bundle, backend="torch", train_config=TrainConfig(lr=5e-3, grad_accum=1))
    b = pp.runtime.open(bundle, backend="torch", train_config=TrainConfig(lr=5e-3, grad_accum=2))
    ra, rb = a.train(CHAT, steps=3), b.train(CHAT, steps=3)
    np.testing.assert_allclose(ra.losses, rb.losses, rtol=1e-4)
    wa, wb = a.backend.get_adapter(), b.backend.get_adapter()
    for k in wa:
        np.testing.assert_allclose(wa[k], wb[k], atol=1e-5)


def test_schedule_warms_up_then_decays():
    cfg = TrainConfig(lr=1.0, warmup_steps=3, total_steps=13, min_lr_ratio=0.1)
    lrs = [cfg.lr_at(i) for i in range(16)]
    assert lrs[0] < lrs[1] < lrs[2] < lrs[3] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(lrs[3:], lrs[4:]))
    assert lrs[13] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.1)


def test_non_finite_loss_skips_step_and_keeps_weights(bundle):
    # a divergent learning rate blows the adapter up; the next steps see an inf/NaN loss or gradient
    sess = pp.runtime.open(
        bundle, backend="torch", train_config=TrainConfig(lr=1e30, warmup_steps=0, grad_clip=0.0, total_steps=6)
    )
    sess.backend.configure(sess.train_config)
    inputs, labels = pack_rows(sess.tokenizer, CHAT, 32)
    assert_skips_non_finite_steps(sess.backend, inputs[:4], labels[:4])


def test_session_reports_skips(bundle):
    sess = pp.runtime.open(bundle, backend="torch", train_config=TrainConfig(lr=1e30, warmup_steps=0, grad_clip=0.0))
    rep = sess.train(CHAT, steps=5)
    assert rep.skipped_steps and all(0 <= s < 5 for s in rep.skipped_steps)


def test_time_boxed_training_stops(bundle):
    sess = pp.runtime.open(bundle, backend="torch")
    rep = sess.train(CHAT, seconds=1.0)  # no step limit: only the time box can end it
    assert rep.stopped_by == "seconds" and rep.steps >= 1  # it stops before a step would overrun


@pytest.mark.parametrize(
    "texts, err",
    [
        ([], InputTextError),
        (["", "   \n"], InputTextError),
        ([b"\xff\xfe caf\xe9"], InputTextError),
        (["ok", "bin\x00ary"], InputTextError),
        ([42], InputTextError),
    ],
)
def test_bad_text_is_a_typed_error(bundle, texts, err):
    sess = pp.runtime.open(bundle, backend="torch")
    with pytest.raises(err):
        sess.train(texts, steps=1)
    with pytest.raises(ValueError):
        sess.eval(texts)


def test_bad_limits_and_sequences(bundle):
    sess = pp.runtime.open(bundle, backend="torch")
    with pytest.raises(ConfigError):
        sess.train(CHAT, steps=0)
    with pytest.raises(ConfigError):
        sess.train(CHAT, seconds=float("nan"))
    with pytest.raises(SequenceTooLongError, match="context of 2048"):
        sess.logits([1] * 2049)
    with pytest.raises(InputTextError, match="vocabulary"):
        sess.logits([49152])
    with pytest.raises(InputTextError):
        sess.logits([])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(bundle):
    cpu = pp.runtime.open(bundle, backend="torch:cpu")
    gpu = pp.runtime.open(bundle, backend="torch:cuda:0")
    ids = cpu.tokenizer.encode("see you at the game tonight")
    np.testing.assert_allclose(cpu.logits(ids), gpu.logits(ids), atol=1e-3)
    ra, rb = cpu.train(CHAT, steps=3), gpu.train(CHAT, steps=3)
    np.testing.assert_allclose(ra.losses, rb.losses, rtol=1e-3)
