"""Fleet training end to end in Flower's simulation engine (Ray), on the tiny bundle."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from pocketpeft.fleet import dp as DP
from pocketpeft.fleet.run import pick_senders, simulate
from pocketpeft.global_adapter import load_global
from pocketpeft.manifest import Bundle

pytest.importorskip("ray")
pytest.importorskip("chitchat_dataset")

FAST = dict(steps=2, backend="torch", max_texts=200, lr=1e-2)


def _load(bundle, out):
    m = Bundle(bundle).manifest
    return load_global(out / "global", m.base_sha256, m.trainable)


def _initial(bundle):
    return Bundle(bundle).initial_adapter().tensors


def test_fedavg_simulation_writes_a_loadable_global_adapter(fleet_bundle, tmp_path):
    excluded = pick_senders(1)[0]
    seen = []
    res = simulate(
        fleet_bundle,
        tmp_path,
        clients=4,
        rounds=2,
        clients_per_round=2,
        exclude=[excluded],
        progress=seen.append,
        **FAST,
    )
    assert excluded not in res["senders"] and len(res["senders"]) == 4
    adapter, info = _load(fleet_bundle, tmp_path)
    assert info.source == "fleet" and info.rounds == 2 and info.aggregation == "fedavg" and info.dp is None
    assert 2 <= info.clients <= 4
    start = _initial(fleet_bundle)
    assert set(adapter.tensors) == set(start)
    assert max(float(np.abs(adapter.tensors[k] - start[k]).max()) for k in start) > 1e-4
    rounds = json.loads((tmp_path / "rounds.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] == [r["round"] for r in seen]
    for r in rounds:
        assert r["sampled"] == 2 and r["replied"] == 2 and r["accepted"] == 2 and r["timed_out"] == 0
        assert r["upload_bytes_per_client"] > 0 and np.isfinite(r["train_loss"])
        assert sum(r["rejected"].values()) == 0


def test_secagg_gives_the_plain_aggregate(fleet_bundle, tmp_path):
    """One unweighted round with and without SecAgg+: the same global adapter up to quantization."""
    common = dict(clients=3, rounds=1, weighted=False, seed=3, **FAST)
    plain = simulate(fleet_bundle, tmp_path / "plain", **common)
    secure = simulate(fleet_bundle, tmp_path / "secagg", secagg=True, **common)
    assert secure["per_round"][0]["secagg"] and secure["per_round"][0]["accepted"] == 3
    a, _ = _load(fleet_bundle, tmp_path / "plain")
    b, info = _load(fleet_bundle, tmp_path / "secagg")
    assert info.notes["secagg"] is True
    start = _initial(fleet_bundle)
    moved = max(float(np.abs(a.tensors[k] - start[k]).max()) for k in start)
    diff = max(float(np.abs(a.tensors[k] - b.tensors[k]).max()) for k in start)
    # SecAgg+ quantizes each entry of [-4, 4] to 2^22 levels: ~2e-6 per entry and device
    assert moved > 1e-3 and diff < 1e-4, (moved, diff)
    assert plain["delta_norm"] == pytest.approx(secure["delta_norm"], rel=1e-3)


def test_dp_fedsa_simulation_records_its_guarantee(fleet_bundle, tmp_path):
    res = simulate(fleet_bundle, tmp_path, clients=3, rounds=2, fedsa=True, noise_multiplier=0.8, clip_norm=0.5, **FAST)
    adapter, info = _load(fleet_bundle, tmp_path)
    assert info.aggregation == "dp-fedsa"
    assert info.dp["epsilon"] == pytest.approx(DP.epsilon(0.8, 1.0, 2, 1e-5))
    assert info.dp | {"epsilon": 0} == {
        "epsilon": 0,
        "delta": 1e-5,
        "noise_multiplier": 0.8,
        "clip_norm": 0.5,
        "sampling_rate": 1.0,
        "rounds": 2,
        "accountant": "dp_accounting RDP",
    }
    per = res["per_round"]
    assert [r["shared_tensors"] for r in per] == ["lora_A", "all"]  # B travels in the final round only
    assert per[0]["upload_bytes_per_client"] < per[1]["upload_bytes_per_client"]
    start = _initial(fleet_bundle)
    for k in start:  # the shipped B is the devices' mean B, not the initial (zero) one
        assert not np.array_equal(adapter.tensors[k], start[k]), k


def test_a_dropped_or_failing_device_does_not_stall_the_round(fleet_bundle, tmp_path):
    """Partition 0 crashes, partition 1 hangs past the timeout: the round goes on with the rest."""
    from flwr.clientapp import ClientApp

    def faulty(msg, context):
        from pocketpeft.fleet.apps import _train

        pid = int(context.node_config["partition-id"])
        if pid == 0:
            raise RuntimeError("device crashed")
        if pid == 1:
            time.sleep(30)
        return _train(msg, context)

    app = ClientApp()
    app.train()(faulty)
    t0 = time.perf_counter()
    res = simulate(
        fleet_bundle, tmp_path, clients=3, rounds=1, round_timeout=20, cpus_per_client=1, client_app=app, **FAST
    )
    r = res["per_round"][0]
    assert r["sampled"] == 3 and r["accepted"] == 1 and r["rejected"]["error"] == 1 and r["timed_out"] == 1, r
    assert r["seconds"] < 30
    assert res["rejected"]["error"] == 1
    _load(fleet_bundle, tmp_path)  # the round's one good update made a valid global adapter
    assert time.perf_counter() - t0 < 120
