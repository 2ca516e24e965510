"""Fleet training on Flower's deployment engine, on this machine: a SuperLink, SuperNodes as
separate processes on 127.0.0.1, and ``flwr run`` submitting the fleet app.

This is what a real deployment does across machines (devices run ``flower-supernode`` with their
own ``--node-config``), shrunk to one host for trying it out and for tests:

    with LocalFleet(workdir, node_configs=[{"texts": "a.txt"}, {"texts": "b.txt"}]) as fleet:
        summary = fleet.run(bundle="bundle", out="out", rounds=2, steps=5)

Everything runs without TLS (``--insecure``) and only on the loopback interface. The Flower App is
a generated directory holding only a ``pyproject.toml`` whose components point at
``pocketpeft.fleet.apps:server_app`` / ``client_app`` (the installed package); runtime dependency
installation is off. Flower's own state (its config, the apps it unpacks) lives in
``workdir/flwr-home`` (``FLWR_HOME``), never in the user's ``~/.flwr``. Every process is started
in its own process group and that group is ended on exit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from pocketpeft.errors import ConfigError, MissingDependencyError, PocketPeftError

APP_NAME = "pocketpeftfleet"


class DeploymentError(PocketPeftError, RuntimeError):
    """A local deployment process failed to start or the run failed (the message names its log)."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _exe(name: str) -> str:
    """A Flower console script: next to this Python first (a venv's bin), else on PATH."""
    p = Path(sys.executable).parent / name
    if p.is_file():
        return str(p)
    found = shutil.which(name)
    if found is None:
        raise MissingDependencyError(f"{name} not found; install the fleet extra: pip install 'pocketpeft[fleet]'")
    return found


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def node_config_arg(cfg: Mapping[str, Any]) -> str:
    """``--node-config`` text of a mapping: ``key="value" key2=3``."""
    return " ".join(f"{k}={_toml_value(v)}" for k, v in cfg.items())


