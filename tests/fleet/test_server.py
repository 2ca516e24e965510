"""The ServerApp's round logic against a scripted grid: every refused reply is counted by reason
and never aggregated; the aggregate is FedAvg of the accepted ones."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pocketpeft.fleet import updates as U
from pocketpeft.fleet import wire
from pocketpeft.fleet.server import FleetConfig, FleetServer
from pocketpeft.global_adapter import load_global
from pocketpeft.manifest import Bundle

pytestmark = pytest.mark.usefixtures("task_identity")


class ScriptedGrid:
    """Node i answers with ``script[i](global tensors)``: (delta, metrics), an exception (an error
    reply) or None (no reply: a timeout)."""

    def __init__(self, script):
        self.script = script
        self.sent = []

    def get_node_ids(self):
        return list(self.script)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Error, Message, MetricRecord, RecordDict

        out = []
        for m in messages:
            self.sent.append(m)
            g = wire.from_array_record(m.content.array_records[wire.GLOBAL])
            try:
                r = self.script[m.metadata.dst_node_id](g)
            except RuntimeError as e:
                out.append(Message(Error(1, str(e)), reply_to=m))
                continue
            if r is None:
                continue
            delta, metrics = r
            out.append(
                Message(
                    RecordDict({wire.DELTA: wire.to_array_record(delta), wire.METRICS: MetricRecord(metrics)}),
                    reply_to=m,
                )
            )
        return out


def test_refused_replies_are_counted_and_never_aggregated(fleet_bundle, tmp_path):
    from flwr.app import Context, RecordDict

    b = Bundle(fleet_bundle)
    base = U.base_id(b.manifest.base_sha256)
    rng = np.random.default_rng(0)
    shapes = b.manifest.trainable
    good = [{k: (0.01 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()} for _ in range(2)]

    def ok(i, n):
        return lambda g: (good[i], {"num-examples": n, "steps": 1, "train-loss": 1.0, "base-id": base})

    def nan(g):
        d = {k: v.copy() for k, v in good[0].items()}
        next(iter(d.values()))[0, 0] = np.nan
        return d, {"num-examples": 1, "base-id": base}

    def crash(g):
        raise RuntimeError("device crashed")

    script = {
        11: ok(0, 30),
        12: ok(1, 10),
        13: nan,
        14: lambda g: (good[0], {"num-examples": 5, "base-id": base + 1}),
        15: lambda g: ({k: v * 1e4 for k, v in good[0].items()}, {"num-examples": 5, "base-id": base}),
        16: lambda g: ({k: v for k, v in list(good[0].items())[1:]}, {"num-examples": 5, "base-id": base}),
        17: crash,
        18: lambda g: None,
    }
    cfg = FleetConfig(bundle=str(fleet_bundle), out=str(tmp_path), rounds=1, steps=1, clip_norm=10.0, round_timeout=5)
    grid = ScriptedGrid(script)
    summary = FleetServer(cfg).run(
        grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    )
    rec = summary["per_round"][0]
    assert rec["sampled"] == 8 and rec["replied"] == 7 and rec["accepted"] == 2 and rec["timed_out"] == 1
    assert rec["rejected"] == {"error": 1, "format": 0, "names": 1, "shapes": 0, "non_finite": 1, "base": 1, "norm": 1}
    adapter, info = load_global(tmp_path / "global", b.manifest.base_sha256, shapes)
    start = b.initial_adapter().tensors
    for k in shapes:  # FedAvg of the two accepted updates, weighted 30:10
        want = start[k] + (30 * good[0][k] + 10 * good[1][k]) / 40
        np.testing.assert_allclose(adapter.tensors[k], want, rtol=1e-5, atol=1e-7)
    assert info.clients == 2 and info.notes["rejected"]["non_finite"] == 1
    assert json.loads((tmp_path / "rounds.json").read_text())["rejected"]["norm"] == 1
    cfg_sent = dict(grid.sent[0].content.config_records[wire.CONFIG])
    assert cfg_sent["clip-norm"] == 10.0 and cfg_sent["round"] == 1


def _ctx():
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})


def test_malformed_replies_are_rejected_not_fatal(fleet_bundle, tmp_path):
    """NaN or list-valued metrics, a float64 delta that overflows float32, a huge example count:
    each is refused (or capped) and counted; the run still writes a finite global adapter."""
    b = Bundle(fleet_bundle)
    base = U.base_id(b.manifest.base_sha256)
    shapes = b.manifest.trainable
    good = {k: np.full(s, 0.01, np.float32) for k, s in shapes.items()}
    huge = {k: np.full(s, 1e39, np.float64) for k, s in shapes.items()}
    script = {
        21: lambda g: (good, {"num-examples": 1, "base-id": base}),
        22: lambda g: (good, {"num-examples": float("nan"), "base-id": base}),
        23: lambda g: (good, {"num-examples": 1, "base-id": float("inf")}),
        24: lambda g: (good, {"num-examples": 1, "base-id": base, "train-loss": [1.0, 2.0]}),
        25: lambda g: (huge, {"num-examples": 1, "base-id": base}),
        26: lambda g: ({k: -v for k, v in good.items()}, {"num-examples": 1e12, "base-id": base}),
    }
    cfg = FleetConfig(bundle=str(fleet_bundle), out=str(tmp_path), rounds=1, steps=1, round_timeout=5)
    rec = FleetServer(cfg).run(ScriptedGrid(script), _ctx())["per_round"][0]
    assert rec["accepted"] == 2 and rec["rejected"]["format"] == 2, rec
    assert rec["rejected"]["base"] == 1 and rec["rejected"]["non_finite"] == 1, rec
    adapter, _ = load_global(tmp_path / "global", b.manifest.base_sha256, shapes)
    start = b.initial_adapter().tensors
    cap = cfg.secagg_max_weight  # 1e12 examples count as the cap, not as the whole round
    for k in shapes:
        np.testing.assert_allclose(adapter.tensors[k], start[k] + (0.01 - 0.01 * cap) / (1 + cap), rtol=1e-5)


def test_dp_release_tops_up_noise_and_divides_by_the_expected_count():
    """With n of m expected devices reporting, the release carries the noise of all m (std z·C in
    the sum) and is divided by m, as the accountant assumes."""
    rng = np.random.default_rng(0)
    zero = {"w": np.zeros(200_000, np.float32)}
    std = 0.5  # each device's own noise std
    out = U.dp_release([zero, zero], expected_clients=10.0, client_noise=std, rng=rng)
    # 2 devices' noise is already in their deltas (here zero); the top-up adds 8 devices' worth
    np.testing.assert_allclose(out["w"].std(), std * np.sqrt(8) / 10, rtol=0.02)
    ones = {"w": np.ones(4, np.float32)}
    np.testing.assert_allclose(U.dp_release([ones] * 12, 10.0, 0.0)["w"], 1.2)  # more than expected: no top-up


def test_a_run_that_aggregates_nothing_writes_no_global(fleet_bundle, tmp_path):
    from pocketpeft.fleet.server import FleetRunError

    def crash(g):
        raise RuntimeError("device crashed")

    cfg = FleetConfig(bundle=str(fleet_bundle), out=str(tmp_path), rounds=1, steps=1, round_timeout=5)
    with pytest.raises(FleetRunError, match="no round"):
        FleetServer(cfg).run(ScriptedGrid({31: crash, 32: crash}), _ctx())
    assert not (tmp_path / "global").exists()
