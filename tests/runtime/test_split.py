"""Split updates: LoRA on the upper layers only, the frozen prefix run as inference and cached,
the suffix the only training graph.

Parity: split training equals unsplit training with the same layers on the torch reference
(losses rtol 1e-5 over 20 steps, adapters atol 2e-5), and the onnxruntime backend's split graphs
match that reference too; prefix outputs cached in float16 train to the same place within float16
rounding. Bad input: a manifest naming unknown features, a split outside the model, a split
bundle under a reader that predates splits.
"""

import json
import shutil

import numpy as np
import pytest

import pocketpeft as pp
from pocketpeft.errors import ConfigError, CorruptFileError, UnsupportedModelError
from pocketpeft.runtime import TrainConfig
from tests.helpers import CHAT, export_split_bundle

CFG = TrainConfig(lr=1e-2, warmup_steps=2, total_steps=20, weight_decay=0.01, grad_clip=1.0)


def _has_ort() -> bool:
    try:
        import onnxruntime.training  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def split_bundle(tiny_hf_dir, tmp_path_factory):
    return export_split_bundle(tiny_hf_dir, tmp_path_factory, ["torch", "onnx"] if _has_ort() else ["torch"])


@pytest.fixture(scope="module")
def whole_bundle(tiny_hf_dir, tmp_path_factory):
    return export_split_bundle(tiny_hf_dir, tmp_path_factory, ["torch"], split=False, name="whole")


def test_manifest_records_the_split(split_bundle, whole_bundle):
    m = split_bundle.manifest
    assert m.split is not None and m.split.layer == 1 and m.split.hidden_size == m.arch.hidden_size
    raw = json.loads((split_bundle.root / "manifest.json").read_text())
    assert raw["format_version"] == 2 and raw["requires"] == ["split"] and raw["split"]["layer"] == 1
    assert all(".layers.1." in k for k in m.trainable)
    assert whole_bundle.manifest.split is None
    raw = json.loads((whole_bundle.root / "manifest.json").read_text())
    assert raw["format_version"] == 1 and "requires" not in raw  # older readers still open it
    # the same seed and layers: the same initial adapter either way
    a, b = split_bundle.initial_adapter().tensors, whole_bundle.initial_adapter().tensors
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_split_needs_upper_layers(tiny_hf_dir, tmp_path):
    with pytest.raises(ConfigError, match="layers_to_transform"):
        pp.export(tiny_hf_dir, tmp_path / "b", lora=pp.LoraConfig(r=4), split=True, seq_len=16)
    assert not (tmp_path / "b").exists()
    with pytest.raises(ConfigError, match="split"):
        pp.export(tiny_hf_dir, tmp_path / "b", lora=pp.LoraConfig(r=4), split="yes", seq_len=16)


def test_torch_split_training_equals_unsplit(split_bundle, whole_bundle):
    s = pp.runtime.open(split_bundle, backend="torch", train_config=CFG)
    w = pp.runtime.open(whole_bundle, backend="torch", train_config=CFG)
    assert s.backend.split_layer == 1 and w.backend.split_layer is None
    rs, rw = s.train(CHAT, steps=20, seed=3), w.train(CHAT, steps=20, seed=3)
    assert rs.prefix_rows_computed > 0 and rw.prefix_rows_computed == 0
    np.testing.assert_allclose(rs.losses, rw.losses, rtol=1e-5)
    a, b = s.get_adapter_tensors(), w.get_adapter_tensors()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=2e-5, err_msg=k)
    es, ew = s.eval(CHAT[:8]), w.eval(CHAT[:8])
    assert (es.tokens, es.top1, es.top3) == (ew.tokens, ew.top1, ew.top3)
    assert es.loss == pytest.approx(ew.loss, rel=1e-5)


