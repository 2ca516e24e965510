"""Running fleet training: in Flower's simulation engine (:func:`simulate`, chitchat senders as
devices) or without a fleet (:func:`host_train`, centralized LoRA on public text on the host).

Both write the same output: ``OUT/global/`` (a global adapter, :mod:`pocketpeft.global_adapter`)
and, for the fleet, ``OUT/rounds.json``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pocketpeft.errors import ConfigError

from .server import GLOBAL_SUBDIR, FleetConfig, FleetRunError, make_server_app

#: devices pick senders with at least this many words (enough text for a few rounds of training)
MIN_SENDER_WORDS = 2000


def pick_senders(n: int, exclude: Sequence[str] = (), min_words: int = MIN_SENDER_WORDS) -> list[str]:
    """``n`` chitchat senders for simulated devices: the most prolific ones with at least
    ``min_words`` words, never one of ``exclude`` (e.g. the benchmark's test senders).

    Raises :class:`ConfigError` when the corpus has fewer such senders."""
    from pocketpeft.corpus import top_senders

    ex = set(exclude)
    pool = [s for s in top_senders(min_words) if s not in ex]
    if len(pool) < n:
        raise ConfigError(
            f"{n} devices asked for, the corpus has {len(pool)} senders with >= {min_words} words outside --exclude-senders"
        )
    return pool[:n]


@contextlib.contextmanager
def quiet_flower(verbose: bool = False):
    """Flower's and Ray's log lines off the terminal (warnings of deprecated APIs included);
    errors still show. ``verbose`` leaves them as they are."""
    if verbose:
        yield
        return
    import warnings

    names = ("flwr", "ray", "absl")
    saved = {n: logging.getLogger(n).level for n in names}
    flwr_log = logging.getLogger("flwr")
    handlers = [(h, h.level) for h in flwr_log.handlers]
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    for h, _ in handlers:
        h.setLevel(logging.ERROR)
    env = {k: os.environ.get(k) for k in ("RAY_DEDUP_LOGS", "RAY_LOG_TO_STDERR", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO")}
    os.environ["RAY_DEDUP_LOGS"] = "0"
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, lv in saved.items():
            logging.getLogger(n).setLevel(lv)
        for h, lv in handlers:
            h.setLevel(lv)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def simulate(
    bundle: "str | os.PathLike",
    out: "str | os.PathLike",
    clients: int = 4,
    rounds: int = 3,
    clients_per_round: int | None = None,
    senders: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    steps: int | None = 10,
    seconds: float | None = None,
    lr: float | None = None,
    backend: str = "auto",
    clip_norm: float | None = None,
    noise_multiplier: float = 0.0,
    dp_epsilon: float | None = None,
    dp_delta: float = 1e-5,
    secagg: bool = False,
    fedsa: bool = False,
    weighted: bool = True,
    round_timeout: float = 600.0,
    seed: int = 0,
    eval_texts: Sequence[str] = (),
    max_texts: int = 2000,
    cpus_per_client: float = 2,
    progress: Callable[[dict], None] | None = None,
    client_app=None,
    verbose: bool = False,
) -> dict:
    """Federated training of a global adapter for ``bundle`` in Flower's simulation engine
    (``flwr.simulation.run_simulation``, Ray backend): ``clients`` simulated devices, each a
    chitchat sender (``senders`` or :func:`pick_senders`, never one of ``exclude``) training on its
    earlier messages for ``steps`` / ``seconds`` per round on ``backend``.

    ``cpus_per_client``: Ray CPUs per device (2 on a 2-core machine: devices run one at a time).
    ``progress`` is called with each round's record. ``client_app`` replaces the ClientApp (tests).
    Writes ``OUT/global/`` and ``OUT/rounds.json``; returns the run's summary (paths, rounds,
    clients, DP record, rejections, per-round metrics, seconds). Raises :class:`ConfigError` for bad
    settings and re-raises the ServerApp's error when the run fails."""
    from flwr.simulation import run_simulation

    if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
        raise ConfigError(f"clients must be a positive integer, got {clients!r}")
    if senders is None:
        senders = pick_senders(clients, exclude)
    else:
        senders = [s for s in senders if s not in set(exclude)]
        if len(senders) < clients:
            raise ConfigError(
                f"{clients} devices need {clients} senders, {len(senders)} given (after --exclude-senders)"
            )
    cfg = FleetConfig(
        bundle=str(Path(bundle).resolve()),
        out=str(out),
        rounds=rounds,
        clients_per_round=clients_per_round,
        num_nodes=clients,
        steps=steps,
        seconds=seconds,
        lr=lr,
        backend=backend,
        clip_norm=clip_norm,
        noise_multiplier=noise_multiplier,
        dp_epsilon=dp_epsilon,
        dp_delta=dp_delta,
        secagg=secagg,
        fedsa=fedsa,
        weighted=weighted,
        round_timeout=round_timeout,
        seed=seed,
        senders=list(senders[:clients]),
        max_texts=max_texts,
        eval_texts=list(eval_texts),
    )
    if secagg and clients < 2:
        raise ConfigError("secure aggregation needs at least 2 devices per round")
    from pocketpeft.manifest import Bundle

    Bundle(cfg.bundle)  # a missing / broken bundle fails here, not inside a Ray actor
    if client_app is None:
        from .apps import client_app
    result: dict = {}
    errors: list[BaseException] = []

    def on_round(rec: dict) -> None:
        if progress is not None:
            progress(rec)

    server_app = make_server_app(cfg, on_round, result)
    backend_config = {
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
        "init_args": {"logging_level": "ERROR" if not verbose else "INFO", "log_to_driver": verbose},
    }
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # Flower's usage pings: off unless the user opts in
    t0 = time.perf_counter()
    with quiet_flower(verbose):
        try:
            run_simulation(
                server_app, client_app, num_supernodes=clients, backend_config=backend_config, verbose_logging=verbose
            )
        except SystemExit as e:  # Flower exits the process on some failures; make it an error
            errors.append(e)
    if not result:
        reason = f" (Flower exited with {errors[0]})" if errors else ""
        raise FleetRunError(
            f"the fleet simulation ended without a result{reason}; run with verbose=True for Flower's log"
        )
    result["wall_seconds"] = time.perf_counter() - t0
    result["senders"] = list(senders[:clients])
    return result


