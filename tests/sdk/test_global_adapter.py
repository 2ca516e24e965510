"""Two-level adapters: a frozen global adapter under the trained personal one.

The reference for "global + personal" is real ``peft`` with two adapters loaded from our files
(``PeftModel.from_pretrained`` + ``load_adapter``, both active); every backend must reproduce its
logits, train only the personal adapter, and refuse a corrupt or foreign global adapter with a
typed error while the installed one stays.
"""

import json
import shutil

import numpy as np
import pytest
import torch

import pocketpeft as pp
from pocketpeft.adapter import Adapter, load_adapter
from pocketpeft.errors import AdapterShapeError, BaseModelMismatchError, CorruptFileError, ModelFileNotFoundError
from pocketpeft.global_adapter import GLOBAL_DIR, GlobalInfo, install_global, load_global, save_global
from tests.helpers import CHAT, SPLIT_LORA, hf_model_from_backend

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


def _random_tensors(manifest, seed: int, scale: float = 0.05) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in manifest.trainable.items()}


def _export(tiny_hf_dir, path, targets, lora=None, quant="q4_0", **kw):
    """The tiny model exported for ``targets`` with 16-token rows (``lora``: :data:`LORA` by default)."""
    return pp.export(
        tiny_hf_dir, path, quant=quant, lora=pp.LoraConfig(**(lora or LORA)), targets=targets, seq_len=16, **kw
    )


def _global_dir(bundle, path, seed=1, version=1, **info):
    m = bundle.manifest
    ad = Adapter(m.lora, _random_tensors(m, seed), m.base_sha256)
    return save_global(ad, GlobalInfo(version=version, **info), path)


