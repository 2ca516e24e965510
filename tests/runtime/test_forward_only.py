"""Forward-only (SPSA) updates against the torch reference: the estimator is the autograd
directional derivative, no backward graph is built, the ONNX Runtime inference graph gives the
torch loss, updates reduce held-out loss reproducibly, and selection / CLI pick the mode.

Tolerances: float64 central difference vs autograd at eps 1e-6, rtol 1e-7 (measured 2e-9; its
error is O(eps^2): 4e-6 at eps 1e-4, 4e-8 at 1e-5); float32 trainer step vs autograd at eps 1e-3,
rtol 2e-2; ORT vs torch summed loss rtol 1e-5 (float32 arithmetic in another order).
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pocketpeft as pp
from pocketpeft.errors import AdapterShapeError, BackendUnavailableError, ConfigError
from pocketpeft.reference.lora import load_lora_state_dict, lora_parameters
from pocketpeft.runtime import ForwardOnlyConfig, ForwardOnlyTrainer, TrainConfig
from pocketpeft.runtime.forward_only import direction, directional_derivative
from pocketpeft.text import pack_rows
from tests.helpers import CHAT

HELD_OUT = [
    "are you going to the party tomorrow night",
    "i'll see you at the game later",
    "did you do the reading for class yet",
    "ok cool see you then",
    "what time should i pick you up",
]


@pytest.fixture(scope="module")
def bundle(tiny_hf_dir, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    return pp.export(
        tiny_hf_dir,
        tmp_path_factory.mktemp("fo") / "b",
        quant="q4_0",
        lora=pp.LoraConfig(r=4, lora_alpha=8),
        targets=["torch", "onnx"],
        seq_len=32,
        batch_size=4,
    )


@pytest.fixture(scope="module")
def rows(bundle):
    x, y = pack_rows(bundle.tokenizer(), CHAT, bundle.manifest.seq_len)
    return x[:4], y[:4]


def _random_adapter(bundle, seed=0, scale=0.1):
    rng = np.random.default_rng(seed)
    return {
        k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in sorted(bundle.manifest.trainable.items())
    }


def _torch(bundle, adapter=None):
    s = pp.runtime.open(bundle, backend="torch")
    if adapter is not None:
        s.backend.set_adapter(adapter)
    return s.backend


def _autograd_grad(model, ids, labels):
    """PEFT key -> d(mean token CE)/d(tensor) by backprop through the torch reference."""
    from pocketpeft.reference.lora import lora_state_dict

    for p in lora_parameters(model):
        p.grad = None
    ids, lab = torch.as_tensor(ids), torch.as_tensor(labels)
    logits = model(ids)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1), ignore_index=-100)
    loss.backward()
    keys = list(lora_state_dict(model))  # model order, A then B: the order of lora_parameters
    return {k: p.grad.detach().double().numpy().copy() for k, p in zip(keys, lora_parameters(model))}


def test_direction_is_regenerated_not_stored():
    shapes = {"a": (3, 5), "b": (700, 300)}
    z1, z2 = dict(direction(7, 3, 0, shapes)), dict(direction(7, 3, 0, shapes))
    assert all(np.array_equal(z1[k], z2[k]) and z1[k].dtype == np.float32 for k in shapes)
    # each tensor has its own stream: the first one regenerated alone gives the same values
    assert np.array_equal(next(iter(direction(7, 3, 0, {"a": (3, 5)})))[1], z1["a"])
    for other in (dict(direction(8, 3, 0, shapes)), dict(direction(7, 4, 0, shapes)), dict(direction(7, 3, 1, shapes))):
        assert not np.array_equal(other["b"], z1["b"])
    b = z1["b"].astype(np.float64)
    assert abs(b.mean()) < 0.01 and abs(b.std() - 1) < 0.01  # standard normal, 210k draws


def test_estimator_matches_autograd_directional_derivative_float64(bundle, rows, monkeypatch):
    """(L(θ+εz) - L(θ-εz)) / 2ε equals ∇L·z from autograd on the torch reference, in float64.

    The reference's RMSNorm computes in float32 (like transformers'); its float32 rounding would
    swamp a float64 central difference, so here it keeps its input's dtype."""
    from pocketpeft.reference.model import RMSNorm

    monkeypatch.setattr(
        RMSNorm, "forward", lambda self, x: self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
    )
    ids, labels = rows
    model = _torch(bundle, _random_adapter(bundle)).model.double()
    theta = {k: v.astype(np.float64) for k, v in _random_adapter(bundle).items()}
    load_lora_state_dict(model, {k: torch.from_numpy(v) for k, v in theta.items()})
    grad = _autograd_grad(model, ids, labels)
    shapes = {k: v.shape for k, v in theta.items()}

    @torch.no_grad()
    def loss(tensors):
        load_lora_state_dict(model, {k: torch.from_numpy(v) for k, v in tensors.items()})
        logits = model(torch.as_tensor(ids))
        return float(
            F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), torch.as_tensor(labels).reshape(-1), ignore_index=-100
            )
        )

    for k in range(3):
        z = {key: v.astype(np.float64) for key, v in direction(11, 0, k, shapes)}
        exact = sum(float(np.sum(grad[key] * z[key])) for key in theta)
        est = directional_derivative(loss, theta, z, eps=1e-6)
        assert est == pytest.approx(exact, rel=1e-7), (k, est, exact)
        assert abs(exact) > 1e-3  # a real signal, not two zeros agreeing


