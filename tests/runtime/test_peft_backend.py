"""The server backend ``peft``: real transformers + peft + bitsandbytes over the bundle's base.

Checked against independent references: bitsandbytes' own ``quantize_4bit`` of the original
float weights (the bytes), the torch reference backend (logits, training), and transformers'
own uncached forward (the KV-cached decoder).
"""

import numpy as np
import pytest
import torch

import pocketpeft as pp
from pocketpeft.errors import AdapterShapeError, ConfigError
from pocketpeft.registry import BACKENDS
from pocketpeft.runtime import TrainConfig
from pocketpeft.runtime.backends import peft_backend
from pocketpeft.runtime.selection import probe
from pocketpeft.text import pack_rows
from tests.helpers import CHAT

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

LORA = pp.LoraConfig(r=4, lora_alpha=8)
IDS = [1, 3356, 346, 418, 260, 2682, 2970, 30]


@pytest.fixture(scope="module")
def bundles(tiny_hf_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("peft_backend")
    return {q: pp.export(tiny_hf_dir, root / q, quant=q, lora=LORA, seq_len=16, batch_size=4) for q in ("nf4", "q4_0")}


@pytest.fixture(scope="module")
def random_adapter(bundles):
    """A non-identity adapter (B != 0) so LoRA changes the logits."""
    g = torch.Generator().manual_seed(3)
    return {k: (torch.randn(v, generator=g) * 0.2).numpy() for k, v in bundles["nf4"].manifest.trainable.items()}


def _open(bundle, name, **kw):
    return pp.runtime.open(bundle, backend=name, **kw)


@pytest.fixture(scope="module")
def nf4_sess(bundles):
    """One peft session over the nf4 bundle, shared (each test sets the adapter it needs)."""
    return _open(bundles["nf4"], "peft")


def test_registered_with_its_extras_and_probed_on_cpu():
    assert BACKENDS["peft"].extra == "peft,bnb"
    p = probe("peft")
    assert p.available and "cpu" in p.devices
    caps = p.capabilities["cpu"]
    assert caps.train and caps.infer and caps.tier == "cpu"


def test_probe_names_the_missing_extra(monkeypatch):
    monkeypatch.setattr(peft_backend, "available", lambda mod: mod != "bitsandbytes")
    p = peft_backend.probe()
    assert not p.available and "bitsandbytes" in p.reason and "bnb" in p.reason


def test_nf4_base_holds_bitsandbytes_own_bytes(nf4_sess, tiny_hf_model):
    sess = nf4_sess
    ref = dict(tiny_hf_model.named_modules())
    seen = 0
    for name, mod in sess.backend.model.named_modules():
        if not isinstance(mod, bnb.nn.Linear4bit):
            continue
        hf_name = name.replace("base_model.model.", "").replace(".base_layer", "")
        w = ref[hf_name].weight.detach().float()
        packed, state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
        assert torch.equal(mod.weight.data.view(torch.uint8).reshape(-1), packed.reshape(-1)), name
        assert torch.equal(mod.weight.quant_state.absmax, state.absmax), name
        assert mod.weight.quant_state.quant_type == "nf4" and mod.weight.quant_state.blocksize == 64
        seen += 1
    assert seen == 2 * 7  # every frozen linear of both layers
    # LoRA on the targets goes through peft's own bitsandbytes layer (QLoRA), not a plain Linear wrapper
    q = sess.backend.model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert type(q).__module__ == "peft.tuners.lora.bnb" and type(q).__name__ == "Linear4bit"


def test_q4_0_base_is_the_dequantized_weights(bundles):
    ref = _open(bundles["q4_0"], "torch")
    sess = _open(bundles["q4_0"], "peft")
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in sess.backend.model.modules())
    mine = ref.backend.model.get_submodule("model.layers.1.mlp.down_proj").dequantized_weight()
    theirs = sess.backend.model.get_submodule("base_model.model.model.layers.1.mlp.down_proj").weight
    assert theirs.dtype == torch.float32 and torch.equal(mine, theirs)


@pytest.mark.parametrize("quant", ["nf4", "q4_0"])
def test_logits_and_eval_match_the_torch_reference(bundles, nf4_sess, random_adapter, quant):
    ref, sess = _open(bundles[quant], "torch"), nf4_sess if quant == "nf4" else _open(bundles[quant], "peft")
    sess.reset_adapter()
    np.testing.assert_allclose(sess.logits(IDS), ref.logits(IDS), atol=1e-4, rtol=0)
    ref.backend.set_adapter(random_adapter)
    sess.backend.set_adapter(random_adapter)
    a, b = ref.logits(IDS), sess.logits(IDS)
    np.testing.assert_allclose(b, a, atol=1e-4, rtol=0)
    ea, eb = ref.eval(CHAT[:8]), sess.eval(CHAT[:8])
    assert (ea.tokens, ea.top1, ea.top3) == (eb.tokens, eb.top1, eb.top3)
    assert eb.loss == pytest.approx(ea.loss, rel=1e-5)


