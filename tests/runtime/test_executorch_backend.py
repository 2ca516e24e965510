"""The executorch backend against the torch reference: logits, a 20-step loss curve, adapters,
padding of partial batches, quant formats, the train graph's trainables, and file errors.

Tolerances (fp32 on both sides, different kernels): logits atol 1e-4; losses rtol 1e-3;
adapter tensors atol 1e-4 after 20 AdamW steps (measured: ~5e-7 and ~5e-6).
"""

import json
import shutil

import numpy as np
import pytest

pytest.importorskip(
    "executorch.extension.training", reason="executorch is not installed (pip install 'pocketpeft[executorch]')"
)

import pocketpeft as pp  # noqa: E402
from pocketpeft.errors import (
    AdapterShapeError,
    CorruptFileError,
    ModelFileNotFoundError,  # noqa: E402
    SequenceTooLongError,
)
from pocketpeft.fsutil import sha256_file  # noqa: E402
from pocketpeft.runtime import TrainConfig  # noqa: E402
from pocketpeft.text import pack_rows  # noqa: E402
from tests.helpers import CHAT, assert_skips_non_finite_steps  # noqa: E402

pytestmark = pytest.mark.backend("executorch")
LORA = pp.LoraConfig(r=4, lora_alpha=8)


def _export(src, out, quant):
    return pp.export(src, out, quant=quant, lora=LORA, targets=["torch", "executorch"], seq_len=32, batch_size=4)


@pytest.fixture(scope="module")
def bundle(tiny_hf_dir, tmp_path_factory):
    return _export(tiny_hf_dir, tmp_path_factory.mktemp("et") / "bundle", "q4_0")


@pytest.fixture(scope="module")
def rows(bundle):
    return pack_rows(bundle.tokenizer(), CHAT, bundle.manifest.seq_len)


def _open(bundle, backend, **cfg):
    return pp.runtime.open(bundle, backend=backend, train_config=TrainConfig(**cfg) if cfg else None)


def test_probe_and_capabilities():
    from pocketpeft.runtime.backends import executorch_backend

    p = executorch_backend.probe()
    assert p.available and p.devices == ("cpu",)
    assert p.capabilities["cpu"].train and p.capabilities["cpu"].tier == "cpu"


def test_initial_logits_and_eval_match_torch(bundle, rows):
    ref, et = _open(bundle, "torch"), _open(bundle, "executorch")
    ids = ref.tokenizer.encode("see you at the game tonight")
    np.testing.assert_allclose(et.logits(ids), ref.logits(ids), atol=1e-4)
    inputs, labels = rows
    batch = inputs[:3, :20]  # fewer rows and tokens than exported: one dynamic-shape call
    np.testing.assert_allclose(et.backend.logits(batch), ref.backend.logits(batch), atol=1e-4)
    a, b = ref.backend.eval_batch(inputs[:6], labels[:6]), et.backend.eval_batch(inputs[:6], labels[:6])
    assert (a.tokens, a.top1, a.top3) == (b.tokens, b.top1, b.top3)
    assert b.loss_sum == pytest.approx(a.loss_sum, rel=1e-5)
    with pytest.raises(SequenceTooLongError, match="re-export"):
        et.logits([1] * 33)


def test_twenty_steps_match_torch_and_adapter_round_trips(bundle, tmp_path):
    cfg = dict(lr=1e-2, warmup_steps=1, total_steps=20)
    ref, et = _open(bundle, "torch", **cfg), _open(bundle, "executorch", **cfg)
    ra, rb = ref.train(CHAT, steps=20), et.train(CHAT, steps=20)
    assert not rb.skipped_steps and rb.tokens == ra.tokens
    np.testing.assert_allclose(rb.losses, ra.losses, rtol=1e-3)
    assert np.mean(rb.losses[-3:]) < np.mean(rb.losses[:3])
    wa, wb = ref.backend.get_adapter(), et.backend.get_adapter()
    assert list(wb) == list(bundle.manifest.trainable)
    for k in wa:
        np.testing.assert_allclose(wb[k], wa[k], atol=1e-4, err_msg=k)
    # the ExecuTorch-trained adapter, saved in PEFT format, gives the same logits in the reference
    et.save_adapter(tmp_path / "alice")
    back = pp.runtime.open(bundle, backend="torch", adapter=tmp_path / "alice")
    ids = back.tokenizer.encode("are you coming to the game")
    np.testing.assert_allclose(back.logits(ids), et.logits(ids), atol=1e-4)
    # and loading an adapter into the executorch backend after training replaces it exactly
    et.load_adapter(tmp_path / "alice")
    et.reset_adapter()
    np.testing.assert_allclose(et.logits(ids), _open(bundle, "torch").logits(ids), atol=1e-4)