def test_trainer_step_is_spsa_against_autograd(bundle, rows):
    """One float32 step moves θ by -lr·g·z with g the autograd directional derivative (eps 1e-3)."""
    ids, labels = rows
    start = _random_adapter(bundle)
    fo = ForwardOnlyTrainer(_torch(bundle, start), ForwardOnlyConfig(lr=1e-2, eps=1e-3, seed=5))
    cfg = TrainConfig(warmup_steps=0, total_steps=10)
    fo.configure(cfg)
    lr = fo.lr_at(0)
    assert lr == pytest.approx(1e-2)
    r = fo.train_step(ids, labels)
    assert not r.skipped and r.tokens == int((labels != -100).sum())
    after = fo.get_adapter()
    z = dict(direction(5, 0, 0, {k: v.shape for k, v in start.items()}))
    delta_dot_z = sum(float(np.dot((after[k] - start[k]).ravel().astype(np.float64), z[k].ravel())) for k in z)
    g_trainer = -delta_dot_z / (lr * sum(float(np.dot(v.ravel(), v.ravel())) for v in z.values()))
    grad = _autograd_grad(_torch(bundle, start).model, ids, labels)
    g_exact = sum(float(np.sum(grad[k] * z[k])) for k in z)
    assert g_trainer == pytest.approx(g_exact, rel=2e-2)
    # the wrapped backend now holds the updated adapter (eval and logits see it)
    np.testing.assert_array_equal(fo.inner.get_adapter()[next(iter(z))], after[next(iter(z))])


def test_no_backward_graph_is_built(bundle, rows):
    ids, labels = rows
    fo = ForwardOnlyTrainer(_torch(bundle))
    seen = []
    hook = fo.inner.model.register_forward_hook(
        lambda m, a, out: seen.append((torch.is_grad_enabled(), out.requires_grad, out.grad_fn))
    )
    try:
        fo.train_step(ids, labels)
    finally:
        hook.remove()
    assert len(seen) == 2 and all(s == (False, False, None) for s in seen)
    assert all(p.grad is None for p in lora_parameters(fo.inner.model))


def test_onnx_inference_graph_gives_the_torch_loss(bundle, rows):
    """The same θ through infer.onnx (plain InferenceSession, LoRA tensors as inputs) and through
    the torch reference: same summed loss, token counts, top-k hits and logits."""
    import onnxruntime as ort

    ids, labels = rows
    theta = _random_adapter(bundle, seed=3)
    t = _torch(bundle, theta)
    o = pp.runtime.open(bundle, backend="onnxruntime-infer", need_train=False).backend
    o.set_adapter(theta)
    assert type(o.session) is ort.InferenceSession
    assert not o.capabilities().train and o.capabilities().forward_only
    et, eo = t.eval_batch(ids, labels), o.eval_batch(ids, labels)
    assert eo.loss_sum == pytest.approx(et.loss_sum, rel=1e-5) and o.loss_sum(ids, labels) == pytest.approx(
        et.loss_sum, rel=1e-5
    )
    assert (eo.tokens, eo.top1, eo.top3) == (et.tokens, et.top1, et.top3)
    np.testing.assert_allclose(o.logits(ids[:2, :9]), t.logits(ids[:2, :9]), atol=1e-4)
    with pytest.raises(AdapterShapeError, match="shape"):
        o.set_adapter({k: v[:1] for k, v in theta.items()})
    with pytest.raises(BackendUnavailableError, match="forward-only"):
        o.train_step(ids, labels)


