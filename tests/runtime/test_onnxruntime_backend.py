"""The onnxruntime backend against the torch reference: logits, a 20-step loss curve, adapters,
every quant format, the artifacts' contract (only LoRA trainable, infer.onnx), errors, skips.

Tolerances: logits atol 1e-4; losses rtol 1e-5 and adapter weights atol 2e-5 after 20 steps
(measured: ~2e-7 relative and ~1.3e-6 absolute; both backends do float32 arithmetic in a
different order, nothing more).
"""

import json
import math
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime.training", reason="needs onnxruntime-training (pip install 'pocketpeft[onnx]')")

import pocketpeft as pp  # noqa: E402
from pocketpeft.errors import (
    AdapterShapeError,
    CorruptFileError,
    ModelFileNotFoundError,  # noqa: E402
    SequenceTooLongError,
)
from pocketpeft.runtime import TrainConfig  # noqa: E402
from pocketpeft.text import pack_rows  # noqa: E402
from tests.helpers import CHAT, run_without_torch  # noqa: E402

LORA = dict(r=4, lora_alpha=8)
PROMPTS = ["see you at the game tonight", "did you finish the homework"]


def _export(tiny_hf_dir, tmp_path_factory, quant):
    return pp.export(
        tiny_hf_dir,
        tmp_path_factory.mktemp(f"ort_{quant}") / "b",
        quant=quant,
        lora=pp.LoraConfig(**LORA),
        targets=["torch", "onnx"],
        seq_len=32,
        batch_size=4,
    )


@pytest.fixture(scope="module")
def bundle(tiny_hf_dir, tmp_path_factory):
    return _export(tiny_hf_dir, tmp_path_factory, "q4_0")


@pytest.fixture(scope="module")
def rows(bundle):
    return pack_rows(bundle.tokenizer(), CHAT, bundle.manifest.seq_len)


def _pair(bundle, cfg=None):
    return (
        pp.runtime.open(bundle, backend="torch", train_config=cfg),
        pp.runtime.open(bundle, backend="onnxruntime", train_config=cfg),
    )


def _random_adapter(bundle, seed=0):
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * 0.1).astype(np.float32) for k, s in bundle.manifest.trainable.items()}


def test_probe_lists_cpu():
    from pocketpeft.runtime.backends import onnxruntime_backend

    p = onnxruntime_backend.probe()
    assert p.available and "cpu" in p.devices and p.capabilities["cpu"].train and not p.reason


def test_initial_logits_match_torch(bundle, rows):
    t, o = _pair(bundle)
    ids = t.tokenizer.encode(PROMPTS[0])
    np.testing.assert_allclose(o.logits(ids), t.logits(ids), atol=1e-4)
    batch = rows[0][:3, :17]  # dynamic batch and length
    np.testing.assert_allclose(o.backend.logits(batch), t.backend.logits(batch), atol=1e-4)


def test_training_matches_torch_for_20_steps(bundle, tmp_path):
    cfg = TrainConfig(lr=1e-2, warmup_steps=2, total_steps=20, weight_decay=0.01, grad_clip=1.0)
    t, o = _pair(bundle, cfg)
    rt, ro = t.train(CHAT, steps=20), o.train(CHAT, steps=20)
    assert not ro.skipped_steps and ro.tokens == rt.tokens
    np.testing.assert_allclose(ro.losses, rt.losses, rtol=1e-5)
    assert np.mean(ro.losses[-3:]) < np.mean(ro.losses[:3])
    wt, wo = t.backend.get_adapter(), o.backend.get_adapter()
    assert set(wt) == set(wo) == set(bundle.manifest.trainable)
    for k in wt:
        np.testing.assert_allclose(wo[k], wt[k], atol=2e-5, err_msg=k)
    # the ORT-trained adapter, saved in PEFT format, gives the same logits in the torch backend
    o.save_adapter(tmp_path / "ad")
    back = pp.runtime.open(bundle, backend="torch", adapter=tmp_path / "ad")
    ids = back.tokenizer.encode(PROMPTS[1])
    np.testing.assert_allclose(back.logits(ids), o.logits(ids), atol=1e-4)
    et, eo = t.eval(CHAT[:8]), o.eval(CHAT[:8])
    assert (eo.tokens, eo.top1, eo.top3) == (et.tokens, et.top1, et.top3)
    assert eo.loss == pytest.approx(et.loss, rel=1e-5)