@pytest.mark.skipif(not _has_ort(), reason="needs onnxruntime-training (pip install 'pocketpeft[onnx]')")
def test_onnxruntime_split_matches_the_reference(split_bundle, whole_bundle):
    files = split_bundle.manifest.targets["onnx"]["files"]
    assert "onnx/prefix.onnx" in files
    o = pp.runtime.open(split_bundle, backend="onnxruntime", train_config=CFG)
    t = pp.runtime.open(whole_bundle, backend="torch", train_config=CFG)
    assert o.backend.split_layer == 1
    ids = o.tokenizer.encode("see you at the game tonight")
    np.testing.assert_allclose(o.logits(ids), t.logits(ids), atol=1e-4)
    # the prefix alone: the residual stream entering layer 1, as the torch reference computes it
    ts = pp.runtime.open(split_bundle, backend="torch")
    x = np.array([ids])
    np.testing.assert_allclose(o.backend.prefix(x), ts.backend.prefix(x), atol=1e-5)
    ro, rt = o.train(CHAT, steps=20, seed=3), t.train(CHAT, steps=20, seed=3)
    assert not ro.skipped_steps and ro.tokens == rt.tokens
    np.testing.assert_allclose(ro.losses, rt.losses, rtol=1e-5)
    a, b = o.get_adapter_tensors(), t.get_adapter_tensors()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=2e-5, err_msg=k)
    eo, et = o.eval(CHAT[:8]), t.eval(CHAT[:8])
    assert (eo.tokens, eo.top1, eo.top3) == (et.tokens, et.top1, et.top3)
    assert eo.loss == pytest.approx(et.loss, rel=1e-5)


def test_cache_keeps_prefix_outputs_across_calls(split_bundle, tmp_path):
    from pocketpeft.runtime.keyboard.hidden_cache import HiddenCache

    m = split_bundle.manifest
    cache = HiddenCache(tmp_path / "h.sqlite", "k", m.split.hidden_size)
    s = pp.runtime.open(split_bundle, backend="torch", train_config=CFG)
    r1 = s.train(CHAT, steps=6, seed=1, cache=cache)
    s.reset_adapter()
    r2 = s.train(CHAT, steps=6, seed=1, cache=cache)
    assert r1.prefix_rows_computed > 0 and r2.prefix_rows_computed == 0 and r2.prefix_rows_cached > 0
    # float16 prefix outputs: the same curve within float16 rounding of the hidden state
    np.testing.assert_allclose(r2.losses, r1.losses, rtol=2e-3)
    ev = s.eval(CHAT[:8], cache=cache)
    assert ev.loss == pytest.approx(s.eval(CHAT[:8]).loss, rel=2e-3)
    cache.close()


def test_unknown_features_and_bad_split_are_typed_errors(split_bundle, tmp_path, monkeypatch):
    from pocketpeft import manifest as mf

    def copy_with(edit):
        d = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        shutil.copytree(split_bundle.root, d)
        raw = json.loads((d / "manifest.json").read_text())
        edit(raw)
        (d / "manifest.json").write_text(json.dumps(raw))
        return d

    with pytest.raises(UnsupportedModelError, match="'requires'"):
        pp.Bundle(copy_with(lambda r: r.update(requires=["split", "hologram"])))
    with pytest.raises(UnsupportedModelError, match="split.layer"):
        pp.Bundle(copy_with(lambda r: r["split"].update(layer=7)))
    with pytest.raises(CorruptFileError, match="split.hidden_size"):
        pp.Bundle(copy_with(lambda r: r["split"].update(hidden_size="wide")))
    # a reader from before the split (it reads version 1 only) names the version field
    monkeypatch.setattr(mf, "READABLE_VERSIONS", (1,))
    with pytest.raises(UnsupportedModelError, match="format version 2"):
        pp.Bundle(split_bundle.root)


def test_personalizer_caches_prefix_outputs_and_wipes_them(split_bundle, tmp_path):
    from pocketpeft.runtime.keyboard.personalizer import HIDDEN_CACHE, Personalizer

    sess = pp.runtime.open(split_bundle, backend="torch", train_config=CFG)
    p = Personalizer(sess, tmp_path / "store", general=CHAT[:6], holdout_fraction=0.2, min_heldout_gain=0.0)
    assert p.hidden_cache is not None and (tmp_path / "store" / HIDDEN_CACHE).is_file()
    p.observe(CHAT)
    p.update(max_steps=3)
    first = p.hidden_cache.stats()
    assert first["entries"] > 0 and first["misses"] > 0
    p.observe(["one more message about the game tonight"])
    p.update(max_steps=3)
    second = p.hidden_cache.stats()
    assert second["hits"] > first["hits"]  # the general text and unchanged rows come from the cache
    out = p.wipe()
    assert out["hidden_cache"]["files"] and not (tmp_path / "store" / HIDDEN_CACHE).exists()
    p.close()
