"""Device vs server: the device backends against the server backend ``peft`` (real transformers +
peft + bitsandbytes over the same nf4 bytes), on an nf4 bundle.

* Loss curves over ``STEPS`` steps from the same adapter, data, seed and hyperparameters agree
  within the parity suite's stated tolerance (``LOSS_RTOL`` per step, ``ADAPTER_ATOL`` on the
  final LoRA tensors).
* An adapter trained on a device backend loads on the server — through pocketpeft's ``peft``
  backend and through ``peft.PeftModel.from_pretrained`` itself — with the same logits, and one
  written by peft's own ``save_pretrained`` loads on the device with the same logits.
* The CUDA variants (``-m cuda``) run where torch sees a GPU and skip with the reason elsewhere.

torch is checked on every run; executorch / onnxruntime need their export targets and are slow.
"""

import numpy as np
import pytest
import torch

import pocketpeft as pp
from pocketpeft.adapter import Adapter, save_adapter
from pocketpeft.registry import backend_target
from pocketpeft.runtime.backends.peft_backend import build_hf_model
from pocketpeft.runtime.selection import probe
from tests.helpers import CHAT
from tests.parity.test_backend_parity import ADAPTER_ATOL, LOGITS_ATOL, LOSS_RTOL, STEPS, TRAINING, _session, reference

peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

LORA = pp.LoraConfig(r=4, lora_alpha=8)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; torch sees none here")
# bf16 compute rounds every activation to 8 bits of mantissa: curves agree to ~1e-2, not 1e-3.
BF16_LOSS_RTOL = 2e-2

__all__ = ["reference"]  # the parity suite's torch reference run, here over the nf4 bundle below


@pytest.fixture(scope="module")
def bundle(tiny_hf_dir, tmp_path_factory):
    """nf4, torch target only: the fast half of the server parity."""
    return pp.export(
        tiny_hf_dir,
        tmp_path_factory.mktemp("server") / "nf4",
        quant="nf4",
        lora=LORA,
        targets=["torch"],
        seq_len=16,
        batch_size=4,
    )


def _train(bundle, name, steps=STEPS, seed=0):
    sess = _session(bundle, name)
    rep = sess.train(CHAT, steps=steps, seed=seed)
    assert rep.steps == steps and not rep.skipped_steps, (name, rep.skipped_steps)
    return sess, rep


@pytest.fixture(scope="module")
def server(bundle):
    sess, rep = _train(bundle, "peft")
    return {"sess": sess, "losses": rep.losses, "adapter": sess.backend.get_adapter()}


def _assert_same_training(device_losses, device_adapter, server, rtol=LOSS_RTOL, atol=ADAPTER_ATOL):
    np.testing.assert_allclose(device_losses, server["losses"], rtol=rtol)
    assert server["losses"][-1] < server["losses"][0], "training should lower the loss"
    assert set(device_adapter) == set(server["adapter"])
    for k, v in server["adapter"].items():
        np.testing.assert_allclose(device_adapter[k], v, atol=atol, rtol=0, err_msg=k)


def test_torch_loss_curve_and_adapter_match_peft(reference, server):
    assert len(reference["losses"]) == STEPS
    _assert_same_training(reference["losses"], reference["adapter"], server)


