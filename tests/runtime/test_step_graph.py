"""The torch backend's sync-free step (``step="device"``) and its CUDA graph (``step="graph"``)
against the reference recipe (``step="eager"``): same losses, gradient norms, adapters and skips.

The CPU tests run everywhere; the CUDA ones (``-m cuda``) where torch sees a GPU.
"""

import numpy as np
import pytest
import torch

import pocketpeft as pp
from pocketpeft.errors import ConfigError
from pocketpeft.runtime import TrainConfig
from pocketpeft.runtime.backends import torch_backend
from pocketpeft.text import pack_rows
from tests.helpers import CHAT

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; torch sees none here")
STEPS = 20
CFG = TrainConfig(lr=5e-3, warmup_steps=2, total_steps=STEPS, grad_clip=1.0, weight_decay=0.01)


@pytest.fixture(scope="module")
def bundle(tiny_hf_dir, tmp_path_factory):
    return pp.export(
        tiny_hf_dir,
        tmp_path_factory.mktemp("g") / "nf4",
        quant="nf4",
        lora=pp.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        targets=["torch"],
        seq_len=32,
        batch_size=4,
    )


@pytest.fixture(scope="module")
def rows(bundle):
    return pack_rows(pp.runtime.open(bundle, backend="torch").tokenizer, CHAT, 32)


def _run(bundle, rows, device="cpu", dtype="float32", step="eager", cfg=CFG, steps=STEPS, shapes=(4,), compile=False):
    """``steps`` train steps cycling through batch sizes ``shapes``; (results, adapter)."""
    be = torch_backend.create(device, dtype, step=step, compile=compile)
    be.load(bundle)
    be.configure(cfg)
    inputs, labels = rows
    out = []
    for i in range(steps):
        b = shapes[i % len(shapes)]
        j = (i * 4) % (len(inputs) - b)
        out.append(be.train_step(inputs[j : j + b], labels[j : j + b]))
    return out, be.get_adapter()


def _assert_same(a, b, rtol, atol):
    (ra, wa), (rb, wb) = a, b
    np.testing.assert_allclose([r.loss for r in ra], [r.loss for r in rb], rtol=rtol)
    np.testing.assert_allclose([r.grad_norm for r in ra], [r.grad_norm for r in rb], rtol=rtol * 10)
    assert [r.skipped for r in ra] == [r.skipped for r in rb]
    assert [r.lr for r in ra] == [r.lr for r in rb] and [r.tokens for r in ra] == [r.tokens for r in rb]
    for k in wa:
        np.testing.assert_allclose(wa[k], wb[k], atol=atol, rtol=0, err_msg=k)


def test_device_step_matches_reference_on_cpu(bundle, rows):
    ref = _run(bundle, rows, step="eager", shapes=(4, 3))
    assert ref[0][-1].loss < ref[0][0].loss
    _assert_same(_run(bundle, rows, step="device", shapes=(4, 3)), ref, rtol=1e-5, atol=1e-5)


def _poisoned_run(bundle, rows, device="cpu", step="eager"):
    """5 steps; the 3rd sees a NaN in the frozen final norm (NaN loss and gradients), restored after."""
    be = torch_backend.create(device, step=step)
    be.load(bundle)
    be.configure(CFG)
    inputs, labels = rows
    norm = be.model.model.norm.weight
    good = norm.detach().clone()
    out, adapters = [], []
    for i in range(5):
        with torch.no_grad():
            norm.copy_(torch.full_like(good, float("nan")) if i == 2 else good)
        out.append(be.train_step(inputs[4 * i : 4 * i + 4], labels[4 * i : 4 * i + 4]))
        adapters.append(be.get_adapter())
    return out, adapters


def _assert_skip_kept_weights(run, ref):
    (res, ads), (ref_res, ref_ads) = run, ref
    assert [r.skipped for r in res] == [r.skipped for r in ref_res] == [False, False, True, False, False]
    for k in ads[1]:
        assert np.array_equal(ads[2][k], ads[1][k]), f"{k} changed on a skipped step"
        np.testing.assert_allclose(ads[4][k], ref_ads[4][k], atol=1e-4, rtol=0, err_msg=k)
    np.testing.assert_allclose([r.loss for r in res[3:]], [r.loss for r in ref_res[3:]], rtol=1e-4)


