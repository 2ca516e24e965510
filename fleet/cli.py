"""``pocketpeft fleet``: train the global adapter — across a simulated fleet (``--simulate``), on a
local Flower deployment (``--deploy``: a SuperLink and SuperNodes on this machine), or on the host
from public text (``--host``). Wired into ``pocketpeft.apps.cli`` with :func:`add_parser`.

Like every ``pocketpeft`` command it takes ``--json`` and then prints exactly one JSON object
(the run's summary); errors are :class:`~pocketpeft.errors.PocketPeftError`\\ s. Flower's and
Ray's logs stay off the terminal; ``--progress`` prints one line per round on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pocketpeft.errors import ConfigError


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``fleet`` command to ``subparsers`` (an ``add_subparsers()`` object) and return it."""
    p = subparsers.add_parser(
        "fleet", help="train the global adapter: a simulated fleet (Flower), a local deployment, or the host"
    )
    for flag, hlp in (
        ("--json", "print one JSON object on stdout"),
        ("--quiet", "no progress output"),
        ("--progress", "one line per round on stderr even when it is not a terminal"),
    ):
        try:
            p.add_argument(flag, action="store_true", help=hlp)
        except argparse.ArgumentError:  # the caller's common flags already added it
            pass
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--simulate", action="store_true", help="chitchat senders as devices in Flower's simulation engine"
    )
    mode.add_argument(
        "--deploy", action="store_true", help="a SuperLink and one SuperNode per --node-texts file on 127.0.0.1"
    )
    mode.add_argument("--host", action="store_true", help="no fleet: centralized LoRA training on public text")
    p.add_argument("--bundle", required=True, help="the bundle whose global adapter to train")
    p.add_argument("--out", required=True, help="output directory: OUT/global (the adapter) and OUT/rounds.json")
    p.add_argument("--clients", type=int, default=4, help="simulated devices (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds (default 3)")
    p.add_argument("--clients-per-round", type=int, help="devices per round (default all; with DP the expected number)")
    p.add_argument("--steps", type=int, help="local steps per device and round (default 10; --host: total steps)")
    p.add_argument("--seconds", type=float, help="local time budget per device and round (--host: total)")
    p.add_argument("--lr", type=float, help="local learning rate (default: the bundle's training default)")
    p.add_argument(
        "--backend",
        default="auto",
        help="backend each device trains on (default auto: the device path the bundle has, e.g. onnxruntime)",
    )
    dp = p.add_mutually_exclusive_group()
    dp.add_argument("--dp-epsilon", type=float, metavar="E", help="client-level DP: calibrate the noise for epsilon E")
    dp.add_argument("--noise-multiplier", type=float, metavar="Z", help="client-level DP with noise multiplier Z")
    p.add_argument("--dp-delta", type=float, default=1e-5, help="delta of the DP guarantee (default 1e-5)")
    p.add_argument(
        "--clip", type=float, metavar="C", help="L2 clipping bound of each device's update (default 1.0 with DP)"
    )
    p.add_argument(
        "--secagg", action="store_true", help="secure aggregation (Flower's SecAgg+): the server sees only sums"
    )
    p.add_argument("--fedsa", action="store_true", help="FedSA-LoRA: share lora_A only; devices keep their own lora_B")
    p.add_argument("--unweighted", action="store_true", help="plain mean instead of example-weighted FedAvg")
    p.add_argument(
        "--exclude-senders",
        nargs="+",
        default=[],
        metavar="ID",
        help="chitchat senders never used as devices (e.g. the benchmark's test senders); comma lists work too",
    )
    p.add_argument(
        "--senders", nargs="+", metavar="ID", help="chitchat senders to use as devices (default: the most prolific)"
    )
    p.add_argument("--round-timeout", type=float, default=600.0, help="seconds to wait for devices' replies per round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--node-texts", nargs="+", metavar="FILE", help="--deploy: one text file (a device's messages) per SuperNode"
    )
    p.add_argument(
        "--text",
        help="--host: public text file, one message per line (default: a chitchat sample outside --exclude-senders)",
    )
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    p.set_defaults(fn=run)
    return p


def _split(ids) -> list[str]:
    return [s for item in ids or [] for s in str(item).split(",") if s]


def _show_progress(args) -> bool:
    return getattr(args, "progress", False) or (
        not args.json and not getattr(args, "quiet", False) and sys.stderr.isatty()
    )