def test_adapter_round_trip_and_bad_adapters_are_refused(nf4_sess, random_adapter):
    sess = nf4_sess
    sess.backend.set_adapter(random_adapter)
    got = sess.backend.get_adapter()
    assert set(got) == set(random_adapter)
    assert all(np.array_equal(got[k], random_adapter[k]) for k in got)
    key = next(iter(random_adapter))
    with pytest.raises(AdapterShapeError, match="missing"):
        sess.backend.set_adapter({k: v for k, v in random_adapter.items() if k != key})
    with pytest.raises(AdapterShapeError, match="shape"):
        sess.backend.set_adapter({**random_adapter, key: np.zeros((1, 1), np.float32)})
    with pytest.raises(AdapterShapeError, match="NaN"):
        sess.backend.set_adapter({**random_adapter, key: np.full_like(random_adapter[key], np.nan)})
    after = sess.backend.get_adapter()
    assert all(np.array_equal(after[k], random_adapter[k]) for k in after), "a refused adapter changed weights"


def test_training_moves_only_lora_and_keeps_the_nf4_bytes(nf4_sess):
    sess = nf4_sess
    sess.reset_adapter()
    frozen = {n: t.detach().clone() for n, t in sess.backend.model.state_dict().items() if ".lora_" not in n}
    before = sess.backend.get_adapter()
    rep = sess.train(CHAT, steps=2)
    assert rep.steps == 2 and not rep.skipped_steps and rep.backend == "peft"
    after = sess.backend.get_adapter()
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    for n, t in sess.backend.model.state_dict().items():
        if ".lora_" not in n:
            assert torch.equal(t, frozen[n]), f"frozen tensor {n} changed"


def test_non_finite_step_is_skipped_and_keeps_weights(nf4_sess):
    sess = nf4_sess
    sess.reset_adapter()
    be = sess.backend
    be.configure(TrainConfig(lr=1e30, warmup_steps=0, grad_clip=0.0, total_steps=5))
    x, y = pack_rows(sess.tokenizer, CHAT, 16)
    for _ in range(5):
        snap = be.get_adapter()
        r = be.train_step(x[:4], y[:4])
        if r.skipped:
            now = be.get_adapter()
            assert all(np.array_equal(now[k], snap[k]) for k in now)
            assert not (np.isfinite(r.loss) and np.isfinite(r.grad_norm))
            return
    pytest.fail("a divergent learning rate never produced a skipped step")


def test_decoder_matches_full_forward_and_truncates(nf4_sess, random_adapter):
    sess = nf4_sess
    sess.backend.set_adapter(random_adapter)
    full = sess.logits(IDS)
    dec = sess.backend.decoder()
    a, b = dec.extend(IDS[:3]), dec.extend(IDS[3:])
    assert dec.n_tokens == len(IDS)
    np.testing.assert_allclose(np.concatenate([a, b]), full, atol=1e-4, rtol=0)
    dec.truncate(3)
    assert dec.n_tokens == 3
    np.testing.assert_allclose(dec.extend(IDS[3:]), b, atol=1e-5, rtol=0)
    dec.truncate(0)
    np.testing.assert_allclose(dec.extend(IDS[:2]), full[:2], atol=1e-4, rtol=0)


def test_bfloat16_compute_stays_close_to_float32(bundles, nf4_sess):
    b = bundles["nf4"]
    ref = nf4_sess
    ref.reset_adapter()
    be = peft_backend.create("cpu", "bfloat16")
    be.load(b)
    assert next(m for m in be.model.modules() if isinstance(m, bnb.nn.Linear4bit)).compute_dtype == torch.bfloat16
    lg = be.logits(np.array([IDS]))[0]
    ref_lg = ref.logits(IDS)
    assert np.abs(lg - ref_lg).max() < 0.05 * np.abs(ref_lg).max()


def test_unsupported_dtype_is_a_config_error():
    with pytest.raises(ConfigError, match="float16"):
        peft_backend.create("cpu", "float16")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bitsandbytes' CUDA kernels)")
def test_cuda_matches_cpu(bundles):
    cpu, gpu = _open(bundles["nf4"], "peft:cpu"), _open(bundles["nf4"], "peft:cuda:0")
    assert next(m for m in gpu.backend.model.modules() if isinstance(m, bnb.nn.Linear4bit)).weight.device.type == "cuda"
    np.testing.assert_allclose(gpu.logits(IDS), cpu.logits(IDS), atol=1e-3, rtol=0)
    ra, rb = cpu.train(CHAT, steps=3), gpu.train(CHAT, steps=3)
    np.testing.assert_allclose(rb.losses, ra.losses, rtol=1e-3)


@pytest.mark.slow
def test_gpu_benchmark_smoke_runs_end_to_end(tmp_path):
    """benchmarks/gpu_train.py --smoke: tiny model on the CPU, every eager configuration, a result file."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    p = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_train", "--smoke", "--out", str(tmp_path)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_train_smoke_cpu.json").read_text())
    assert set(res["results"]) == {"pocketpeft eager", "peft+bnb nf4", "peft bf16 base"}
    for name, per in res["results"].items():
        assert "error" not in per, (name, per.get("traceback"))
        for batch in ("2", "4"):
            assert per[batch]["tokens_per_s"]["median"] > 0 and np.isfinite(per[batch]["losses_first_run"]).all()
    assert res["results"]["peft+bnb nf4"]["4"]["speed_vs_peft_bnb"] == pytest.approx(1.0)