def _train(bundle, backend, steps, seed=0):
    sess = pp.runtime.open(
        bundle,
        backend=backend,
        update="forward-only",
        train_config=TrainConfig(seed=seed),
        forward_only=ForwardOnlyConfig(lr=2e-2, eps=1e-3),
    )
    before = sess.eval(HELD_OUT).loss
    rep = sess.train(CHAT, steps=steps)
    return sess, before, rep


@pytest.mark.slow  # 36 forward-only steps: 80 s on a loaded 2-core machine
def test_updates_reduce_held_out_loss_reproducibly(bundle):
    """30 steps lower the held-out loss (measured: 10.740 -> 10.722; backprop's AdamW gets
    10.604 in 20); the same seed gives the same adapter bit for bit, another seed another run."""
    sess, before, rep = _train(bundle, "onnxruntime-infer", 30)
    assert isinstance(sess.backend, ForwardOnlyTrainer) and rep.steps == 30 and not rep.skipped_steps
    assert sess.eval(HELD_OUT).loss < before - 5e-3
    runs = [_train(bundle, "onnxruntime-infer", 3, seed=seed) for seed in (0, 0, 1)]
    assert runs[0][2].losses == runs[1][2].losses != runs[2][2].losses
    a, b, c = (r[0].backend.get_adapter() for r in runs)
    assert all(np.array_equal(a[k], b[k]) for k in a) and not all(np.array_equal(a[k], c[k]) for k in a)


def test_skips_a_non_finite_step(bundle, rows):
    ids, labels = rows
    huge = {k: np.full(v.shape, 1e30, np.float32) for k, v in _random_adapter(bundle).items()}
    fo = ForwardOnlyTrainer(_torch(bundle, huge))
    r = fo.train_step(ids, labels)
    assert r.skipped and fo.step == 0
    assert all(np.array_equal(v, huge[k]) for k, v in fo.get_adapter().items())


