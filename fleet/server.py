"""The fleet's ServerApp: holds the global LoRA adapter, runs the rounds, writes the result.

Each round it samples devices, sends them the global adapter and the round's settings, waits for
replies at most ``round_timeout`` seconds (a device that drops out or hangs costs the round its
update, not its progress), validates every reply (:func:`~.updates.validate_update`: refused
replies are counted by reason and never aggregated), aggregates and applies the mean delta.

- Aggregation: FedAvg weighted by the devices' example counts (packed training rows), or with DP
  the unweighted mean of clipped deltas (DP-FedAvg). ``fedsa``: FedSA-LoRA — only the ``lora_A``
  tensors are shared and averaged; each device keeps its own ``lora_B`` in its node state.
  **The shipped global adapter's B under FedSA**: the final round shares B too (devices send
  ``B_local - B_global`` alongside the A delta, clipped, noised and aggregated like any round), so
  the global B is the (noised) mean of the devices' own B matrices after their last local
  training. Why: a LoRA product needs both factors, and the initial B is zero — shipping it would
  make the global adapter a no-op. Doing it in the last round costs no extra round (the accountant
  counts every round, B included) and the B averaged is the devices' most trained one.
- DP: clients clip to ``clip_norm`` and add their share of Gaussian noise (see
  :mod:`.updates`); with DP the server samples devices by Poisson sampling at rate
  ``clients_per_round / num_nodes``, the mechanism :mod:`.dp` accounts for. A round that samples
  fewer devices than it needs is skipped, but still counted by the accountant (conservative).
- SecAgg+: Flower's ``SecAggPlusWorkflow`` (masking, Shamir shares, dropout recovery); the server
  learns only the sum. It is per-client validation's limit: under SecAgg+ the server checks each
  device's numeric metrics (base model) and the *aggregate* (finite, shapes, norm), and refuses a
  round whose aggregate fails. SecAgg+ quantizes each entry into ``[-range, range]`` with 2^22
  levels, ``range = clip_norm + 6 · noise std`` (``secagg_range`` without clipping).

The output directory gets ``global/`` (:func:`~pocketpeft.global_adapter.save_global`,
``source="fleet"``) and ``rounds.json`` (per-round metrics, rewritten after every round).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pocketpeft.errors import ConfigError, PocketPeftError
from pocketpeft.fsutil import write_bytes_atomic

from . import dp as DP
from . import updates as U
from . import wire

log = logging.getLogger(__name__)

GLOBAL_SUBDIR = "global"
ROUNDS_FILE = "rounds.json"


class FleetRunError(PocketPeftError, RuntimeError):
    """A fleet run (simulation or deployment) ended without writing its global adapter."""


@dataclass
class FleetConfig:
    """Settings of a fleet run (the ServerApp's; devices get theirs from each round's message).

    ``clients_per_round``: devices per round (None: every connected one; with DP the *expected*
    number, Poisson-sampled). ``min_clients``: fewer sampled (or, without SecAgg, accepted) devices
    skip the round. ``num_nodes``: the fleet size for the sampling rate (default: connected at
    start). ``round_timeout``: seconds to wait for replies. ``wait_nodes``: seconds to wait for
    enough devices to connect before round 1. DP is on with ``noise_multiplier > 0`` or
    ``dp_epsilon`` (then the multiplier is calibrated for it at ``dp_delta``); ``clip_norm``
    defaults to 1.0 under DP. ``weighted``: FedAvg by example counts (ignored under DP).
    """

    bundle: str
    out: str
    rounds: int = 3
    clients_per_round: int | None = None
    min_clients: int = 1
    num_nodes: int | None = None
    steps: int | None = 10
    seconds: float | None = None
    lr: float | None = None
    batch_size: int | None = None
    backend: str = "auto"
    clip_norm: float | None = None
    noise_multiplier: float = 0.0
    dp_epsilon: float | None = None
    dp_delta: float = DP.DEFAULT_DELTA
    secagg: bool = False
    fedsa: bool = False
    weighted: bool = True
    round_timeout: float = 600.0
    wait_nodes: float = 120.0
    server_lr: float = 1.0
    seed: int = 0
    version: int | None = None
    senders: list[str] = field(default_factory=list)
    max_texts: int = 2000
    eval_texts: list[str] = field(default_factory=list)
    norm_slack: float = U.NORM_SLACK
    secagg_range: float = 4.0
    secagg_max_weight: float = 100.0

    def __post_init__(self) -> None:
        for name in ("rounds", "min_clients"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        for name in ("clients_per_round", "num_nodes"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name} must be a positive integer or None, got {v!r}")
        if self.steps is None and self.seconds is None:
            raise ConfigError("devices need a budget per round: steps and/or seconds")
        if self.noise_multiplier < 0:
            raise ConfigError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.noise_multiplier > 0 and self.dp_epsilon is not None:
            raise ConfigError("give either a noise multiplier or a target epsilon, not both")
        if self.dp and self.clip_norm is None:
            self.clip_norm = 1.0
        if not (self.round_timeout > 0):
            raise ConfigError(f"round_timeout must be positive, got {self.round_timeout}")

    @property
    def dp(self) -> bool:
        return self.noise_multiplier > 0 or self.dp_epsilon is not None

    @property
    def aggregation(self) -> str:
        return ("dp-" if self.dp else "") + ("fedsa" if self.fedsa else "fedavg")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["senders"] = len(self.senders)
        d["eval_texts"] = len(self.eval_texts)
        return d

    @classmethod
    def from_run_config(cls, rc: dict[str, Any]) -> "FleetConfig":
        """From a Flower run config (``[tool.flwr.app.config]`` / ``flwr run --run-config``):
        the field names with ``-`` for ``_``; ``senders`` comma-separated; 0 / "" mean unset."""
        kw: dict[str, Any] = {}
        for f in cls.__dataclass_fields__.values():
            key = f.name.replace("_", "-")
            if key not in rc:
                continue
            v = rc[key]
            if f.name == "senders":
                kw[f.name] = [s for s in str(v).split(",") if s]
            elif f.name == "eval_texts":
                continue
            elif v in ("", None) or (
                f.name
                in (
                    "clients_per_round",
                    "num_nodes",
                    "version",
                    "dp_epsilon",
                    "seconds",
                    "lr",
                    "batch_size",
                    "clip_norm",
                )
                and v == 0
            ):
                continue
            else:
                kw[f.name] = v
        for k in ("bundle", "out"):
            if k not in kw:
                raise ConfigError(f"the run config must set '{k}'")
        for k in (
            "rounds",
            "min_clients",
            "clients_per_round",
            "num_nodes",
            "steps",
            "seed",
            "version",
            "max_texts",
            "batch_size",
        ):
            if k in kw:
                kw[k] = int(kw[k])
        for k in ("secagg", "fedsa", "weighted"):
            if k in kw and isinstance(kw[k], str):
                kw[k] = kw[k].lower() in ("1", "true", "yes")
        return cls(**kw)


class _Metered:
    """A Grid that counts the bytes each node's replies carry (arrays and byte strings)."""

    def __init__(self, grid) -> None:
        self.grid = grid
        self.bytes: dict[int, int] = {}

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for m in replies:
            if not m.has_error():
                nid = m.metadata.src_node_id
                self.bytes[nid] = self.bytes.get(nid, 0) + message_bytes(m)
        return replies


