"""The device side: a local update returns only deltas and numbers; nothing text-like leaves a device."""

from __future__ import annotations

import numbers

import numpy as np
import pytest

from pocketpeft.errors import ConfigError
from pocketpeft.fleet import updates as U
from pocketpeft.fleet import wire
from pocketpeft.fleet.client import LocalConfig, local_update
from pocketpeft.manifest import Bundle

from ..helpers import CHAT

SECRET = "my bank pin is 4921 and my password is hunter2"


pytestmark = pytest.mark.usefixtures("task_identity")


def _texts_file(tmp_path):
    p = tmp_path / "texts.txt"
    p.write_text("\n".join([SECRET] * 5 + CHAT) + "\n", encoding="utf-8")
    return p


def _context(node_config):
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def _global(bundle):
    return {k: np.asarray(v, np.float32) for k, v in Bundle(bundle).initial_adapter().tensors.items()}


def _assert_only_numbers_and_lora(content, expected_names):
    """Every record of a reply: float32 arrays under expected LoRA names, numeric metrics, no strings."""
    assert not content.config_records, f"config records leave the device: {list(content.config_records)}"
    assert set(content.array_records) == {wire.DELTA}
    arrays = content.array_records[wire.DELTA]
    assert set(arrays) == set(expected_names)
    for name, arr in arrays.items():
        assert arr.dtype == "float32", (name, arr.dtype)
        assert np.isfinite(arr.numpy()).all()
    assert set(content.metric_records) == {wire.METRICS}
    for k, v in content.metric_records[wire.METRICS].items():
        assert isinstance(v, numbers.Number) and not isinstance(v, bool), (k, v)
    raw = b"".join(a.data for a in arrays.values())
    assert SECRET.encode() not in raw and b"hunter2" not in raw


@pytest.mark.parametrize("fedsa", [False, True])
def test_reply_holds_only_lora_deltas_and_counts(fleet_bundle, tmp_path, fedsa):
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from pocketpeft.fleet.apps import client_app

    b = Bundle(fleet_bundle)
    cfg = wire.round_config(
        round=1, bundle=str(fleet_bundle), backend="torch", steps=2, clip_norm=1.0, noise_std=0.01, fedsa=fedsa
    )
    msg = Message(
        RecordDict({wire.GLOBAL: wire.to_array_record(_global(fleet_bundle)), wire.CONFIG: ConfigRecord(cfg)}),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )
    ctx = _context({"texts": str(_texts_file(tmp_path))})
    reply = client_app(msg, ctx)
    assert not reply.has_error(), reply.error
    names = U.shared_names(b.manifest.trainable, fedsa=fedsa)
    _assert_only_numbers_and_lora(reply.content, names)
    m = reply.content.metric_records[wire.METRICS]
    assert m["steps"] == 2 and m["base-id"] == U.base_id(b.manifest.base_sha256)
    # a DP round (noise on) reports nothing the accountant doesn't cover: no loss, norm, text amount or time
    assert set(m) == {"steps", "base-id", "num-examples"} and m["num-examples"] == 1
    # FedSA: the device keeps its own lora_B in its node state, never in the reply
    assert (wire.LOCAL_B in ctx.state.array_records) == fedsa


def test_legacy_secagg_reply_holds_only_numbers(fleet_bundle, tmp_path):
    """A SecAgg+ round's FitRes (before masking) carries float arrays and numeric metrics only."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.app import Message, MessageType
    from flwr.common import FitIns

    from pocketpeft.fleet.apps import client_app

    b = Bundle(fleet_bundle)
    names = sorted(b.manifest.trainable)
    cfg = wire.round_config(round=1, bundle=str(fleet_bundle), backend="torch", steps=1, weighted=True)
    content = compat.fitins_to_recorddict(FitIns(wire.to_parameters(_global(fleet_bundle), names), cfg), True)
    reply = client_app(
        Message(content, dst_node_id=7, message_type=MessageType.TRAIN), _context({"texts": str(_texts_file(tmp_path))})
    )
    assert not reply.has_error(), reply.error
    res = compat.recorddict_to_fitres(reply.content, keep_input=True)
    arrays = wire.from_parameters(res.parameters, names)
    assert all(a.dtype == np.float32 for a in arrays.values())
    assert all(isinstance(v, numbers.Number) for v in res.metrics.values()), res.metrics
    assert res.num_examples >= 1


def test_local_update_clips_and_keeps_budget(fleet_bundle):
    g = _global(fleet_bundle)
    up = local_update(fleet_bundle, CHAT, g, LocalConfig(steps=3, clip_norm=1e-3, lr=1e-2), backend="torch")
    assert up.steps == 3 and up.norm > 1e-3
    assert U.l2_norm(up.delta) == pytest.approx(1e-3, rel=1e-4)
    assert set(up.delta) == set(g)
    with pytest.raises(ConfigError):
        LocalConfig(steps=None, seconds=None)
    with pytest.raises(ConfigError):
        LocalConfig(noise_std=0.1)  # noise without clipping


def test_node_without_data_is_refused(fleet_bundle):
    from pocketpeft.fleet.apps import device_texts

    with pytest.raises(ConfigError, match="no data"):
        device_texts({}, {}, "ab" * 32)


def test_a_failed_round_tells_the_server_only_the_error_type(fleet_bundle, tmp_path):
    """A device whose round fails replies with an error naming its type, not its message (which
    may hold local paths or sizes of the user's text)."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from pocketpeft.fleet.apps import client_app

    cfg = wire.round_config(round=1, bundle=str(fleet_bundle), backend="torch", steps=1)
    msg = Message(
        RecordDict({wire.GLOBAL: wire.to_array_record(_global(fleet_bundle)), wire.CONFIG: ConfigRecord(cfg)}),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )
    private = tmp_path / "alice-diary-2026.txt"
    private.write_bytes(b"\xff\xfe not utf-8")
    from pocketpeft.fleet.apps import DeviceRoundError

    # Flower turns what the app raises into the error reply's reason: str() of this exception
    with pytest.raises(DeviceRoundError) as err:
        client_app(msg, _context({"texts": str(private)}))
    assert "InputTextError" in str(err.value)
    assert "alice" not in str(err.value) and "diary" not in str(err.value) and err.value.__cause__ is None
