"""The executorch backend on a split bundle (LoRA on layer 1 of the tiny model): ``prefix.pte``
(XNNPACK) feeds the suffix's ``train.pte`` / ``suffix.pte``, checked against the torch reference
on an unsplit bundle of the same layers.

Tolerances as the onnxruntime split parity (tests/runtime/test_split.py): logits atol 1e-4,
prefix atol 1e-5, 20-step losses rtol 1e-5, adapters atol 2e-5. Measured here: logits ~4e-7,
prefix ~2e-8, losses ~4e-7 relative, adapters ~1.1e-5.

Slow: the four ExecuTorch programs take ~75 s to export on a 2-core machine (~110 s in all).
"""

import json
import shutil

import numpy as np
import pytest

pytest.importorskip(
    "executorch.extension.training", reason="executorch is not installed (pip install 'pocketpeft[executorch]')"
)

import pocketpeft as pp  # noqa: E402
from pocketpeft.errors import ConfigError, CorruptFileError, SequenceTooLongError  # noqa: E402
from pocketpeft.fsutil import sha256_file  # noqa: E402
from pocketpeft.runtime import TrainConfig  # noqa: E402
from pocketpeft.text import pack_rows  # noqa: E402
from tests.helpers import CHAT, SPLIT_LORA, export_split_bundle  # noqa: E402

pytestmark = [pytest.mark.backend("executorch"), pytest.mark.slow]
CFG = TrainConfig(lr=1e-2, warmup_steps=2, total_steps=20, weight_decay=0.01, grad_clip=1.0)


@pytest.fixture(scope="module")
def split_bundle(tiny_hf_dir, tmp_path_factory):
    return export_split_bundle(tiny_hf_dir, tmp_path_factory, ["torch", "executorch"], name="et_split")


@pytest.fixture(scope="module")
def whole_bundle(tiny_hf_dir, tmp_path_factory):
    return export_split_bundle(tiny_hf_dir, tmp_path_factory, ["torch"], split=False, name="et_whole")


def test_split_bundle_records_the_split(split_bundle):
    m = split_bundle.manifest
    assert m.split is not None and m.split.layer == 1 and "executorch" in m.split.targets
    files = m.targets["executorch"]["files"]
    assert {"executorch/prefix.pte", "executorch/suffix.pte", "executorch/train.pte", "executorch/infer.pte"} <= set(
        files
    )
    sig = json.loads((split_bundle.root / "executorch/signature.json").read_text())
    assert sig["split"]["layer"] == 1 and sig["split"]["hidden_size"] == m.arch.hidden_size
    assert sig["train"]["inputs"] == ["hidden", "labels"]
    # the prefix lowers to XNNPACK on executorch 1.5.1 (the exporter falls back to portable kernels)
    assert sig["split"]["prefix"]["kernels"] == "xnnpack", sig["split"]["prefix"]["xnnpack_failure"]
    assert sig["delegates"]["prefix"] == ["xnnpack"]


def test_executorch_split_matches_the_reference(split_bundle, whole_bundle):
    e = pp.runtime.open(split_bundle, backend="executorch", train_config=CFG)
    t = pp.runtime.open(whole_bundle, backend="torch", train_config=CFG)
    assert e.backend.split_layer == 1 and e.backend.prefix_kernels == "xnnpack"
    ids = e.tokenizer.encode("see you at the game tonight")
    np.testing.assert_allclose(e.logits(ids), t.logits(ids), atol=1e-4)
    # the prefix alone: the residual stream entering layer 1, as the torch reference computes it
    ts = pp.runtime.open(split_bundle, backend="torch")
    x = np.array([ids, ids[::-1]])
    np.testing.assert_allclose(e.backend.prefix(x), ts.backend.prefix(x), atol=1e-5)
    re, rt = e.train(CHAT, steps=20, seed=3), t.train(CHAT, steps=20, seed=3)
    assert not re.skipped_steps and re.tokens == rt.tokens and re.prefix_rows_computed > 0
    np.testing.assert_allclose(re.losses, rt.losses, rtol=1e-5)
    a, b = e.get_adapter_tensors(), t.get_adapter_tensors()
    assert list(a) == list(split_bundle.manifest.trainable)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=2e-5, err_msg=k)
    ee, et = e.eval(CHAT[:8]), t.eval(CHAT[:8])  # the suffix's eval from prefix outputs
    assert (ee.tokens, ee.top1, ee.top3) == (et.tokens, et.top1, et.top3)
    assert ee.loss == pytest.approx(et.loss, rel=1e-5)
    np.testing.assert_allclose(e.logits(ids), t.logits(ids), atol=1e-4)  # trained adapter, prefix -> suffix
    e.backend.release_prefix()
    np.testing.assert_allclose(e.backend.prefix(x), ts.backend.prefix(x), atol=1e-5)  # loads it again