def test_accumulation_and_odd_batches_match_torch(bundle, rows):
    """The training graph is static [4, 32]: fewer rows, more rows and shorter rows are padded
    or split, with torch's numbers; grad_accum only regroups a sum."""
    inputs, labels = rows
    cfg = TrainConfig(lr=5e-3, grad_accum=2, warmup_steps=0)
    t, o = _pair(bundle, cfg)
    for be in (t.backend, o.backend):
        be.configure(cfg)
    for n, length in ((4, 32), (3, 32), (6, 32), (4, 20)):
        x, y = inputs[:n, :length], labels[:n, :length]
        rt, ro = t.backend.train_step(x, y), o.backend.train_step(x, y)
        assert ro.tokens == rt.tokens and not ro.skipped
        assert ro.loss == pytest.approx(rt.loss, rel=1e-5) and ro.grad_norm == pytest.approx(rt.grad_norm, rel=1e-4)
    wt, wo = t.backend.get_adapter(), o.backend.get_adapter()
    for k in wt:
        np.testing.assert_allclose(wo[k], wt[k], atol=1e-5)
    with pytest.raises(SequenceTooLongError, match="at most 32 tokens"):
        o.backend.train_step(np.zeros((1, 33), np.int64), np.zeros((1, 33), np.int64))


@pytest.mark.parametrize("quant", ["q8_0", "nf4"])
def test_other_quant_formats(tiny_hf_dir, tmp_path_factory, quant):
    b = _export(tiny_hf_dir, tmp_path_factory, quant)
    t, o = _pair(b, TrainConfig(lr=1e-2, warmup_steps=0))
    ids = t.tokenizer.encode(PROMPTS[0])
    np.testing.assert_allclose(o.logits(ids), t.logits(ids), atol=1e-4)
    rt, ro = t.train(CHAT, steps=2), o.train(CHAT, steps=2)
    np.testing.assert_allclose(ro.losses, rt.losses, rtol=1e-5)


def test_only_lora_is_trainable_in_checkpoint(bundle):
    import onnx
    from onnxruntime.training.api import CheckpointState, Module

    onnx_dir = bundle.root / "onnx"
    state = CheckpointState.load_checkpoint(str(onnx_dir / "checkpoint"))
    Module(str(onnx_dir / "training_model.onnx"), state, device="cpu")  # parameters are readable once bound
    params = {n: p for n, p in state.parameters}
    trainable = {n: list(p.data.shape) for n, p in params.items() if p.requires_grad}
    assert trainable == bundle.manifest.trainable
    frozen = {n: p.data.dtype for n, p in params.items() if not p.requires_grad}
    assert frozen["model.layers.0.self_attn.q_proj.base_layer.qweight"] == np.uint8  # 4-bit stays packed
    assert frozen["model.embed_tokens.weight"] == np.float32
    io = json.loads((onnx_dir / "io.json").read_text())
    assert set(io["lora"]) == set(bundle.manifest.trainable)
    for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "infer.onnx"):
        assert onnx.load(str(onnx_dir / name), load_external_data=False).ir_version <= 10, name


def test_infer_onnx_takes_lora_inputs(bundle, rows):
    import onnxruntime as ort

    adapter = _random_adapter(bundle)
    t = pp.runtime.open(bundle, backend="torch")
    t.backend.set_adapter(adapter)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(bundle.root / "onnx" / "infer.onnx"), so, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", *bundle.manifest.trainable]
    assert [i.name for i in sess.get_overridable_initializers()] == ["labels"]  # optional, written at export
    assert [o.name for o in sess.get_outputs()] == ["logits", "loss_sum"]
    for ids in (rows[0][:2, :11], rows[0][:1, :1]):
        (got,) = sess.run(["logits"], {"input_ids": ids, **adapter})
        np.testing.assert_allclose(got, t.backend.logits(ids), atol=1e-4)
        got, loss = sess.run(None, {"input_ids": ids, **adapter})  # no labels: nothing scored
        assert loss == 0.0
    ids, labels = rows[0][:2], rows[1][:2]
    (loss,) = sess.run(["loss_sum"], {"input_ids": ids, "labels": labels, **adapter})
    assert float(loss) == pytest.approx(t.backend.eval_batch(ids, labels).loss_sum, rel=1e-5)