def test_device_adapter_loads_on_the_server_with_same_logits(bundle, reference, tmp_path):
    m = bundle.manifest
    path = save_adapter(
        Adapter(m.lora, {k: torch.from_numpy(v) for k, v in reference["adapter"].items()}, m.base_sha256),
        tmp_path / "from_torch",
    )
    ids = reference["ids"]
    device = pp.runtime.open(bundle, backend="torch", adapter=path).logits(ids)
    assert np.abs(device - reference["logits0"]).max() > 1e-3, "the trained adapter should change the logits"
    on_server = pp.runtime.open(bundle, backend="peft", adapter=path).logits(ids)
    np.testing.assert_allclose(on_server, device, atol=LOGITS_ATOL, rtol=0)
    # and through peft's own loader, on the bitsandbytes nf4 model built from the bundle
    pm = peft.PeftModel.from_pretrained(build_hf_model(bundle), str(path)).eval()
    with torch.no_grad():
        theirs = pm(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    np.testing.assert_allclose(theirs, device, atol=LOGITS_ATOL, rtol=0)


def test_server_adapter_saved_by_peft_loads_on_the_device(bundle, server, reference, tmp_path):
    sess = server["sess"]
    sess.backend.model.save_pretrained(str(tmp_path / "from_peft"))  # peft's writer, not ours
    ids = reference["ids"]
    theirs = sess.logits(ids)
    device = pp.runtime.open(bundle, backend="torch", adapter=tmp_path / "from_peft")
    np.testing.assert_allclose(device.logits(ids), theirs, atol=LOGITS_ATOL, rtol=0)
    assert np.abs(theirs - reference["logits0"]).max() > 1e-3


def test_torch_path_keeps_every_tensor_on_the_model_device(bundle):
    """The CUDA path must not mix in CPU tensors. The meta device refuses CPU operands exactly as
    CUDA does, so forward, backward and cached decoding run on it here without a GPU."""
    sess = pp.runtime.open(bundle, backend="torch")
    model = sess.backend.model.to("meta")
    ids = torch.zeros(2, 8, dtype=torch.long, device="meta")
    out = model(ids)
    out.float().sum().backward()
    assert out.device.type == "meta" and out.shape == (2, 8, bundle.manifest.arch.vocab_size)
    lora_a = next(p for n, p in model.named_parameters() if "lora_A" in n)
    assert lora_a.grad is not None and lora_a.grad.device.type == "meta"
    _, cache = model.forward_cached(ids[:1, :3], 0, None)
    logits, _ = model.forward_cached(ids[:1, 3:5], 3, cache)
    assert logits.device.type == "meta"


# ---------------------------------------------------------------- other device backends (slow)


@pytest.fixture(scope="module")
def device_bundle(tiny_hf_dir, tmp_path_factory):
    targets = [backend_target(n) for n in TRAINING if n == "torch" or probe(n).available]
    return pp.export(
        tiny_hf_dir,
        tmp_path_factory.mktemp("server_devices") / "nf4",
        quant="nf4",
        lora=LORA,
        targets=targets,
        seq_len=32,
        batch_size=4,
    )


def _device_params():
    out = []
    for name in ("executorch", "onnxruntime"):
        p = probe(name)
        marks = [pytest.mark.slow, pytest.mark.backend(name)]
        if not p.available:
            marks.append(pytest.mark.skip(reason=f"{name} not available here: {p.reason}"))
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.mark.parametrize("name", _device_params())
def test_device_backend_matches_peft_both_ways(device_bundle, name, tmp_path):
    srv, srv_rep = _train(device_bundle, "peft")
    dev, dev_rep = _train(device_bundle, name)
    _assert_same_training(
        dev_rep.losses, dev.backend.get_adapter(), {"losses": srv_rep.losses, "adapter": srv.backend.get_adapter()}
    )
    ids = dev.tokenizer.encode("see you at the game tonight")
    dev.save_adapter(tmp_path / "dev")
    on_server = pp.runtime.open(device_bundle, backend="peft", adapter=tmp_path / "dev")
    np.testing.assert_allclose(on_server.logits(ids), dev.logits(ids), atol=LOGITS_ATOL * 10, rtol=0)
    srv.backend.model.save_pretrained(str(tmp_path / "srv"))
    on_device = pp.runtime.open(device_bundle, backend=name, adapter=tmp_path / "srv")
    np.testing.assert_allclose(on_device.logits(ids), srv.logits(ids), atol=LOGITS_ATOL * 10, rtol=0)


# ---------------------------------------------------------------- CUDA


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("dtype, rtol", [("float32", LOSS_RTOL), ("bfloat16", BF16_LOSS_RTOL)])
def test_cuda_torch_and_peft_train_alike(bundle, server, dtype, rtol):
    """On the GPU: the torch reference (dequantized on the device) and peft + bitsandbytes' CUDA
    nf4 kernels, both at ``dtype``, against each other and against the CPU run."""
    from pocketpeft.runtime.backends import peft_backend, torch_backend
    from pocketpeft.runtime.session import Session

    runs = {}
    for mod in (torch_backend, peft_backend):
        be = mod.create("cuda:0", dtype)
        be.load(bundle)
        sess = Session(bundle, be)
        rep = sess.train(CHAT, steps=STEPS, seed=0)
        assert not rep.skipped_steps and rep.device == "cuda:0"
        runs[be.name] = rep.losses
    np.testing.assert_allclose(runs["torch"], runs["peft"], rtol=rtol)
    np.testing.assert_allclose(runs["peft"], server["losses"], rtol=rtol)


@pytest.mark.cuda
@CUDA
def test_adapters_move_between_a_cpu_device_and_a_cuda_server(bundle, reference, tmp_path):
    """A torch adapter trained on the CPU serves the same logits from peft + bitsandbytes on the
    GPU; an adapter trained there (written by peft's save_pretrained) does the same on the CPU."""
    m = bundle.manifest
    path = save_adapter(
        Adapter(m.lora, {k: torch.from_numpy(v) for k, v in reference["adapter"].items()}, m.base_sha256),
        tmp_path / "from_cpu",
    )
    ids = reference["ids"]
    device = pp.runtime.open(bundle, backend="torch", adapter=path).logits(ids)
    on_gpu = pp.runtime.open(bundle, backend="peft:cuda:0", adapter=path)
    assert on_gpu.backend.device == "cuda:0"
    np.testing.assert_allclose(on_gpu.logits(ids), device, atol=LOGITS_ATOL * 10, rtol=0)
    srv = _session(bundle, "peft:cuda:0")
    rep = srv.train(CHAT, steps=5, seed=0)
    assert rep.device == "cuda:0" and not rep.skipped_steps
    srv.backend.model.save_pretrained(str(tmp_path / "from_gpu"))
    back = pp.runtime.open(bundle, backend="torch", adapter=tmp_path / "from_gpu")
    theirs = srv.logits(ids)
    assert np.abs(theirs - reference["logits0"]).max() > 1e-3
    np.testing.assert_allclose(back.logits(ids), theirs, atol=LOGITS_ATOL * 10, rtol=0)