def _round_line(rec: dict) -> None:
    bits = [f"round {rec['round']}"]
    if "sampled" in rec:
        bits.append(f"{rec['accepted']}/{rec['sampled']} devices accepted")
    rej = {k: v for k, v in rec.get("rejected", {}).items() if v}
    if rej:
        bits.append("rejected " + ", ".join(f"{k}={v}" for k, v in rej.items()))
    if rec.get("timed_out"):
        bits.append(f"{rec['timed_out']} timed out")
    if rec.get("train_loss") is not None:
        bits.append(f"train loss {rec['train_loss']:.3f}")
    if rec.get("eval_loss") is not None:
        bits.append(f"eval loss {rec['eval_loss']:.3f}")
    if rec.get("skipped"):
        bits.append(f"skipped: {rec['skipped']}")
    print("fleet: " + ", ".join(bits), file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> None:
    """Run ``pocketpeft fleet`` with parsed ``args``; prints the summary (one JSON object with --json)."""
    for name in ("clients", "rounds", "clients_per_round", "steps"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    progress = _round_line if _show_progress(args) else None
    exclude = _split(args.exclude_senders)
    if args.host:
        obj = _host(args, exclude)
    elif args.deploy:
        obj = _deploy(args, progress)
    else:
        from .run import simulate

        obj = simulate(
            args.bundle,
            clients=args.clients,
            senders=_split(args.senders) or None,
            exclude=exclude,
            progress=progress,
            verbose=args.verbose,
            **_round_options(args),
        )
    _emit(args, obj)


def _round_options(args) -> dict[str, Any]:
    """The settings a simulated and a deployed fleet share, from the command line."""
    return dict(
        out=args.out,
        rounds=args.rounds,
        clients_per_round=args.clients_per_round,
        steps=args.steps if args.steps or args.seconds else 10,
        seconds=args.seconds,
        lr=args.lr,
        backend=args.backend,
        clip_norm=args.clip,
        noise_multiplier=args.noise_multiplier or 0.0,
        dp_epsilon=args.dp_epsilon,
        dp_delta=args.dp_delta,
        secagg=args.secagg,
        fedsa=args.fedsa,
        weighted=not args.unweighted,
        round_timeout=args.round_timeout,
        seed=args.seed,
    )


def _host(args, exclude: list[str]) -> dict:
    from .run import host_train

    if args.text:
        from pocketpeft.text import read_text_file

        texts = read_text_file(args.text)
    else:
        from pocketpeft.corpus import general_texts

        texts = general_texts(exclude=exclude, n=2000, seed=args.seed)
    steps = args.steps if args.steps or args.seconds else 100
    return host_train(
        args.bundle,
        args.out,
        texts,
        steps=steps,
        seconds=args.seconds,
        lr=args.lr,
        backend=args.backend,
        seed=args.seed,
        progress=_show_progress(args),
    )


def _deploy(args, progress) -> dict:
    from pathlib import Path

    from .deploy import LocalFleet

    if not args.node_texts or len(args.node_texts) < 2:
        raise ConfigError("--deploy needs --node-texts with at least two files (one per SuperNode)")
    nodes = [{"texts": str(Path(f).resolve())} for f in args.node_texts]
    for n in nodes:
        if not Path(n["texts"]).is_file():
            raise ConfigError(f"--node-texts file {n['texts']} not found")
    with LocalFleet(Path(args.out) / "deployment", nodes) as fleet:
        # the whole run may take every round's timeout, plus the devices' start
        timeout = args.rounds * args.round_timeout + 300
        summary = fleet.run(timeout=timeout, bundle=args.bundle, **_round_options(args))
    if progress is not None:
        for rec in summary.get("per_round", []):
            progress(rec)
    return summary


def _emit(args, obj: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(obj, default=str))
        return
    if obj.get("source") == "host":
        print(
            f"host-trained global adapter v{obj['version']} written to {obj['global']}: {obj['steps']} steps, "
            f"loss {obj['first_loss']:.3f} → {obj['last_loss']:.3f}"
        )
        return
    dp = obj.get("dp")
    rej = {k: v for k, v in obj.get("rejected", {}).items() if v}
    print(
        f"fleet global adapter v{obj['version']} written to {obj['global']}: {obj['rounds']} rounds, "
        f"{obj['clients']} devices contributed, {obj['aggregation']}{' + SecAgg+' if obj.get('secagg') else ''}"
        + (f", (ε={dp['epsilon']:.2f}, δ={dp['delta']:g})-DP" if dp else ", no DP")
        + (f", rejected: {rej}" if rej else "")
        + f"; per-round metrics in {obj['rounds_json']}"
    )
