"""``pocketpeft fleet`` through its own parser (``add_parser`` + ``run``)."""

from __future__ import annotations

import argparse
import json

import pytest

from pocketpeft.errors import ConfigError
from pocketpeft.fleet import cli
from pocketpeft.global_adapter import load_global
from pocketpeft.manifest import Bundle

from ..helpers import CHAT


def _parse(argv):
    p = argparse.ArgumentParser(prog="pocketpeft")
    sub = p.add_subparsers(dest="command", required=True)
    cli.add_parser(sub)
    return p.parse_args(["fleet", *argv])


def test_parser_takes_the_documented_flags(tmp_path):
    a = _parse(
        [
            "--simulate",
            "--bundle",
            "b",
            "--clients",
            "6",
            "--rounds",
            "2",
            "--out",
            "o",
            "--clients-per-round",
            "3",
            "--steps",
            "4",
            "--dp-epsilon",
            "8",
            "--clip",
            "0.5",
            "--secagg",
            "--fedsa",
            "--exclude-senders",
            "x,y",
            "z",
            "--json",
        ]
    )
    assert a.simulate and a.clients == 6 and a.dp_epsilon == 8 and a.secagg and a.fedsa and a.json
    assert cli._split(a.exclude_senders) == ["x", "y", "z"]
    with pytest.raises(SystemExit):  # a target epsilon and a noise multiplier exclude each other
        _parse(["--simulate", "--bundle", "b", "--out", "o", "--dp-epsilon", "8", "--noise-multiplier", "1"])
    with pytest.raises(ConfigError, match="--rounds"):
        cli.run(_parse(["--simulate", "--bundle", "b", "--out", "o", "--rounds", "0"]))


def test_host_training_writes_a_global_adapter(fleet_bundle, tmp_path, capsys):
    text = tmp_path / "public.txt"
    text.write_text("\n".join(CHAT) + "\n", encoding="utf-8")
    args = _parse(
        [
            "--host",
            "--bundle",
            str(fleet_bundle),
            "--out",
            str(tmp_path / "out"),
            "--text",
            str(text),
            "--steps",
            "3",
            "--json",
        ]
    )
    args.fn(args)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert obj["source"] == "host" and obj["steps"] == 3 and obj["delta_norm"] > 0
    m = Bundle(fleet_bundle).manifest
    _, info = load_global(obj["global"], m.base_sha256, m.trainable)
    assert info.source == "host" and info.dp is None and info.version == 1
