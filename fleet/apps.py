"""The fleet's Flower apps: ``client_app`` (what each device runs) and ``server_app`` (deployment
entry point of :mod:`.server`).

``flwr run`` / a SuperNode load them as ``pocketpeft.fleet.apps:client_app`` and
``pocketpeft.fleet.apps:server_app``; :func:`pocketpeft.fleet.run.simulate` runs the same
objects in Flower's simulation engine.

Where a device's data comes from (``context.node_config``, set with ``flower-supernode
--node-config``): ``texts`` (a UTF-8 file, one message per line), ``store`` (a keyboard
:class:`~pocketpeft.runtime.TextStore` database, the device's typed messages), ``sender`` (a
chitchat sender id), or in simulation ``partition-id`` → the ``sim-senders`` list the server
sends. ``bundle`` / ``backend`` in the node config override the round's (a device's own bundle
copy). The reply carries float arrays and numbers only (see :mod:`.wire`).

Secure aggregation: rounds run by Flower's ``SecAggPlusWorkflow`` carry its ``secaggplus``
config record; :func:`secagg_if_asked` hands exactly those to Flower's ``secaggplus_mod``, plain
rounds go straight to the handler. A node started with ``require-secagg=true`` refuses plain rounds.
"""

from __future__ import annotations

import logging
from typing import Any

from pocketpeft.errors import ConfigError, InputTextError, PocketPeftError

from . import updates as U
from . import wire
from .client import LocalConfig, local_update, open_session

log = logging.getLogger(__name__)

#: at most this many of a device's newest messages train in one round (a cap on tokenizing work)
DEFAULT_MAX_TEXTS = 2000