def test_infer_backend_refuses_old_infer_onnx(bundle, tmp_path):
    """A bundle whose infer.onnx predates the export-time loss: a typed error asking to re-export."""
    import onnx

    from pocketpeft.fsutil import sha256_file

    root = _copy(bundle, tmp_path)
    path = root / "onnx" / "infer.onnx"
    mp = onnx.load(str(path))
    keep = [n for n in mp.graph.node if not n.name.startswith("fo.")]
    del mp.graph.node[:]
    mp.graph.node.extend(keep)
    for coll in (mp.graph.input, mp.graph.output, mp.graph.initializer):
        kept = [x for x in coll if x.name not in ("labels", "loss_sum") and not x.name.startswith("fo.")]
        del coll[:]
        coll.extend(kept)
    onnx.save(mp, str(path))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"]["onnx/infer.onnx"].update(bytes=path.stat().st_size, sha256=sha256_file(path))
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptFileError, match="re-export"):
        pp.runtime.open(root, backend="onnxruntime-infer", need_train=False)


def test_set_adapter_checks_shapes(bundle):
    o = pp.runtime.open(bundle, backend="onnxruntime")
    bad = _random_adapter(bundle)
    key = next(iter(bad))
    bad[key] = bad[key][:, :-1]
    with pytest.raises(AdapterShapeError, match="shape"):
        o.backend.set_adapter(bad)
    with pytest.raises(AdapterShapeError, match="missing"):
        o.backend.set_adapter({key: _random_adapter(bundle)[key]})


def _copy(bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(bundle.root, dst)
    return dst


def test_truncated_onnx_is_corrupt(bundle, tmp_path):
    root = _copy(bundle, tmp_path)
    path = root / "onnx" / "training_model.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CorruptFileError, match="training_model.onnx"):
        pp.runtime.open(root, backend="onnxruntime")
    # even when the manifest is rewritten to vouch for it, ORT's refusal becomes a CorruptFileError
    from pocketpeft.fsutil import sha256_file

    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"]["onnx/training_model.onnx"].update(bytes=path.stat().st_size, sha256=sha256_file(path))
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptFileError, match="training_model.onnx"):
        pp.runtime.open(root, backend="onnxruntime")


def test_bundle_without_onnx_target(bundle, tmp_path):
    root = _copy(bundle, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["targets"]["onnx"]
    manifest["files"] = {k: v for k, v in manifest["files"].items() if v["target"] != "onnx"}
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFileNotFoundError, match="--targets onnx"):
        pp.runtime.open(root, backend="onnxruntime")


def test_non_finite_loss_skips_step_and_keeps_state(bundle, rows):
    inputs, labels = rows
    o = pp.runtime.open(
        bundle, backend="onnxruntime", train_config=TrainConfig(lr=1e30, warmup_steps=0, grad_clip=0.0, total_steps=6)
    )
    be = o.backend
    be.configure(o.train_config)

    def snapshot():
        return be.get_adapter(), {k: (m.copy(), v.copy()) for k, (m, v) in be._opt.moments.items()}, be.step

    results, snapshots = [], [snapshot()]
    for _ in range(6):
        results.append(be.train_step(inputs[:4], labels[:4]))
        snapshots.append(snapshot())
    skipped = [i for i, r in enumerate(results) if r.skipped]
    assert skipped, [r.loss for r in results]
    i = skipped[0]
    assert not math.isfinite(results[i].loss) or not math.isfinite(results[i].grad_norm)
    (w0, m0, s0), (w1, m1, s1) = snapshots[i], snapshots[i + 1]
    assert s1 == s0 and set(m1) == set(m0)
    for k in w0:
        assert np.array_equal(w1[k], w0[k], equal_nan=True), f"{k} changed on a skipped step"
    for k in m0:
        assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(m1[k], m0[k])), f"moments of {k} changed"


