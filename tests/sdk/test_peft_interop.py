"""Adapters move both ways between pocketpeft and the real peft + transformers."""

import numpy as np
import peft
import pytest
import torch

import pocketpeft as pp
from pocketpeft.adapter import CONFIG_NAME, WEIGHTS_NAME, load_adapter
from pocketpeft.errors import AdapterShapeError, BaseModelMismatchError, CorruptFileError, ModelFileNotFoundError
from tests.helpers import CHAT, hf_model_from_backend, peft_logits

LORA = pp.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


@pytest.fixture(scope="module")
def bundle(tiny_hf_dir, tmp_path_factory):
    return pp.export(
        tiny_hf_dir, tmp_path_factory.mktemp("b") / "bundle", quant="q4_0", lora=LORA, seq_len=32, batch_size=4
    )


@pytest.fixture(scope="module")
def trained(bundle, tmp_path_factory):
    sess = pp.runtime.open(bundle, backend="torch")
    sess.train_config.lr = 1e-2
    rep = sess.train(CHAT, steps=6)
    assert not rep.skipped_steps
    path = sess.save_adapter(tmp_path_factory.mktemp("a") / "alice")
    return sess, path


def test_pocketpeft_adapter_loads_in_peft_with_same_logits(trained):
    sess, path = trained
    ids = np.array(sess.tokenizer.encode("are you coming to the game tonight or not"))
    ours = sess.logits(ids)
    hf = hf_model_from_backend(sess.backend)
    base, theirs, pm = peft_logits(hf, path, ids)
    assert np.abs(ours - base).max() > 1e-3, "the trained adapter should change the logits"
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_peft_adapter_loads_in_pocketpeft_with_same_logits(bundle, tmp_path):
    sess = pp.runtime.open(bundle, backend="torch")
    hf = hf_model_from_backend(sess.backend)
    torch.manual_seed(1)
    pm = peft.get_peft_model(
        hf,
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        ),
    ).eval()
    pm.save_pretrained(str(tmp_path / "from_peft"))
    ids = np.array(sess.tokenizer.encode("see you at the game"))
    with torch.no_grad():
        theirs = pm(input_ids=torch.tensor(ids[None])).logits[0].numpy()
    before = sess.logits(ids)
    sess.load_adapter(tmp_path / "from_peft")
    ours = sess.logits(ids)
    assert np.abs(before - theirs).max() > 1e-3
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_adapter_files_are_peft_format(trained):
    _, path = trained
    cfg = peft.PeftConfig.from_pretrained(str(path))
    assert cfg.peft_type == peft.PeftType.LORA and cfg.r == 4 and cfg.lora_alpha == 8
    ad = load_adapter(path)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in ad.tensors
    assert ad.tensors["base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"].shape == (64, 4)


def test_adapter_for_another_base_or_shape_is_refused(trained, tiny_hf_dir, tmp_path):
    sess, path = trained
    import json
    import shutil

    fake = tmp_path / "fake"
    shutil.copytree(path, fake)
    from safetensors.torch import load_file, save_file

    t = load_file(str(fake / WEIGHTS_NAME))
    save_file(t, str(fake / WEIGHTS_NAME), metadata={"format": "pt", "pocketpeft.base_sha256": "0" * 64})
    with pytest.raises(BaseModelMismatchError, match="trained on base"):
        sess.load_adapter(fake)
    # another rank (same base)
    r2 = pp.export(tiny_hf_dir, tmp_path / "r2", quant="q4_0", lora=pp.LoraConfig(r=2, lora_alpha=4), seq_len=32)
    s2 = pp.runtime.open(r2, backend="torch")
    with pytest.raises(AdapterShapeError, match="shape"):
        s2.load_adapter(path)
    # another scaling
    cfg = json.loads((fake / CONFIG_NAME).read_text())
    save_file(t, str(fake / WEIGHTS_NAME), metadata={"format": "pt"})
    cfg["lora_alpha"] = 32
    (fake / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(AdapterShapeError, match="scaling"):
        sess.load_adapter(fake)


def test_corrupt_or_missing_adapter_keeps_current_weights(trained, tmp_path):
    sess, path = trained
    before = sess.backend.get_adapter()
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    data = (bad / WEIGHTS_NAME).read_bytes()
    (bad / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="safetensors"):
        sess.load_adapter(bad)
    with pytest.raises(ModelFileNotFoundError, match=CONFIG_NAME):
        sess.load_adapter(tmp_path / "nowhere")
    (bad / CONFIG_NAME).write_text("{not json")
    with pytest.raises(CorruptFileError, match="JSON"):
        sess.load_adapter(bad)
    after = sess.backend.get_adapter()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_bf16_and_fp16_adapters_load_as_float32(bundle, tmp_path):
    """peft saves adapters trained in bf16/fp16 in that dtype; numpy has no bfloat16, so those
    tensors are read from their raw bytes. The reference is safetensors' own torch reader."""
    from safetensors.torch import load_file

    sess = pp.runtime.open(bundle, backend="torch")
    hf = hf_model_from_backend(sess.backend)
    torch.manual_seed(2)
    pm = peft.get_peft_model(
        hf,
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        ),
    )
    for i, (name, p) in enumerate((n, p) for n, p in pm.named_parameters() if "lora_" in n):
        p.data = p.data.to(torch.bfloat16 if i % 2 else torch.float16)
    pm.save_pretrained(str(tmp_path / "half"))
    want = {k: v.float().numpy() for k, v in load_file(str(tmp_path / "half" / WEIGHTS_NAME)).items()}
    assert {str(v.dtype) for v in load_file(str(tmp_path / "half" / WEIGHTS_NAME)).values()} == {
        "torch.bfloat16",
        "torch.float16",
    }
    ad = load_adapter(tmp_path / "half")
    assert set(ad.tensors) == set(want)
    for k, v in want.items():
        assert ad.tensors[k].dtype == np.float32
        np.testing.assert_array_equal(ad.tensors[k], v)
    sess.load_adapter(tmp_path / "half")  # and the session takes it