def test_token_ids_run_prefix_then_suffix(split_bundle):
    # train_step / eval_batch on token ids (no session cache), batches smaller and larger than 4 rows
    e, ts = pp.runtime.open(split_bundle, backend="executorch"), pp.runtime.open(split_bundle, backend="torch")
    inputs, labels = pack_rows(e.tokenizer, CHAT, 32)
    for n in (3, 6):
        a, b = ts.backend.train_step(inputs[:n], labels[:n]), e.backend.train_step(inputs[:n], labels[:n])
        assert b.tokens == a.tokens and b.loss == pytest.approx(a.loss, rel=1e-5)
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-4)
    a, b = ts.backend.eval_batch(inputs[:6], labels[:6]), e.backend.eval_batch(inputs[:6], labels[:6])
    assert (a.tokens, a.top1, a.top3) == (b.tokens, b.top1, b.top3) and b.loss_sum == pytest.approx(
        a.loss_sum, rel=1e-5
    )
    # float16 prefix outputs (what a hidden-state cache keeps) are accepted
    h = ts.backend.prefix(inputs[:4]).astype(np.float16)
    assert e.backend.eval_hidden(h, labels[:4]).tokens == a.tokens - int((labels[4:6] != -100).sum())


def test_bad_inputs_are_typed_errors(split_bundle):
    e = pp.runtime.open(split_bundle, backend="executorch")
    with pytest.raises(SequenceTooLongError, match="re-export"):
        e.backend.prefix(np.zeros((1, 33), dtype=np.int64))
    with pytest.raises(SequenceTooLongError, match="re-export"):
        e.logits([1] * 33)
    with pytest.raises(ConfigError, match="hidden"):
        e.backend.train_step_hidden(np.zeros((1, 8, 7), np.float32), np.zeros((1, 8), np.int64))


def test_signature_split_must_match_the_manifest(split_bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(split_bundle.root, dst)
    sig_path = dst / "executorch/signature.json"
    sig = json.loads(sig_path.read_text())
    sig["split"]["layer"] = 0
    sig_path.write_text(json.dumps(sig))
    m = json.loads((dst / "manifest.json").read_text())
    m["files"]["executorch/signature.json"].update(sha256=sha256_file(sig_path), bytes=sig_path.stat().st_size)
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CorruptFileError, match="split"):
        pp.runtime.open(dst, backend="executorch")


def test_prefix_falls_back_to_portable_kernels(tiny_hf_dir, tmp_path, monkeypatch):
    import torch
    from executorch.backends.xnnpack.partition import xnnpack_partitioner
    from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer

    from pocketpeft.config import QuantFormat
    from pocketpeft.export import executorch_target
    from pocketpeft.export.protocol import ExportContext
    from pocketpeft.reference.loading import load_base
    from pocketpeft.reference.lora import inject_lora
    from pocketpeft.reference.model import SplitPart, build_from_float

    loaded, lcfg = load_base(tiny_hf_dir), pp.LoraConfig(**SPLIT_LORA)
    with torch.no_grad():
        model = build_from_float(loaded.config, loaded.state_dict, QuantFormat.Q4_0)
    inject_lora(model, lcfg, seed=0)
    ctx = ExportContext(model, loaded.config, QuantFormat.Q4_0, lcfg, 32, 4, tmp_path, split_layer=1)

    def broken(*a, **k):
        raise RuntimeError("no XNNPACK today")

    monkeypatch.setattr(xnnpack_partitioner, "XnnpackPartitioner", broken)
    program, kernels, reason = executorch_target.export_prefix(ctx)
    assert kernels == "portable" and "no XNNPACK today" in reason
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        want = SplitPart(model, 0, 1)(ids)
    got = _load_for_executorch_from_buffer(program).forward((ids,))[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