def host_train(
    bundle: "str | os.PathLike",
    out: "str | os.PathLike",
    texts: Sequence[str],
    steps: int | None = None,
    seconds: float | None = None,
    lr: float | None = None,
    backend: str = "auto",
    version: int | None = None,
    seed: int = 0,
    progress: bool = False,
    notes: dict | None = None,
) -> dict:
    """The global adapter without a fleet: centralized LoRA training on public ``texts`` on the
    host, written like a fleet's (``OUT/global/``, ``source="host"``, no DP). Returns a summary."""
    from pocketpeft.adapter import Adapter
    from pocketpeft.global_adapter import GlobalInfo, save_global
    from pocketpeft.runtime import TrainConfig

    from .client import open_session

    sess = open_session(bundle, backend)
    sess.reset_adapter()
    sess.train_config = TrainConfig(lr=lr) if lr else TrainConfig()
    rep = sess.train(texts, steps=steps, seconds=seconds, progress=progress, seed=seed)
    m = sess.manifest
    if version is None:
        current = sess.bundle.global_info()
        version = current.version + 1 if current is not None else 1
    tensors = sess.get_adapter_tensors()
    start = sess.bundle.initial_adapter().tensors
    losses = [x for x in rep.losses if np.isfinite(x)]
    info = GlobalInfo(
        version=version,
        base_sha256=m.base_sha256,
        source="host",
        aggregation="centralized",
        notes={"steps": rep.steps, "texts": len(texts), "tokens": rep.tokens, "backend": rep.backend, **(notes or {})},
    )
    path = save_global(
        Adapter(m.lora, tensors, m.base_sha256, {"pocketpeft.source": "host"}),
        info,
        Path(out) / GLOBAL_SUBDIR,
        base_name=f"pocketpeft:{m.base_source}",
    )
    from . import updates as U

    return {
        "global": str(path),
        "version": version,
        "source": "host",
        "steps": rep.steps,
        "seconds": rep.seconds,
        "tokens": rep.tokens,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "delta_norm": U.l2_norm(U.subtract(tensors, start)),
    }
