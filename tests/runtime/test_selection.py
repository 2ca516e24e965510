import dataclasses
import json

import pytest

import pocketpeft as pp
from pocketpeft.errors import BackendNotFoundError, BackendUnavailableError, ModelFileNotFoundError
from pocketpeft.registry import BACKENDS, backend_target
from pocketpeft.runtime.selection import SERVE_ORDER, TRAIN_ORDER, explain, plan, resolve, resolve_update
from tests.helpers import CHAT

TIER = {"gpu": 0, "npu": 1, "cpu": 2}


def _export(tiny_hf_dir, out, targets, **kw):
    return pp.export(
        tiny_hf_dir,
        out,
        quant="q4_0",
        lora=pp.LoraConfig(r=4, lora_alpha=8),
        seq_len=32,
        batch_size=4,
        targets=targets,
        general_text=[],
        **kw,
    )


@pytest.fixture(scope="module")
def torch_bundle(tiny_hf_dir, tmp_path_factory):
    return _export(tiny_hf_dir, tmp_path_factory.mktemp("sel") / "torch", "torch")


@pytest.fixture(scope="module")
def device_bundle(tiny_hf_dir, tmp_path_factory):
    """The device path's targets: onnx (updates on ONNX Runtime) and gguf (serving on llama.cpp)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("llama_cpp")
    from pocketpeft.export import OnnxOptions

    out = tmp_path_factory.mktemp("sel") / "device"
    return _export(tiny_hf_dir, out, ["torch", "onnx", "gguf"], onnx=OnnxOptions(rows=2, q4="int8"))


def _no_gpu(rows):
    return not any(r.tier == "gpu" for r in rows if r.available)


def test_auto_prefers_device_runtimes_within_a_tier():
    rows = explain()
    picked = [r for r in rows if r.picked]
    assert len(picked) == 1
    assert resolve("auto") == (picked[0].backend, picked[0].device)
    tiers = [r.tier for r in rows if r.available]
    assert tiers == sorted(tiers, key=TIER.get)
    capable = [r for r in rows if r.available and r.train and r.infer]
    top = min(TIER[r.tier] for r in capable)
    first = min((r for r in capable if TIER[r.tier] == top), key=lambda r: TRAIN_ORDER.index(r.backend))
    assert (first.backend, first.device) == (picked[0].backend, picked[0].device)
    if picked[0].backend == "torch":
        assert "no device runtime can train" in picked[0].reason
    else:
        assert "device runtime preferred over the torch reference" in picked[0].reason
    # serving walks its own order, llama.cpp first
    serve = [r for r in explain(need_train=False) if r.available]
    top = min(TIER[r.tier] for r in serve)
    first = min((r for r in serve if TIER[r.tier] == top), key=lambda r: SERVE_ORDER.index(r.backend))
    assert resolve("auto", need_train=False) == (first.backend, first.device)


def test_auto_picks_onnxruntime_for_updates_and_llamacpp_for_serving():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("llama_cpp")
    rows = explain()
    if not _no_gpu(rows):
        pytest.skip("a GPU tier outranks the CPU device runtimes here")
    up = next(r for r in rows if r.picked)
    assert (up.backend, up.device, up.update) == ("onnxruntime", "cpu", "backprop")
    assert "device runtime preferred over the torch reference" in up.reason
    torch_row = next(r for r in rows if r.backend == "torch")
    assert "higher-priority backend was picked (onnxruntime:cpu)" in torch_row.reason
    srv = next(r for r in explain(need_train=False) if r.picked)
    assert (srv.backend, srv.device) == ("llamacpp", "cpu")
    assert "device runtime preferred over the torch reference" in srv.reason
    assert resolve_update("auto") == ("onnxruntime", "cpu", "backprop")
    assert resolve_update("auto", need_train=False) == ("llamacpp", "cpu", "none")


def test_a_bundle_without_the_device_targets_falls_back_to_torch(torch_bundle):
    rows = explain(bundle=torch_bundle)
    if not _no_gpu(rows):
        pytest.skip("the torch reference on a GPU is picked whatever the bundle")
    picked = next(r for r in rows if r.picked)
    assert (picked.backend, picked.device) == ("torch", "cpu")
    assert "the torch reference: no device runtime can train in the cpu tier here" in picked.reason
    by_name = {r.backend: r for r in rows if r.available}
    for name, target in (("onnxruntime", "onnx"), ("llamacpp", "gguf"), ("executorch", "executorch")):
        if name in by_name:
            assert by_name[name].missing_target == target and not by_name[name].picked
            assert by_name[name].reason == f"bundle has no '{target}' target (export with --targets {target})"
    assert resolve("auto", bundle=torch_bundle) == ("torch", "cpu")
    assert resolve("auto", need_train=False, bundle=torch_bundle) == ("torch", "cpu")
    assert pp.runtime.open(torch_bundle).backend.name == "torch"
    pl = plan(torch_bundle)
    assert pl["update"]["backend"] == "torch" and pl["prefix"]["provider"] is None
    assert "runs the frozen layers itself" in pl["prefix"]["why"]
    assert pl["serving"]["backend"] == "torch"
    assert pl["update"]["fallback"]["backend"] is None  # onnxruntime-infer reads onnx too


def test_open_auto_takes_the_device_path(device_bundle):
    rows = explain(bundle=device_bundle)
    if not _no_gpu(rows):
        pytest.skip("a GPU tier outranks the CPU device runtimes here")
    sess = pp.runtime.open(device_bundle)
    assert (sess.backend.name, sess.backend.device) == ("onnxruntime", "cpu")
    rep = sess.train(CHAT, steps=1)
    assert rep.backend == "onnxruntime" and len(rep.losses) == 1
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POCKETPEFT_THREADS", "1")
        serve = pp.runtime.open(device_bundle, need_train=False)
    assert serve.backend.name == "llamacpp"


def test_explicit_inference_only_backend_opens_and_train_raises(device_bundle):
    assert resolve_update("llamacpp") == ("llamacpp", "cpu", "none")
    with pytest.raises(BackendUnavailableError, match="cannot train"):
        resolve_update("llamacpp", update="backprop")  # backprop asked for explicitly: refused up front
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POCKETPEFT_THREADS", "1")
        sess = pp.runtime.open(device_bundle, backend="llamacpp")  # no need_train=False needed
    assert sess.backend.name == "llamacpp" and sess.suggest("hello there ", 3) is not None
    with pytest.raises(BackendUnavailableError, match="llamacpp is inference-only") as e:
        sess.train(CHAT, steps=1)
    assert isinstance(e.value, ImportError)
    # an inference-only backend that takes forward-only updates still gets them by default
    assert pp.runtime.open(device_bundle, backend="onnxruntime-infer").backend.name == "onnxruntime-infer+forward-only"


def test_plan_places_each_part(device_bundle):
    pl = plan(device_bundle)
    assert set(pl) == {"update", "prefix", "suffix", "serving"}
    for part in pl.values():
        assert {"backend", "device", "provider", "why"} <= set(part) and part["why"]
    assert pl["update"]["mode"] == "backprop" and set(pl["update"]["fallback"]) == {"backend", "device", "why"}
    assert pl["update"]["fallback"]["backend"] == "onnxruntime-infer"
    if _no_gpu(explain(bundle=device_bundle)):
        assert (pl["update"]["backend"], pl["suffix"]["backend"]) == ("onnxruntime", "onnxruntime")
        assert pl["prefix"]["backend"] == "onnxruntime" and pl["prefix"]["provider"]
        assert "no backward needed" in pl["prefix"]["why"]
        assert pl["serving"]["backend"] == "llamacpp"
    json.dumps(pl)


def test_cli_backends_shows_the_plan(device_bundle, capsys):
    from pocketpeft.apps.cli import main

    assert main(["backends", "--bundle", str(device_bundle.root), "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["bundle"] == str(device_bundle.root) and set(obj["plan"]) == {"update", "prefix", "suffix", "serving"}
    assert sum(r["picked"] for r in obj["backends"]) == 1
    assert main(["backends"]) == 0
    text = capsys.readouterr().out
    for words in ("plan:", "prefix (frozen layers) on", "suffix (trained layers) on", "serving on", "forward-only"):
        assert words in text


def test_ort_providers_cpu_last_and_tiers(monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    from pocketpeft.runtime.backends import onnxruntime_backend, ort_providers

    eps = ort_providers.inference_providers()
    assert eps[-1][0] == "CPUExecutionProvider" and all(why for _, why in eps)
    assert [e for e, _ in eps].count("CPUExecutionProvider") == 1
    offered = ["CPUExecutionProvider", "XnnpackExecutionProvider", "CUDAExecutionProvider", "QNNExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: offered)
    monkeypatch.setattr(onnxruntime_backend, "_cuda_usable", lambda: False)  # listed, but no GPU
    assert [e for e, _ in ort_providers.inference_providers()] == [
        "QNNExecutionProvider",
        "XnnpackExecutionProvider",
        "CPUExecutionProvider",
    ]
    monkeypatch.setattr(onnxruntime_backend, "_cuda_usable", lambda: True)
    assert [e for e, _ in ort_providers.inference_providers()][1] == "CUDAExecutionProvider"
    tiers = {
        p: ort_providers.tier_of(p) for p in ("QNNExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    }
    assert tiers == {"QNNExecutionProvider": "npu", "CUDAExecutionProvider": "gpu", "CPUExecutionProvider": "cpu"}
    assert ort_providers.tier_of("SomeNewExecutionProvider") == "cpu"


def test_unknown_backend_lists_registered_ones():
    with pytest.raises(BackendNotFoundError, match="registered backends: torch") as e:
        resolve("tensorrt")
    assert isinstance(e.value, KeyError) and "tensorrt" in str(e.value)


def test_unavailable_device_lists_devices():
    with pytest.raises(BackendUnavailableError, match="devices: .*cpu") as e:
        resolve("torch:npu7")
    assert isinstance(e.value, ImportError)


def test_open_with_unknown_backend_names_it(tmp_path):
    with pytest.raises(BackendNotFoundError, match="nope"):
        pp.runtime.open(tmp_path, backend="nope")


def test_backend_target_names_the_bundle_target_each_backend_reads():
    assert {name: backend_target(name) for name in BACKENDS} == {
        "torch": "torch",
        "executorch": "executorch",
        "onnxruntime": "onnx",
        "onnxruntime-infer": "onnx",
        "llamacpp": "gguf",
        "peft": "torch",
    }
    assert backend_target("torch:cpu") == "torch"
    with pytest.raises(BackendNotFoundError):
        backend_target("tensorrt")


def test_open_checks_the_backends_target_before_loading(torch_bundle, monkeypatch):
    from pocketpeft.runtime import selection

    b = torch_bundle
    assert b.targets == ["torch"]
    # pretend the torch backend read another target: open must refuse before creating it
    monkeypatch.setitem(BACKENDS, "torch", dataclasses.replace(BACKENDS["torch"], target="gguf"))
    monkeypatch.setattr(selection, "create", lambda *a: pytest.fail("backend created before the target check"))
    with pytest.raises(ModelFileNotFoundError) as e:
        pp.runtime.open(b, backend="torch")
    msg = str(e.value)
    assert str(b.root) in msg and "'gguf'" in msg and "it has: torch" in msg and "--targets gguf" in msg


def test_backends_rows_carry_kv_cache():
    rows = {(r.backend, r.device): r for r in explain(need_train=False) if r.available}
    assert rows[("torch", "cpu")].kv_cache is True