@pytest.mark.parametrize("n_rows", [3, 7])
def test_partial_and_oversized_batches_are_exact(bundle, rows, n_rows):
    # 3 rows: padded with ignored rows; 7 rows: two calls weighted by token counts
    inputs, labels = rows
    labels = labels.copy()
    labels[0, 10:] = -100  # uneven token counts across calls
    ref, et = _open(bundle, "torch", lr=5e-3), _open(bundle, "executorch", lr=5e-3)
    for _ in range(2):
        a, b = (
            ref.backend.train_step(inputs[:n_rows], labels[:n_rows]),
            et.backend.train_step(inputs[:n_rows], labels[:n_rows]),
        )
        assert b.tokens == a.tokens and not b.skipped
        assert b.loss == pytest.approx(a.loss, rel=1e-5) and b.grad_norm == pytest.approx(a.grad_norm, rel=1e-4)


def test_adapter_set_before_training_is_used(bundle, rows):
    rng = np.random.default_rng(0)
    ref, et = _open(bundle, "torch"), _open(bundle, "executorch")
    new = {k: rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in ref.backend.get_adapter().items()}
    ref.backend.set_adapter(new)
    et.backend.set_adapter(new)
    inputs, labels = rows
    a, b = ref.backend.train_step(inputs[:4], labels[:4]), et.backend.train_step(inputs[:4], labels[:4])
    assert b.loss == pytest.approx(a.loss, rel=1e-5)
    bad = dict(new)
    k = next(iter(bad))
    bad[k] = bad[k][:, :-1]
    with pytest.raises(AdapterShapeError, match="shape"):
        et.backend.set_adapter(bad)
    with pytest.raises(AdapterShapeError, match="missing"):
        et.backend.set_adapter({k: new[k]})


def test_train_graph_has_only_lora_trainables(bundle):
    from executorch.extension.training import _load_for_executorch_for_training

    sig = json.loads((bundle.root / "executorch/signature.json").read_text())
    tm = _load_for_executorch_for_training(str(bundle.root / "executorch/train.pte"))
    fqns = tm.model.run_method("__et_training_fqn_forward", ())
    assert [sig["train"]["parameters"][f] for f in fqns] == list(bundle.manifest.trainable)
    inputs = np.zeros((4, 32), dtype=np.int64)
    import torch

    outs = tm.forward_backward("forward", (torch.from_numpy(inputs), torch.from_numpy(inputs)))
    assert len(outs) == 1 and outs[0].ndim == 0  # the loss is the only user output
    params = tm.named_parameters()
    assert {f: list(p.shape) for f, p in params.items()} == {
        f: bundle.manifest.trainable[sig["train"]["parameters"][f]] for f in fqns
    }


def test_non_finite_loss_skips_step_and_keeps_weights(bundle, rows):
    sess = _open(bundle, "executorch", lr=1e30, warmup_steps=0, grad_clip=0.0, total_steps=6)
    sess.backend.configure(sess.train_config)
    inputs, labels = rows
    assert_skips_non_finite_steps(sess.backend, inputs[:4], labels[:4])


def _copy_with_truncated(bundle, dst, fix_manifest):
    shutil.copytree(bundle.root, dst)
    pte = dst / "executorch/train.pte"
    pte.write_bytes(pte.read_bytes()[: pte.stat().st_size // 2])
    if fix_manifest:  # the hash check passes: ExecuTorch's own loader must catch it
        m = json.loads((dst / "manifest.json").read_text())
        m["files"]["executorch/train.pte"].update(sha256=sha256_file(pte), bytes=pte.stat().st_size)
        (dst / "manifest.json").write_text(json.dumps(m))
    return dst


@pytest.mark.parametrize("fix_manifest", [False, True])
def test_truncated_pte_is_corrupt(bundle, rows, tmp_path, fix_manifest):
    dst = _copy_with_truncated(bundle, tmp_path / "b", fix_manifest)
    inputs, labels = rows
    with pytest.raises(CorruptFileError, match="train.pte"):
        sess = pp.runtime.open(dst, backend="executorch")
        sess.backend.train_step(inputs[:4], labels[:4])  # programs load on first use


def test_bundle_without_executorch_target(tiny_hf_dir, tmp_path):
    b = pp.export(tiny_hf_dir, tmp_path / "torch_only", quant="q4_0", lora=LORA, seq_len=32, batch_size=4)
    with pytest.raises(ModelFileNotFoundError, match="--targets executorch"):
        pp.runtime.open(b, backend="executorch")


@pytest.mark.parametrize("quant", ["q8_0", "nf4"])
def test_other_quant_formats_match_torch(tiny_hf_dir, tmp_path, quant):
    b = _export(tiny_hf_dir, tmp_path / quant, quant)
    ref, et = _open(b, "torch"), _open(b, "executorch")
    ids = ref.tokenizer.encode("ok cool i'll pick you up at 6")
    np.testing.assert_allclose(et.logits(ids), ref.logits(ids), atol=1e-4)
    inputs, labels = pack_rows(ref.tokenizer, CHAT[:8], 32)
    a, r = ref.backend.train_step(inputs[:4], labels[:4]), et.backend.train_step(inputs[:4], labels[:4])
    assert r.loss == pytest.approx(a.loss, rel=1e-5) and r.grad_norm == pytest.approx(a.grad_norm, rel=1e-4)
