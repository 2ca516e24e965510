import pytest
import torch

import pocketpeft as pp
from pocketpeft.errors import BackendNotFoundError, BackendUnavailableError
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