def _flag(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


def device_texts(node_config: dict, cfg: dict, base_sha256: str) -> list[str]:
    """The texts this device trains on, from its node config (see the module docstring); at most
    ``max-texts`` of the newest. Raises :class:`ConfigError` when the node config names no data."""
    limit = int(cfg.get("max-texts", DEFAULT_MAX_TEXTS))
    if "texts" in node_config:
        from pocketpeft.text import read_text_file

        texts = read_text_file(str(node_config["texts"]))
    elif "store" in node_config:
        from pocketpeft.runtime.keyboard.store import TextStore

        store = TextStore(str(node_config["store"]), base_sha256)
        try:
            texts = [r.text for r in store.rows()]
        finally:
            store.close()
    else:
        sender = node_config.get("sender")
        if sender is None and "partition-id" in node_config and cfg.get("sim-senders"):
            senders = str(cfg["sim-senders"]).split(",")
            pid = int(node_config["partition-id"])
            if not 0 <= pid < len(senders):
                raise ConfigError(f"partition-id {pid} has no sender (the simulation passed {len(senders)})")
            sender = senders[pid]
        if sender is None:
            raise ConfigError(
                "this node has no data: start the SuperNode with --node-config "
                "\"texts='FILE'\" (one message per line), \"store='TEXT.sqlite'\" or \"sender='CHITCHAT_ID'\""
            )
        from pocketpeft.corpus import sender_split

        texts = sender_split(str(sender))[0]  # the sender's earlier messages; the latest are held out
    if not texts:
        raise InputTextError("this device's text store is empty")
    return texts[-limit:]


def _local_config(cfg: dict) -> LocalConfig:
    return LocalConfig(
        steps=int(cfg["steps"]) if "steps" in cfg else None,
        seconds=float(cfg["seconds"]) if "seconds" in cfg else None,
        lr=float(cfg["lr"]) if "lr" in cfg else None,
        batch_size=int(cfg["batch-size"]) if "batch-size" in cfg else None,
        clip_norm=float(cfg["clip-norm"]) if "clip-norm" in cfg else None,
        noise_std=float(cfg.get("noise-std", 0.0)),
        fedsa=_flag(cfg.get("fedsa", False)),
        share_b=_flag(cfg.get("share-b", False)),
        seed=int(cfg.get("seed", 0)),
    )


def _bundle_and_backend(context, cfg: dict) -> tuple[str, str]:
    """The bundle path and backend this node trains with: its node config's, else the round's, else the run config's."""
    node, run_cfg = dict(context.node_config), dict(context.run_config or {})
    bundle = node.get("bundle") or cfg.get("bundle") or run_cfg.get("bundle")
    backend = str(node.get("backend") or cfg.get("backend") or run_cfg.get("backend") or "auto")
    if not bundle:
        raise ConfigError("no bundle: the round config or the node config must name one ('bundle')")
    return str(bundle), backend


def run_round(global_tensors: dict, cfg: dict, context) -> tuple[dict, dict]:
    """One round on this node: (delta tensors, numeric metrics). Keeps FedSA's own lora_B in the
    node's context state between rounds."""
    node = dict(context.node_config)
    bundle, backend = _bundle_and_backend(context, cfg)
    sess = open_session(str(bundle), backend)
    base = sess.manifest.base_sha256
    texts = device_texts(node, cfg, base)
    lc = _local_config(cfg)
    local_b = None
    if lc.fedsa and wire.LOCAL_B in context.state.array_records:
        local_b = wire.from_array_record(context.state.array_records[wire.LOCAL_B])
    up = local_update(str(bundle), texts, global_tensors, lc, backend=backend, local_b=local_b)
    if lc.fedsa:
        context.state.array_records[wire.LOCAL_B] = wire.to_array_record(
            {k: v for k, v in up.local.items() if not U.is_lora_a(k)}
        )
    # DP or secure aggregation: no per-device numbers beyond what the guarantee covers
    return up.delta, up.metrics(base, private=lc.noise_std > 0 or _flag(cfg.get("secagg", False)))


def _train(msg, context):
    from flwr.app import Message, MetricRecord, RecordDict

    content = msg.content
    if "fitins.parameters" in content.array_records:  # a SecAgg+ round (legacy FitIns records)
        return _train_secagg(msg, context)
    if _flag(context.node_config.get("require-secagg", False)):
        raise ConfigError("this node requires secure aggregation and got a plain round")
    cfg = dict(content.config_records[wire.CONFIG])
    global_tensors = wire.from_array_record(content.array_records[wire.GLOBAL])
    delta, metrics = run_round(global_tensors, cfg, context)
    # no ConfigRecord in the reply: nothing text-like leaves the device
    return Message(
        RecordDict({wire.DELTA: wire.to_array_record(delta), wire.METRICS: MetricRecord(metrics)}), reply_to=msg
    )


def _train_secagg(msg, context):
    from flwr.app import Message
    from flwr.common import Code, FitRes, Status
    from flwr.compat.common import recorddict_compat as compat

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    cfg = dict(fitins.config)
    sess = open_session(*_bundle_and_backend(context, cfg))
    names = sorted(sess.manifest.trainable)
    global_tensors = wire.from_parameters(fitins.parameters, names)
    delta, metrics = run_round(global_tensors, cfg, context)
    lc = _local_config(cfg)
    shared = lc.shared(names)
    # the weight SecAgg+ multiplies in before masking: 1 (unweighted, DP) or the capped example count
    weight = 1
    if _flag(cfg.get("weighted", False)):
        weight = int(max(1, min(metrics["num-examples"], float(cfg.get("max-weight", 100)))))
    res = FitRes(Status(Code.OK, ""), wire.to_parameters(delta, shared), weight, dict(metrics))
    return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)


def secagg_if_asked(msg, context, call_next):
    """Flower's ``secaggplus_mod`` for messages of a SecAgg+ round, a pass-through for the rest."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def make_client_app():
    """A Flower ``ClientApp`` running :func:`run_round` on ``train`` messages."""
    from flwr.clientapp import ClientApp

    app = ClientApp(mods=[secagg_if_asked])
    app.train()(_guarded_train)
    return app


def _guarded_train(msg, context):
    """:func:`_train` whose failures leave the device as their error type alone: Flower would send
    ``str(exception)`` to the server, and a message may name local paths or sizes of the user's text.
    The full error goes to the device's own log."""
    try:
        return _train(msg, context)
    except Exception as e:  # noqa: BLE001 - every failure becomes a typed, contentless error reply
        logging.getLogger(__name__).error("fleet round failed on this device: %s", e, exc_info=True)
        raise DeviceRoundError(f"the device's round failed ({type(e).__name__})") from None


class DeviceRoundError(PocketPeftError, RuntimeError):
    """A device's round failed; the reply names only the error's type."""


def _make_server_app():
    from .server import make_server_app

    return make_server_app()


client_app = make_client_app()
#: the deployment ServerApp: its settings come from the run config (see FleetConfig.from_run_config)
server_app = _make_server_app()

__all__ = ["client_app", "server_app", "make_client_app", "device_texts", "run_round", "secagg_if_asked"]