def test_device_step_skips_non_finite_steps_like_reference(bundle, rows):
    _assert_skip_kept_weights(_poisoned_run(bundle, rows, step="device"), _poisoned_run(bundle, rows))


def test_bad_step_modes_are_config_errors():
    with pytest.raises(ConfigError, match="unknown"):
        torch_backend.create("cpu", step="jit")
    with pytest.raises(ConfigError, match="CUDA"):
        torch_backend.create("cpu", step="graph")


# ---------------------------------------------------------------- CUDA


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("dtype, rtol, atol", [("float32", 1e-4, 1e-4), ("bfloat16", 2e-2, 5e-3)])
def test_graph_step_matches_eager_on_cuda(bundle, rows, dtype, rtol, atol):
    """Two batch shapes alternating (two captured graphs), 20 steps, against eager on the GPU."""
    eager = _run(bundle, rows, "cuda:0", dtype, "eager", shapes=(4, 3))
    assert eager[0][-1].loss < eager[0][0].loss
    _assert_same(_run(bundle, rows, "cuda:0", dtype, "graph", shapes=(4, 3)), eager, rtol, atol)


@pytest.mark.cuda
@CUDA
def test_graph_step_skips_non_finite_steps(bundle, rows):
    ref = _poisoned_run(bundle, rows, "cuda:0", "eager")
    _assert_skip_kept_weights(_poisoned_run(bundle, rows, "cuda:0", "graph"), ref)


@pytest.mark.cuda
@CUDA
def test_graph_sees_adapter_changes_and_new_configs(bundle, rows):
    """set_adapter and configure between steps take effect in the replayed graph."""
    a = torch_backend.create("cuda:0", step="graph")
    b = torch_backend.create("cuda:0", step="eager")
    inputs, labels = rows
    for be in (a, b):
        be.load(bundle)
        be.configure(CFG)
        be.train_step(inputs[:4], labels[:4])
    start = {k: v * 0.5 for k, v in b.get_adapter().items()}
    for be in (a, b):
        be.set_adapter(start)
        be.configure(TrainConfig(lr=1e-3, warmup_steps=0, total_steps=3))
    ra = [a.train_step(inputs[4:8], labels[4:8]) for _ in range(3)]
    rb = [b.train_step(inputs[4:8], labels[4:8]) for _ in range(3)]
    np.testing.assert_allclose([r.loss for r in ra], [r.loss for r in rb], rtol=1e-4)
    for k, v in b.get_adapter().items():
        np.testing.assert_allclose(a.get_adapter()[k], v, atol=1e-4, rtol=0, err_msg=k)


@pytest.mark.cuda
@CUDA
def test_compiled_graph_step_matches_eager_on_cuda(bundle, rows):
    """compile=True: torch.compile'd forward/backward under the captured graph, bf16. Inductor
    fuses and rounds differently from eager bf16, and AdamW turns tiny gradient differences into
    whole steps where a gradient is near zero, so the adapters are compared as tensors (relative
    Frobenius distance), not element by element."""
    eager = _run(bundle, rows, "cuda:0", "bfloat16", "eager", steps=8)
    got = _run(bundle, rows, "cuda:0", "bfloat16", "graph", steps=8, compile=True)
    np.testing.assert_allclose([r.loss for r in got[0]], [r.loss for r in eager[0]], rtol=2e-2)
    assert [r.skipped for r in got[0]] == [r.skipped for r in eager[0]] == [False] * 8
    rel = {k: float(np.linalg.norm(got[1][k] - v) / np.linalg.norm(v)) for k, v in eager[1].items()}
    assert max(rel.values()) < 0.1, sorted(rel.items(), key=lambda kv: -kv[1])[:3]