def write_app(app_dir: "str | os.PathLike", run_config: Mapping[str, Any]) -> Path:
    """A minimal Flower App directory (``pyproject.toml`` only) whose components are the installed
    ``pocketpeft.fleet.apps:server_app`` / ``client_app``, with ``run_config`` as its defaults."""
    app_dir = Path(app_dir)
    app_dir.mkdir(parents=True, exist_ok=True)
    cfg = "\n".join(f"{k} = {_toml_value(v)}" for k, v in run_config.items() if v is not None)
    (app_dir / "pyproject.toml").write_text(
        f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{APP_NAME}"
version = "1.0.0"
description = "pocketpeft fleet training of a global LoRA adapter"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "pocketpeft"

[tool.flwr.app.components]
serverapp = "pocketpeft.fleet.apps:server_app"
clientapp = "pocketpeft.fleet.apps:client_app"

[tool.flwr.app.config]
{cfg}
""",
        encoding="utf-8",
    )
    return app_dir


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise DeploymentError(f"process exited with {proc.returncode} while starting; see {log}:\n{_tail(log)}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise DeploymentError(f"nothing listened on port {port} within {timeout:g}s; see {log}:\n{_tail(log)}")


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


class LocalFleet:
    """A SuperLink and ``len(node_configs)`` SuperNodes on 127.0.0.1 (a context manager: stopped
    on exit). ``node_configs``: each SuperNode's ``--node-config`` (where its data is, see
    :mod:`.apps`). Logs go to ``workdir/logs``."""

    def __init__(
        self, workdir: "str | os.PathLike", node_configs: Sequence[Mapping[str, Any]], start_timeout: float = 90.0
    ) -> None:
        if not node_configs:
            raise ConfigError("a local fleet needs at least one SuperNode (node_configs is empty)")
        self.workdir = Path(workdir).resolve()
        self.home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        self.node_configs = [dict(c) for c in node_configs]
        self.start_timeout = start_timeout
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.link_port: int | None = None

    # ------------------------------------------------------------------ processes
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(FLWR_HOME=str(self.home), FLWR_TELEMETRY_ENABLED="0", PYTHONUNBUFFERED="1")
        env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def _spawn(self, name: str, argv: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.logs / f"{name}.log"
        fh = open(log, "wb")
        try:
            proc = subprocess.Popen(
                argv, stdout=fh, stderr=subprocess.STDOUT, env=self.env(), cwd=self.workdir, start_new_session=True
            )
        finally:
            fh.close()
        self.procs.append((name, proc))
        return proc, log

    def start(self) -> "LocalFleet":
        self.logs.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        self.link_port = free_port()
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "local-fleet"\n\n[superlink.local-fleet]\n'
            f'address = "127.0.0.1:{self.link_port}"\ninsecure = true\n',
            encoding="utf-8",
        )
        try:
            proc, log = self._spawn(
                "superlink",
                [
                    _exe("flower-superlink"),
                    "--insecure",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.link_port),
                    "--disable-runtime-dependency-installation",
                    "--database",
                    str(self.workdir / "superlink.db"),
                ],
            )
            _wait_port(self.link_port, proc, log, self.start_timeout)
            for i, nc in enumerate(self.node_configs):
                port = free_port()
                argv = [
                    _exe("flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{self.link_port}",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ]
                if nc:
                    argv += ["--node-config", node_config_arg(nc)]
                proc, log = self._spawn(f"supernode-{i}", argv)
                _wait_port(port, proc, log, self.start_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace: float = 10.0) -> None:
        """End every process this fleet started (their process groups: SuperLink and SuperNodes
        spawn the ServerApp / ClientApp processes), SIGTERM first, SIGKILL after ``grace`` seconds."""
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + grace
        for _, proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group, if any
            except (ProcessLookupError, PermissionError):
                pass
            proc.poll()
        self.procs.clear()

    def __enter__(self) -> "LocalFleet":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ runs
    def run(self, timeout: float = 600.0, **run_config: Any) -> dict:
        """Submit the fleet app with ``run_config`` (:class:`~.server.FleetConfig` fields, e.g.
        ``bundle``, ``out``, ``rounds``, ``steps``, ``min_clients``) via ``flwr run --stream``,
        wait for it, and return the run's summary (``OUT/summary.json``).

        Raises :class:`DeploymentError` (with the log's tail) when the run ends without one."""
        if self.link_port is None:
            raise DeploymentError("the local fleet is not started (use it as a context manager)")
        rc = {k.replace("_", "-"): v for k, v in run_config.items() if v is not None}
        for k in ("bundle", "out"):
            if k not in rc:
                raise ConfigError(f"run needs '{k}'")
        rc["bundle"] = str(Path(rc["bundle"]).resolve())
        rc["out"] = str(Path(rc["out"]).resolve())
        rc.setdefault("num-nodes", len(self.node_configs))
        rc.setdefault("min-clients", min(2, len(self.node_configs)))
        out = Path(rc["out"])
        summary = out / "summary.json"
        if summary.exists():
            summary.unlink()
        app = write_app(self.workdir / "app", rc)
        log = self.logs / "flwr-run.log"
        with open(log, "wb") as fh:
            try:
                p = subprocess.run(
                    [_exe("flwr"), "run", str(app), "local-fleet", "--stream"],
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    env=self.env(),
                    cwd=self.workdir,
                    timeout=timeout,
                )
                code = p.returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        # --stream returns when the run ends; the summary is written just before
        t0 = time.monotonic()
        while not summary.exists() and time.monotonic() - t0 < 10:
            time.sleep(0.5)
        if not summary.exists():
            raise DeploymentError(
                f"the fleet run ended ({code}) without writing {summary}; flwr run log {log}:\n{_tail(log)}\n"
                f"superlink log:\n{_tail(self.logs / 'superlink.log')}"
            )
        return json.loads(summary.read_text(encoding="utf-8"))