def test_low_memory_export_options_train_as_torch(tiny_hf_dir, tmp_path, rows):
    """OnnxOptions(rows=1) (micro-batches of one row) with q4="int8" (one int8 per 4-bit weight)
    trains with torch's numbers; the options are validated and recorded (io.json, manifest)."""
    from onnxruntime.training.api import CheckpointState

    from pocketpeft.errors import ConfigError
    from pocketpeft.export import OnnxOptions

    b = pp.export(
        tiny_hf_dir,
        tmp_path / "b",
        quant="q4_0",
        lora=pp.LoraConfig(**LORA),
        targets=["torch", "onnx"],
        seq_len=32,
        batch_size=4,
        onnx=OnnxOptions(rows=1, q4="int8"),
    )
    io = json.loads((b.root / "onnx" / "io.json").read_text())
    assert io["training_model"]["inputs"]["input_ids"] == [1, 32] and io["q4_0_storage"] == "int8"
    assert b.manifest.options == {"onnx": {"rows": 1, "q4": "int8"}}
    state = CheckpointState.load_checkpoint(str(b.root / "onnx" / "checkpoint"))
    names = {n for n, _ in state.parameters}
    assert "model.layers.0.self_attn.q_proj.base_layer.qweight_int8" in names
    assert not any(n.endswith(".qweight") for n in names)
    cfg = TrainConfig(lr=1e-2, warmup_steps=0, total_steps=5)
    t, o = _pair(b, cfg)
    for be in (t.backend, o.backend):
        be.configure(cfg)
    inputs, labels = rows
    for _ in range(3):
        rt, ro = t.backend.train_step(inputs[:4], labels[:4]), o.backend.train_step(inputs[:4], labels[:4])
        assert ro.loss == pytest.approx(rt.loss, rel=1e-5) and ro.grad_norm == pytest.approx(rt.grad_norm, rel=1e-4)
    wt, wo = t.backend.get_adapter(), o.backend.get_adapter()
    for k in wt:
        np.testing.assert_allclose(wo[k], wt[k], atol=1e-5, err_msg=k)
    np.testing.assert_allclose(o.backend.logits(inputs[:2, :9]), t.backend.logits(inputs[:2, :9]), atol=1e-4)
    for field, bad in (("rows", 0), ("rows", "2"), ("q4", "int4")):
        with pytest.raises(ConfigError, match=rf"OnnxOptions\.{field}"):
            OnnxOptions(**{field: bad})
    with pytest.raises(ConfigError, match="OnnxOptions"):
        pp.export(
            tiny_hf_dir,
            tmp_path / "bad",
            quant="q4_0",
            lora=pp.LoraConfig(**LORA),
            targets=["onnx"],
            seq_len=32,
            batch_size=4,
            onnx={"rows": 1},
        )
    assert not (tmp_path / "bad").exists()


def test_trains_without_torch(bundle, tmp_path):
    """On a device torch isn't installed: the onnxruntime backend must train and save an adapter
    with torch unimportable (a child process blocks it), and match the torch backend's losses and
    adapter in this process."""
    (tmp_path / "texts.json").write_text(json.dumps(CHAT))
    out = run_without_torch(
        "import pocketpeft as pp\n"
        "sess = pp.runtime.open(sys.argv[1], backend='onnxruntime')\n"
        "rep = sess.train(json.load(open(sys.argv[2])), steps=3, seed=0)\n"
        "sess.save_adapter(sys.argv[3])\n"
        "print(json.dumps({'losses': rep.losses, 'torch': [m for m in sys.modules if m.split('.')[0] == 'torch']}))\n",
        str(bundle.root),
        str(tmp_path / "texts.json"),
        str(tmp_path / "ad"),
    )
    assert out["torch"] == []
    ref = pp.runtime.open(bundle, backend="torch")
    rep = ref.train(CHAT, steps=3, seed=0)
    np.testing.assert_allclose(out["losses"], rep.losses, rtol=1e-5)
    ids = bundle.tokenizer().encode(PROMPTS[0])
    want = ref.logits(ids)
    ref.load_adapter(tmp_path / "ad")
    np.testing.assert_allclose(ref.logits(ids), want, atol=1e-4)