def message_bytes(msg) -> int:
    """Payload bytes of a reply: its arrays' serialized data plus any byte strings in config records."""
    n = 0
    for rec in msg.content.array_records.values():
        n += sum(len(a.data) for a in rec.values())
    for rec in msg.content.config_records.values():
        for v in rec.values():
            if isinstance(v, (bytes, bytearray)):
                n += len(v)
            elif isinstance(v, list):
                n += sum(len(x) for x in v if isinstance(x, (bytes, bytearray)))
    return n


class FleetServer:
    """The server's state and round logic (what :func:`make_server_app`'s main runs)."""

    def __init__(self, cfg: FleetConfig, progress: Callable[[dict], None] | None = None) -> None:
        from pocketpeft.manifest import Bundle

        self.cfg = cfg
        self.progress = progress
        self.bundle = Bundle(cfg.bundle)
        m = self.bundle.manifest
        self.expected = {k: list(v) for k, v in m.trainable.items()}
        self.names = sorted(self.expected)
        self.base = m.base_sha256
        self.global_tensors = {k: np.asarray(v, np.float32) for k, v in self.bundle.initial_adapter().tensors.items()}
        self.start_tensors = {k: v.copy() for k, v in self.global_tensors.items()}
        self.rng = np.random.default_rng(cfg.seed)
        self.records: list[dict] = []
        self.rejects = U.RejectCounter()
        self.contributors: set[int] = set()
        self.dp_cfg: DP.DpConfig | None = None
        self.noise_std = 0.0
        self.rounds_run = 0
        self.aggregated_rounds = 0
        self.out = Path(cfg.out)

    # ------------------------------------------------------------------ setup
    def _wait_for_nodes(self, grid, needed: int) -> list[int]:
        t0 = time.monotonic()
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= needed or time.monotonic() - t0 > self.cfg.wait_nodes:
                return nodes
            time.sleep(0.5)

    def _setup_dp(self, n_nodes: int) -> None:
        cfg = self.cfg
        k = cfg.clients_per_round or n_nodes
        q = min(1.0, k / n_nodes)
        if cfg.dp:
            z = cfg.noise_multiplier
            if cfg.dp_epsilon is not None:
                z = DP.noise_for_epsilon(cfg.dp_epsilon, q, cfg.rounds, cfg.dp_delta)
            self.dp_cfg = DP.DpConfig(cfg.clip_norm, z, q, cfg.rounds, cfg.dp_delta)
            self.noise_std = U.client_noise_std(z, cfg.clip_norm, q * n_nodes)
        self.sampling_rate = q
        self._expected_clients = q * n_nodes  # DP-FedAvg divides by it, not by who arrived
        self._noise_rng = np.random.default_rng()  # the server's top-up noise: OS entropy, not the seed

    def _sample(self, nodes: list[int]) -> list[int]:
        cfg = self.cfg
        if cfg.dp:
            return DP.poisson_sample(nodes, self.sampling_rate, self.rng)
        k = min(cfg.clients_per_round or len(nodes), len(nodes))
        # indices, not the ids: node ids are 64-bit unsigned and numpy would turn them into floats
        return sorted(nodes[int(i)] for i in self.rng.choice(len(nodes), size=k, replace=False))

    def _round_config(self, r: int, final: bool) -> dict[str, Any]:
        cfg = self.cfg
        return wire.round_config(
            round=r,
            bundle=str(Path(cfg.bundle).resolve()),
            backend=cfg.backend,
            steps=cfg.steps,
            seconds=cfg.seconds,
            lr=cfg.lr,
            batch_size=cfg.batch_size,
            clip_norm=cfg.clip_norm,
            noise_std=self.noise_std,
            fedsa=cfg.fedsa,
            secagg=cfg.secagg,
            share_b=cfg.fedsa and final,
            weighted=cfg.weighted and not cfg.dp,
            max_weight=cfg.secagg_max_weight,
            max_texts=cfg.max_texts,
            seed=cfg.seed * 100003 + r,
            sim_senders=",".join(cfg.senders) if cfg.senders else None,
        )

    def _shared(self, final: bool) -> list[str]:
        return U.shared_names(self.names, fedsa=self.cfg.fedsa and not final)

    # ------------------------------------------------------------------ rounds
    def run(self, grid, context) -> dict:
        """All rounds, then the global adapter and ``rounds.json``; returns the summary."""
        cfg = self.cfg
        needed = max(cfg.min_clients, 2 if cfg.secagg else 1, cfg.num_nodes or 0)
        nodes = self._wait_for_nodes(grid, needed)
        if len(nodes) < max(cfg.min_clients, 2 if cfg.secagg else 1):
            raise ConfigError(
                f"only {len(nodes)} devices connected within {cfg.wait_nodes:g}s; the run needs at least {needed}"
            )
        self._setup_dp(cfg.num_nodes or len(nodes))
        self.out.mkdir(parents=True, exist_ok=True)
        t_start = time.perf_counter()
        if cfg.eval_texts:
            self.records.append({"round": 0, "eval_loss": self._eval()})
        for r in range(1, cfg.rounds + 1):
            nodes = sorted(grid.get_node_ids()) or nodes
            rec = self._round(grid, context, r, nodes, final=r == cfg.rounds)
            self.records.append(rec)
            self.rounds_run = r
            self._write_rounds()
            if self.progress is not None:
                self.progress(rec)
        return self._finish(time.perf_counter() - t_start)

    def _round(self, grid, context, r: int, nodes: list[int], final: bool) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        sampled = self._sample(nodes)
        rc = self._round_config(r, final)
        shared = self._shared(final)
        rec: dict[str, Any] = {
            "round": r,
            "available": len(nodes),
            "sampled": len(sampled),
            "replied": 0,
            "accepted": 0,
            "rejected": U.RejectCounter().as_dict(),
            "timed_out": 0,
            "shared_tensors": "all" if len(shared) == len(self.names) else "lora_A",
        }
        need = max(cfg.min_clients, 2 if cfg.secagg else 1)
        if len(sampled) < need:
            rec.update(
                skipped=f"sampled {len(sampled)} devices, the round needs {need}", seconds=time.perf_counter() - t0
            )
            return rec
        metered = _Metered(grid)
        if cfg.secagg:
            mean, info = self._secagg_round(metered, context, r, sampled, rc, shared)
        else:
            mean, info = self._plain_round(metered, r, sampled, rc, shared)
        rec.update(info)
        for reason, n in rec["rejected"].items():
            self.rejects[reason] += n
        up = list(metered.bytes.values())
        rec["upload_bytes_per_client"] = float(np.mean(up)) if up else 0.0
        if mean is not None:
            self.global_tensors = U.apply_delta(self.global_tensors, mean, cfg.server_lr)
            self.aggregated_rounds += 1
            rec["mean_delta_norm"] = U.l2_norm(mean)
        else:
            rec.setdefault("skipped", "no update was accepted")
        if cfg.eval_texts:
            rec["eval_loss"] = self._eval()
        rec["seconds"] = time.perf_counter() - t0
        return rec

    def _bound(self, shared: Sequence[str]) -> float:
        dim = int(sum(int(np.prod(self.expected[n])) for n in shared))
        return U.norm_bound(self.cfg.clip_norm, self.noise_std, dim, self.cfg.norm_slack)

    def _plain_round(self, grid, r: int, sampled: list[int], rc: dict, shared: list[str]):
        from flwr.app import ConfigRecord, Message, MessageType, RecordDict

        content = RecordDict({wire.GLOBAL: wire.to_array_record(self.global_tensors), wire.CONFIG: ConfigRecord(rc)})
        msgs = [Message(content, dst_node_id=nid, message_type=MessageType.TRAIN, group_id=str(r)) for nid in sampled]
        replies = list(grid.send_and_receive(msgs, timeout=self.cfg.round_timeout))
        rejected = U.RejectCounter()
        deltas, weights, losses = [], [], []
        expected = {n: self.expected[n] for n in shared}
        bound = self._bound(shared)
        for m in replies:
            nid = m.metadata.src_node_id
            try:
                if m.has_error():
                    raise U.UpdateRejectedError(f"device {nid} failed: {m.error.reason}", reason="error")
                c = m.content
                if wire.DELTA not in c.array_records or wire.METRICS not in c.metric_records:
                    raise U.UpdateFormatError(f"device {nid}: reply lacks {wire.DELTA} / {wire.METRICS}")
                try:  # anything a device sends is untrusted: a malformed record is a rejection, not a crash
                    metrics = dict(c.metric_records[wire.METRICS])
                    arrays = wire.from_array_record(c.array_records[wire.DELTA])
                    weight = float(metrics.get("num-examples", 1))
                    loss = float(metrics.get("train-loss", float("nan")))
                except (TypeError, ValueError, OverflowError, KeyError) as e:
                    raise U.UpdateFormatError(f"device {nid}: unreadable reply ({type(e).__name__}: {e})") from e
                if not (math.isfinite(weight) and weight >= 1):
                    raise U.UpdateFormatError(f"device {nid}: num-examples {weight!r} is not a count >= 1")
                delta = U.validate_update(
                    arrays,
                    expected,
                    base_sha256=self.base,
                    update_base=metrics.get("base-id"),
                    max_norm=bound,
                    where=f"device {nid}'s update",
                )
            except U.UpdateRejectedError as e:
                rejected.add(e)
                log.info("round %d: %s", r, e)
                continue
            deltas.append(delta)
            weights.append(min(weight, self.cfg.secagg_max_weight))  # one device can't outweigh the round
            if math.isfinite(loss):
                losses.append(loss)
            self.contributors.add(nid)
        info = {
            "replied": len(replies),
            "accepted": len(deltas),
            "rejected": rejected.as_dict(),
            "timed_out": len(sampled) - len(replies),
            "train_loss": float(np.mean(losses)) if losses else None,
        }
        if len(deltas) < self.cfg.min_clients:
            return None, info
        if self.cfg.dp:
            return U.dp_release(deltas, self._expected_clients, self.noise_std, self._noise_rng), info
        return U.fedavg(deltas, weights if self.cfg.weighted else None), info

    def _secagg_round(self, grid, context, r: int, sampled: list[int], rc: dict, shared: list[str]):
        import flwr.compat.common.recorddict_compat as compat
        from flwr.app import ConfigRecord
        from flwr.common import FitIns
        from flwr.server.compat.grid_client_proxy import GridClientProxy
        from flwr.server.compat.legacy_context import LegacyContext
        from flwr.server.workflow import SecAggPlusWorkflow
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

        params = wire.to_parameters(self.global_tensors, self.names)
        strategy = _CaptureStrategy(
            [(GridClientProxy(nid, grid, context.run_id), FitIns(params, dict(rc))) for nid in sampled]
        )
        lctx = LegacyContext(context, strategy=strategy)
        lctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: r})
        lctx.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(params, True)
        rng = self.cfg.clip_norm + 6 * self.noise_std if self.cfg.clip_norm else self.cfg.secagg_range
        weighted = bool(rc.get("weighted"))
        wf = SecAggPlusWorkflow(
            num_shares=1.0,
            reconstruction_threshold=0.5,
            clipping_range=float(rng),
            max_weight=float(self.cfg.secagg_max_weight if weighted else 1.0),
            timeout=self.cfg.round_timeout,
        )
        try:
            wf(grid, lctx)
        finally:  # the workflow's records live in the run context's state; drop them
            context.state.config_records.pop(MAIN_CONFIGS_RECORD, None)
            context.state.array_records.pop(MAIN_PARAMS_RECORD, None)
        rejected = U.RejectCounter()
        results = strategy.results
        for _ in strategy.failures:
            rejected["error"] += 1
        losses = [float(f.metrics.get("train-loss", float("nan"))) for _, f in results]
        losses = [x for x in losses if math.isfinite(x)]
        info = {
            "replied": len(results) + len(strategy.failures),
            "accepted": 0,
            "rejected": rejected.as_dict(),
            "timed_out": max(0, len(sampled) - len(results) - len(strategy.failures)),
            "train_loss": float(np.mean(losses)) if losses else None,
            "secagg": True,
        }
        if strategy.aggregate is None:
            info["skipped"] = "secure aggregation did not complete (too few devices stayed)"
            return None, info

        def other_base(metrics) -> bool:
            try:
                return int(metrics.get("base-id", -1)) != U.base_id(self.base)
            except (TypeError, ValueError, OverflowError):
                return True

        bad_base = [p.node_id for p, f in results if other_base(f.metrics)]
        try:
            if bad_base:
                raise U.UpdateBaseMismatchError(f"devices {bad_base} trained on another base model")
            mean = U.validate_update(
                wire.from_parameters(strategy.aggregate, shared),
                {n: self.expected[n] for n in shared},
                max_norm=self._bound(shared),
                where=f"round {r}'s securely aggregated update",
            )
        except (U.UpdateRejectedError, ValueError) as e:
            reason = getattr(e, "reason", "format")
            info["rejected"][reason] += len(results)
            info["skipped"] = f"aggregate refused: {e}"
            return None, info
        info["accepted"] = len(results)
        self.contributors.update(p.node_id for p, _ in results)
        if self.cfg.dp:  # the workflow averaged over who stayed: back to the sum, then the DP release
            n, m = len(results), self._expected_clients
            std = self.noise_std * math.sqrt(max(0.0, m - n))  # the noise of the expected devices that didn't report
            mean = {
                k: (
                    (v.astype(np.float64) * n + (self._noise_rng.normal(0.0, std, v.shape) if std else 0.0)) / m
                ).astype(np.float32)
                for k, v in mean.items()
            }
        return mean, info

    def _eval(self) -> float:
        from .client import open_session

        sess = open_session(self.cfg.bundle, self.cfg.backend)
        sess.set_adapter_tensors(self.global_tensors)
        return float(sess.eval(self.cfg.eval_texts).loss)

    # ------------------------------------------------------------------ output
    def _write_rounds(self) -> None:
        doc = {"config": self.cfg.to_dict(), "rounds": self.records, "rejected": self.rejects.as_dict()}
        write_bytes_atomic(self.out / ROUNDS_FILE, (json.dumps(doc, indent=1, default=float) + "\n").encode())

    def _finish(self, seconds: float) -> dict:
        from pocketpeft.adapter import Adapter
        from pocketpeft.global_adapter import GlobalInfo, save_global

        cfg = self.cfg
        if not self.aggregated_rounds:  # shipping the untouched start would replace a trained global
            raise FleetRunError(
                f"no round of {self.rounds_run} aggregated an update (rejected: {self.rejects.as_dict()}); "
                "no global adapter written"
            )
        if not all(np.isfinite(v).all() for v in self.global_tensors.values()):
            raise FleetRunError("the aggregated global adapter holds NaN or inf values; no global adapter written")
        version = cfg.version
        if version is None:
            try:
                current = self.bundle.global_info()
            except Exception:  # a corrupt installed one doesn't stop the run; the new one is version 1+
                current = None
            version = (current.version + 1) if current is not None else 1
        dp = self.dp_cfg.record(self.rounds_run) if self.dp_cfg is not None else None
        info = GlobalInfo(
            version=version,
            base_sha256=self.base,
            source="fleet",
            rounds=self.rounds_run,
            clients=len(self.contributors),
            aggregation=cfg.aggregation,
            dp=dp,
            notes={
                "secagg": cfg.secagg,
                "weighted": cfg.weighted and not cfg.dp,
                "clients_per_round": cfg.clients_per_round,
                "steps": cfg.steps,
                "seconds": cfg.seconds,
                "fedsa_b": "mean of the devices' own lora_B, shared in the final round" if cfg.fedsa else None,
                "rejected": self.rejects.as_dict(),
            },
        )
        adapter = Adapter(self.bundle.manifest.lora, self.global_tensors, self.base, {"pocketpeft.source": "fleet"})
        path = save_global(
            adapter, info, self.out / GLOBAL_SUBDIR, base_name=f"pocketpeft:{self.bundle.manifest.base_source}"
        )
        self._write_rounds()
        summary = {
            "global": str(path),
            "rounds_json": str(self.out / ROUNDS_FILE),
            "version": version,
            "rounds": self.rounds_run,
            "clients": len(self.contributors),
            "aggregation": cfg.aggregation,
            "secagg": cfg.secagg,
            "dp": dp,
            "rejected": self.rejects.as_dict(),
            "delta_norm": U.l2_norm(U.subtract(self.global_tensors, self.start_tensors)),
            "seconds": seconds,
            "per_round": self.records,
        }
        return summary


