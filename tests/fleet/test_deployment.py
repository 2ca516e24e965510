"""Fleet training on Flower's deployment engine: a SuperLink and two SuperNodes as separate
processes on 127.0.0.1, two rounds submitted with ``flwr run``."""

from __future__ import annotations

import json
import shutil

import pytest

from pocketpeft.fleet.deploy import LocalFleet, node_config_arg
from pocketpeft.global_adapter import load_global
from pocketpeft.manifest import Bundle

from ..helpers import CHAT

pytestmark = pytest.mark.skipif(shutil.which("flower-superlink") is None, reason="Flower's CLI is not installed")


def test_node_config_arg_quotes_strings():
    assert (
        node_config_arg({"texts": "/a b/c.txt", "partition-id": 1, "x": True})
        == 'texts="/a b/c.txt" partition-id=1 x=true'
    )


def test_two_rounds_on_superlink_and_two_supernodes(fleet_bundle, tmp_path):
    nodes = []
    for i in range(2):
        p = tmp_path / f"device{i}.txt"
        p.write_text("\n".join(CHAT[i::2]) + "\n", encoding="utf-8")
        nodes.append({"texts": str(p)})
    fleet = LocalFleet(tmp_path / "fleet", nodes)
    with fleet:
        procs = [p for _, p in fleet.procs]
        assert len(procs) == 3 and all(p.poll() is None for p in procs)
        summary = fleet.run(
            bundle=fleet_bundle,
            out=tmp_path / "out",
            rounds=2,
            steps=2,
            backend="torch",
            round_timeout=120.0,
            wait_nodes=60.0,
            timeout=400,
        )
    assert all(p.poll() is not None for p in procs)  # everything it started has ended
    assert summary["rounds"] == 2 and summary["clients"] == 2
    m = Bundle(fleet_bundle).manifest
    adapter, info = load_global(tmp_path / "out" / "global", m.base_sha256, m.trainable)
    assert info.source == "fleet" and info.rounds == 2 and info.clients == 2
    rounds = json.loads((tmp_path / "out" / "rounds.json").read_text())["rounds"]
    assert [r["accepted"] for r in rounds] == [2, 2]
    assert summary["delta_norm"] > 0