@pytest.fixture(scope="module")
def bundle_dir(tiny_hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("global") / "b"
    pp.export(tiny_hf_dir, out, quant="q8_0", lora=pp.LoraConfig(**LORA), targets=["torch"], seq_len=32, batch_size=4)
    return out


@pytest.fixture()
def bundle(bundle_dir, tmp_path):
    """A private copy of the bundle (tests install into it)."""
    dst = tmp_path / "b"
    shutil.copytree(bundle_dir, dst)
    return pp.Bundle(dst)


def test_save_load_roundtrip_records_hash_base_and_dp(bundle, tmp_path):
    dp = {"epsilon": 7.9, "delta": 1e-5, "noise_multiplier": 0.8, "accountant": "dp_accounting RDP"}
    d = _global_dir(bundle, tmp_path / "g", version=3, source="fleet", rounds=5, clients=50, dp=dp)
    ad, info = load_global(d, bundle.manifest.base_sha256, bundle.manifest.trainable, bundle.manifest.lora)
    assert info.version == 3 and info.source == "fleet" and info.dp["epsilon"] == 7.9
    assert info.base_sha256 == bundle.manifest.base_sha256 and len(info.sha256) == 64
    assert set(ad.tensors) == set(bundle.manifest.trainable)
    # still a plain PEFT adapter directory
    assert json.loads((d / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_install_refuses_bad_global_and_keeps_the_installed_one(bundle, tmp_path):
    good = _global_dir(bundle, tmp_path / "g1", seed=1, version=1)
    install_global(bundle, good)
    before = (bundle.root / GLOBAL_DIR / "adapter_model.safetensors").read_bytes()

    corrupt = _global_dir(bundle, tmp_path / "g2", seed=2, version=2)
    raw = bytearray((corrupt / "adapter_model.safetensors").read_bytes())
    raw[-5] ^= 0xFF
    (corrupt / "adapter_model.safetensors").write_bytes(bytes(raw))
    foreign = _global_dir(bundle, tmp_path / "g3", seed=3, version=2)
    info = json.loads((foreign / "global.json").read_text())
    info["base_sha256"] = "f" * 64
    (foreign / "global.json").write_text(json.dumps(info))
    m = bundle.manifest
    shapes = {k: [s[0], s[1] + 1] for k, s in m.trainable.items()}
    wrong = tmp_path / "g4"
    save_global(
        Adapter(m.lora, {k: np.zeros(s, np.float32) for k, s in shapes.items()}, m.base_sha256),
        GlobalInfo(version=2),
        wrong,
    )
    nan = _global_dir(bundle, tmp_path / "g5", version=2)
    ad = load_adapter(nan)
    k0 = sorted(ad.tensors)[0]
    ad.tensors[k0][0, 0] = np.nan
    save_global(ad, GlobalInfo(version=2), nan)
    older = _global_dir(bundle, tmp_path / "g6", seed=6, version=1)

    cases = [
        (corrupt, CorruptFileError),
        (foreign, BaseModelMismatchError),
        (wrong, AdapterShapeError),
        (nan, CorruptFileError),
        (older, CorruptFileError),
        (tmp_path / "nothing", ModelFileNotFoundError),
    ]
    for src, err in cases:
        with pytest.raises(err):
            install_global(bundle, src)
        assert (bundle.root / GLOBAL_DIR / "adapter_model.safetensors").read_bytes() == before, src
    assert pp.Bundle(bundle.root).global_info().version == 1


def _peft_two_adapter_logits(hf, global_dir, personal_dir, ids):
    """Real peft: the global adapter and the personal one loaded from our files, both active."""
    import peft

    pm = peft.PeftModel.from_pretrained(hf, str(global_dir), adapter_name="global")
    pm.load_adapter(str(personal_dir), adapter_name="personal")
    pm.base_model.set_adapter(["global", "personal"])
    with torch.no_grad():
        return pm.eval()(input_ids=torch.tensor(ids[None])).logits[0].numpy()


@pytest.mark.parametrize("backend", ["torch", "peft"])
def test_global_plus_personal_matches_real_peft_and_trains_only_personal(bundle, tmp_path, backend):
    gdir = _global_dir(bundle, tmp_path / "g", seed=11)
    install_global(bundle, gdir)
    sess = pp.runtime.open(bundle.root, backend=backend)
    assert sess.global_info is not None and sess.global_info.version == 1
    personal = _random_tensors(bundle.manifest, 12)
    sess.set_adapter_tensors(personal)
    ids = np.asarray(sess.tokenizer.encode("see you at the game tonight"), np.int64)
    pdir = sess.save_adapter(tmp_path / "personal")
    assert load_adapter(pdir).metadata["pocketpeft.global_sha256"] == sess.global_info.sha256

    ref_backend = pp.runtime.open(bundle.root, backend="torch").backend
    hf = hf_model_from_backend(ref_backend)
    want = _peft_two_adapter_logits(hf, gdir, pdir, ids)
    got = sess.logits(ids.tolist())
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    # the global adapter is not a no-op: without it the logits differ
    only_personal = pp.runtime.open(bundle.root, backend=backend)
    only_personal.backend.set_global(None)
    only_personal.set_adapter_tensors(personal)
    assert np.abs(only_personal.logits(ids.tolist()) - want).max() > 1e-3

    sess.train(CHAT, steps=2)
    after = sess.get_adapter_tensors()
    assert set(after) == set(personal)  # get_adapter speaks of the personal adapter alone
    assert any(not np.allclose(after[k], personal[k]) for k in personal)
    # the global slot did not move while training
    sess2 = pp.runtime.open(bundle.root, backend=backend)
    sess2.set_adapter_tensors(after)
    np.testing.assert_allclose(sess2.logits(ids.tolist()), sess.logits(ids.tolist()), atol=1e-5)


def test_open_refuses_a_corrupted_installed_global(bundle, tmp_path):
    install_global(bundle, _global_dir(bundle, tmp_path / "g"))
    w = bundle.root / GLOBAL_DIR / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-7])
    with pytest.raises(CorruptFileError):
        pp.runtime.open(bundle.root, backend="torch")


def test_split_bundle_global_lives_in_the_suffix(tiny_hf_dir, tmp_path):
    b = _export(tiny_hf_dir, tmp_path / "s", ["torch"], SPLIT_LORA, quant="q8_0")
    install_global(b, _global_dir(b, tmp_path / "g", seed=5))
    whole = pp.runtime.open(b.root, backend="torch")
    assert whole.backend.split_layer == 1
    personal = _random_tensors(b.manifest, 6)
    whole.set_adapter_tensors(personal)
    ids = np.asarray(whole.tokenizer.encode("ok cool see you then"), np.int64)[None]
    full = whole.backend.logits(ids)
    _, suffix = whole.backend._split_parts()
    hidden = whole.backend.prefix(ids)
    with torch.no_grad():
        split = suffix(torch.as_tensor(hidden)).numpy()
    np.testing.assert_allclose(split, full, atol=1e-4)
    # the prefix (whose outputs the Personalizer caches) is the same with or without the global
    # adapter: every global tensor lives in a layer at or above the split
    assert all(
        int(k.split(".layers.")[1].split(".")[0]) >= b.manifest.split.layer for k in b.global_adapter()[0].tensors
    )
    whole.backend.set_global(None)
    np.testing.assert_array_equal(whole.backend.prefix(ids), hidden)
    assert np.abs(whole.backend.logits(ids) - full).max() > 1e-4


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_onnxruntime_applies_the_global_slot_as_torch_does(tiny_hf_dir, tmp_path, split):
    """The onnx graphs carry a frozen global slot: ORT (training, eval, infer.onnx) computes
    global + personal as torch does, trains only the personal adapter, and takes a newer global
    adapter installed on the device without a re-export."""
    pytest.importorskip("onnxruntime.training")
    lora = SPLIT_LORA if split else LORA
    plain = _export(tiny_hf_dir, tmp_path / "p", ["torch"], lora)
    g1 = _global_dir(plain, tmp_path / "g1", seed=31, version=1)
    b = _export(tiny_hf_dir, tmp_path / "b", ["torch", "onnx"], lora, batch_size=2, global_adapter=g1)
    assert b.manifest.global_slot and "global" in b.manifest.requires
    assert b.global_info().version == 1
    personal = _random_tensors(b.manifest, 32)
    sessions = {n: pp.runtime.open(b.root, backend=n) for n in ("torch", "onnxruntime", "onnxruntime-infer")}
    ids = sessions["torch"].tokenizer.encode("are you coming to the game")
    for s in sessions.values():
        assert s.global_info.version == 1
        s.set_adapter_tensors(personal)
    want = sessions["torch"].logits(ids)
    for n in ("onnxruntime", "onnxruntime-infer"):
        np.testing.assert_allclose(sessions[n].logits(ids), want, atol=1e-4, err_msg=n)
    rt = sessions["torch"].train(CHAT, steps=3, seed=1)
    ro = sessions["onnxruntime"].train(CHAT, steps=3, seed=1)
    np.testing.assert_allclose(ro.losses, rt.losses, rtol=1e-4)
    wt, wo = sessions["torch"].get_adapter_tensors(), sessions["onnxruntime"].get_adapter_tensors()
    for k in wt:
        np.testing.assert_allclose(wo[k], wt[k], atol=2e-5, err_msg=k)

    # a newer global adapter, installed on the device: every backend applies it on open
    install_global(b, _global_dir(b, tmp_path / "g2", seed=33, version=2))
    fresh = {n: pp.runtime.open(b.root, backend=n) for n in ("torch", "onnxruntime", "onnxruntime-infer")}
    for s in fresh.values():
        assert s.global_info.version == 2
        s.set_adapter_tensors(personal)
    want2 = fresh["torch"].logits(ids)
    assert np.abs(want2 - want).max() > 1e-3
    for n in ("onnxruntime", "onnxruntime-infer"):
        np.testing.assert_allclose(fresh[n].logits(ids), want2, atol=1e-4, err_msg=n)


def test_onnx_bundle_without_a_slot_refuses_an_installed_global(tiny_hf_dir, tmp_path):
    pytest.importorskip("onnxruntime.training")
    b = _export(tiny_hf_dir, tmp_path / "b", ["torch", "onnx"], quant="q8_0")
    assert not b.manifest.global_slot
    install_global(b, _global_dir(b, tmp_path / "g"))
    assert pp.runtime.open(b.root, backend="torch").global_info.version == 1
    with pytest.raises(pp.BackendUnavailableError, match="global-adapter slot"):
        pp.runtime.open(b.root, backend="onnxruntime")


def test_empty_slot_takes_a_global_installed_later(tiny_hf_dir, tmp_path):
    """export(global_slot=True): no global shipped, the onnx graphs hold a zero slot; a global
    adapter installed later is applied by ORT as by torch (the device-side install)."""
    pytest.importorskip("onnxruntime.training")
    b = _export(tiny_hf_dir, tmp_path / "b", ["torch", "onnx"], quant="q8_0", global_slot=True)
    assert b.manifest.global_slot and b.global_info() is None
    ids = pp.runtime.open(b.root, backend="torch").tokenizer.encode("see you soon")
    base = pp.runtime.open(b.root, backend="torch").logits(ids)
    np.testing.assert_allclose(pp.runtime.open(b.root, backend="onnxruntime").logits(ids), base, atol=1e-4)
    install_global(b, _global_dir(b, tmp_path / "g", seed=41))
    want = pp.runtime.open(b.root, backend="torch").logits(ids)
    assert np.abs(want - base).max() > 1e-3
    np.testing.assert_allclose(pp.runtime.open(b.root, backend="onnxruntime").logits(ids), want, atol=1e-4)


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_executorch_feeds_the_global_slot_as_torch_applies_it(tiny_hf_dir, tmp_path, split):
    """ExecuTorch's programs take the frozen global slot as inputs: logits and training steps
    match torch with global + personal, and a newer global installed on the device is used."""
    pytest.importorskip("executorch.extension.training", reason="executorch extra not installed")
    b = _export(
        tiny_hf_dir,
        tmp_path / "b",
        ["torch", "executorch"],
        SPLIT_LORA if split else LORA,
        batch_size=2,
        global_slot=True,
    )
    assert b.manifest.global_slot
    install_global(b, _global_dir(b, tmp_path / "g1", seed=51, version=1))
    personal = _random_tensors(b.manifest, 52)
    t, e = (pp.runtime.open(b.root, backend=n) for n in ("torch", "executorch"))
    for s in (t, e):
        assert s.global_info.version == 1
        s.set_adapter_tensors(personal)
    ids = t.tokenizer.encode("are you coming to the game")
    want1 = t.logits(ids)
    np.testing.assert_allclose(e.logits(ids), want1, atol=1e-4)
    rt, re_ = t.train(CHAT, steps=3, seed=1), e.train(CHAT, steps=3, seed=1)
    np.testing.assert_allclose(re_.losses, rt.losses, rtol=1e-3)
    wt, we = t.get_adapter_tensors(), e.get_adapter_tensors()
    for k in wt:
        np.testing.assert_allclose(we[k], wt[k], atol=1e-4, err_msg=k)
    np.testing.assert_allclose(e.logits(ids), t.logits(ids), atol=1e-4)
    install_global(b, _global_dir(b, tmp_path / "g2", seed=53, version=2))
    t2, e2 = (pp.runtime.open(b.root, backend=n) for n in ("torch", "executorch"))
    for s in (t2, e2):
        s.set_adapter_tensors(personal)
    np.testing.assert_allclose(e2.logits(ids), t2.logits(ids), atol=1e-4)
    assert np.abs(t2.logits(ids) - want1).max() > 1e-3  # same personal adapter, the new global


def test_a_corrupted_installed_global_is_replaced_by_a_good_one(bundle, tmp_path):
    install_global(bundle, _global_dir(bundle, tmp_path / "g1", version=1))
    w = bundle.root / GLOBAL_DIR / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-7])
    with pytest.raises(CorruptFileError):
        pp.Bundle(bundle.root).global_info()
    install_global(bundle, _global_dir(bundle, tmp_path / "g2", seed=2, version=2))
    assert pp.Bundle(bundle.root).global_info().version == 2


def test_personalizer_installs_nothing_when_a_session_cannot_apply_it(tiny_hf_dir, tmp_path):
    """The serving session can't apply a global adapter (onnx graphs without the slot): the install
    is refused before anything is written."""
    pytest.importorskip("onnxruntime.training")
    b = _export(tiny_hf_dir, tmp_path / "b", ["torch", "onnx"], quant="q8_0")
    p = pp.runtime.Personalizer(
        pp.runtime.open(b.root, backend="torch"),
        tmp_path / "s",
        general=[],
        serve_session=pp.runtime.open(b.root, backend="onnxruntime-infer", need_train=False),
    )
    with pytest.raises(pp.BackendUnavailableError, match="global"):
        p.install_global(_global_dir(b, tmp_path / "g"))
    assert not (b.root / GLOBAL_DIR).exists() and p.session.global_info is None
    p.close()