def test_config_errors():
    for bad in (dict(eps=0), dict(lr=float("nan")), dict(perturbations=0), dict(perturbations=1.5), dict(seed=-1)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            ForwardOnlyConfig(**bad)
    with pytest.raises(ConfigError, match="update must be one of"):
        pp.runtime.explain(update="sideways")


def test_auto_uses_forward_only_when_nothing_can_backpropagate(bundle, monkeypatch, tmp_path):
    from pocketpeft.runtime import selection

    rows = selection.explain(need_train=True)
    assert [r.backend for r in rows if r.picked] == ["onnxruntime"] and next(
        r for r in rows if r.picked
    ).update == "backprop"
    forced = [r for r in selection.explain(need_train=True, update="forward-only") if r.picked]
    assert forced[0].update == "forward-only" and "forced forward-only" in forced[0].reason
    # a device whose only backends are inference-only (the NPU case): the registry holds just those
    only = {k: v for k, v in selection.BACKENDS.items() if k in ("llamacpp", "onnxruntime-infer")}
    monkeypatch.setattr(selection, "BACKENDS", only)
    picked = [r for r in selection.explain(need_train=True) if r.picked]
    assert [(r.backend, r.update) for r in picked] == [("onnxruntime-infer", "forward-only")]
    assert "no backend here can backpropagate" in picked[0].reason
    with pytest.raises(BackendUnavailableError, match="no backend can train"):
        selection.resolve_update("auto", update="backprop")
    sess = pp.runtime.open(bundle)
    assert sess.backend.name == "onnxruntime-infer+forward-only"
    rep = sess.train(CHAT, steps=1)
    assert rep.backend == "onnxruntime-infer+forward-only" and len(rep.losses) == 1
    # the adapter is PEFT's format: the torch reference loads it and gives the same logits
    sess.save_adapter(tmp_path / "ad")
    monkeypatch.undo()
    back = pp.runtime.open(bundle, backend="torch", adapter=tmp_path / "ad")
    ids = back.tokenizer.encode("see you at the game")
    np.testing.assert_allclose(back.logits(ids), sess.logits(ids), atol=1e-4)


def test_explicit_backend_and_update(bundle):
    from pocketpeft.runtime.selection import resolve_update

    assert resolve_update("torch") == ("torch", "cpu", "backprop")
    assert resolve_update("torch", update="forward-only") == ("torch", "cpu", "forward-only")
    assert resolve_update("onnxruntime-infer") == ("onnxruntime-infer", "cpu", "forward-only")
    assert resolve_update("onnxruntime-infer", need_train=False) == ("onnxruntime-infer", "cpu", "none")
    with pytest.raises(BackendUnavailableError, match="cannot train"):
        resolve_update("onnxruntime-infer", update="backprop")


def test_cli_train_forward_only(bundle, tmp_path, capsys):
    from pocketpeft.apps.cli import main

    text = tmp_path / "msgs.txt"
    text.write_text("\n".join(CHAT[:8]) + "\n", encoding="utf-8")
    assert (
        main(
            [
                "train",
                str(bundle.root),
                "--text",
                str(text),
                "--steps",
                "1",
                "--update",
                "forward-only",
                "--backend",
                "onnxruntime-infer",
                "--adapter-out",
                str(tmp_path / "ad"),
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["backend"] == "onnxruntime-infer+forward-only" and out["steps"] == 1
    assert (tmp_path / "ad" / "adapter_model.safetensors").is_file()
    assert main(["backends", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows["update"] == "backprop"
    infer = next(r for r in rows["backends"] if r["backend"] == "onnxruntime-infer")
    assert infer["forward_only"] and "forward-only" in infer["reason"]


class _NumpyInner:
    """A backend in numpy: loss = sum((w - target)^2) per token; offers loss_sum (and counts it)
    but no decoder."""

    name, device = "numpy", "cpu"

    def __init__(self, with_loss_sum: bool) -> None:
        self.w = {"a.lora_A.weight": np.zeros((2, 3), np.float32)}
        self.loss_sum_calls = self.eval_calls = 0
        if with_loss_sum:
            self.loss_sum = self._loss_sum

    def _value(self, labels) -> float:
        return float(((self.w["a.lora_A.weight"] - 1.0) ** 2).sum()) * int((np.asarray(labels) != -100).sum())

    def _loss_sum(self, input_ids, labels) -> float:
        self.loss_sum_calls += 1
        return self._value(labels)

    def eval_batch(self, input_ids, labels):
        from pocketpeft.runtime import EvalSums

        self.eval_calls += 1
        return EvalSums(self._value(labels), int((np.asarray(labels) != -100).sum()), 0, 0)

    def get_adapter(self):
        return {k: v.copy() for k, v in self.w.items()}

    def set_adapter(self, tensors):
        self.w = {k: np.array(v, np.float32) for k, v in tensors.items()}

    def capabilities(self):
        from pocketpeft.runtime import Capabilities

        return Capabilities(train=False, infer=True, tier="cpu")


@pytest.mark.parametrize("with_loss_sum", [True, False])
def test_loss_sum_is_used_where_the_backend_supports_it(with_loss_sum):
    from pocketpeft.runtime.protocol import SupportsDecoder, SupportsLossSum

    inner = _NumpyInner(with_loss_sum)
    assert isinstance(inner, SupportsLossSum) == with_loss_sum and not isinstance(inner, SupportsDecoder)
    t = ForwardOnlyTrainer(inner, ForwardOnlyConfig(lr=1e-2, eps=1e-3, perturbations=2))
    ids = np.zeros((1, 4), np.int64)
    r = t.train_step(ids, ids)
    assert not r.skipped and r.tokens == 4
    assert (inner.loss_sum_calls, inner.eval_calls) == ((4, 0) if with_loss_sum else (0, 4))
    with pytest.raises(NotImplementedError, match="no incremental decoder"):
        t.decoder()  # the predictor then falls back to recomputing over logits