class _CaptureStrategy:
    """The legacy Strategy face SecAggPlusWorkflow needs: hands out this round's FitIns and keeps
    the (securely) aggregated parameters and the devices' FitRes metrics."""

    def __init__(self, instructions) -> None:
        self.instructions = instructions
        self.aggregate = None
        self.results: list = []
        self.failures: list = []

    def configure_fit(self, server_round, parameters, client_manager):
        return self.instructions

    def aggregate_fit(self, server_round, results, failures):
        self.results, self.failures = list(results), list(failures)
        if results:
            self.aggregate = results[0][1].parameters  # every FitRes holds the unmasked aggregate
        return None, {}

    def initialize_parameters(self, client_manager):  # pragma: no cover - not called by the workflow
        return None

    def configure_evaluate(self, *a):  # pragma: no cover
        return []

    def aggregate_evaluate(self, *a):  # pragma: no cover
        return None, {}

    def evaluate(self, *a):  # pragma: no cover
        return None


def make_server_app(
    cfg: FleetConfig | None = None, progress: Callable[[dict], None] | None = None, result: dict | None = None
):
    """A Flower ``ServerApp`` running a fleet: with ``cfg`` (simulation, built in-process) or, when
    None, from the run config (deployment: ``flwr run`` with ``[tool.flwr.app.config]``).
    ``result``, if given, receives the summary."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        fc = cfg if cfg is not None else FleetConfig.from_run_config(dict(context.run_config))
        summary = FleetServer(fc, progress).run(grid, context)
        if result is not None:
            result.update(summary)
        elif cfg is None:  # deployment: the summary next to rounds.json
            write_bytes_atomic(
                Path(fc.out) / "summary.json", (json.dumps(summary, indent=1, default=float) + "\n").encode()
            )

    return app
