import dataclasses

import pytest
import torch

import pocketpeft as pp
from pocketpeft.errors import BackendNotFoundError, BackendUnavailableError, ModelFileNotFoundError
from pocketpeft.registry import BACKENDS, backend_target
from pocketpeft.runtime.selection import explain, resolve


def test_auto_picks_first_capable_in_tier_order():
    rows = explain()
    picked = [r for r in rows if r.picked]
    assert len(picked) == 1
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert resolve("auto") == ("torch", expected) == (picked[0].backend, picked[0].device)
    tiers = [r.tier for r in rows if r.available]
    order = {"gpu": 0, "npu": 1, "cpu": 2}
    assert tiers == sorted(tiers, key=order.get)


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


def test_open_checks_the_backends_target_before_loading(tiny_hf_dir, tmp_path, monkeypatch):
    from pocketpeft.runtime import selection

    b = pp.export(
        tiny_hf_dir,
        tmp_path / "bundle",
        quant="q4_0",
        lora=pp.LoraConfig(r=4, lora_alpha=8),
        seq_len=32,
        batch_size=4,
        targets="torch",
        general_text=[],
    )
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
