"""A new way of serving = one Backend registration: a minimal fake backend, through the public interface only.

The fake serves a folder over HTTP (``python -m http.server`` in its own session): each file is a
"model" whose content is its top-1 label. It is registered with :func:`register` and then started,
probed, reported and stopped only through ``splitpack serve echo ...`` and the generic code paths
(readiness poll, serving check, pid file, log tail, stop).
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from splitpack import cli
from splitpack.serving.backend import Backend, CapacityWriter, Server, backends, in_run_dir, register, unregister
from splitpack.serving.health import ProbeResult, timed_probe
from splitpack.serving.net import free_port
from splitpack.serving.process import alive, terminate


class EchoServer(Server):
    pid_command = "http.server"

    def __init__(self, run_dir: str, port: int):
        self.run_dir, self.port = Path(run_dir), port
        self.process: subprocess.Popen | None = None

    pid_file = in_run_dir("echo.pid")
    log_file = in_run_dir("echo.log")
    config_file = in_run_dir("echo.json")
    models_dir = in_run_dir("models")

    def start(self, models: list[str], timeout: float = 30) -> dict:
        self.models_dir.mkdir(parents=True, exist_ok=True)
        for model in models:
            (self.models_dir / model).write_text(f"label of {model}")
        self.config_file.write_text(json.dumps({"port": self.port, "models": models}))
        with open(self.log_file, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1", "--directory",
                 str(self.models_dir)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid_file.write_text(f"{self.process.pid}\n")
        status = self.wait_ready(timeout)
        self.check_serving(models)
        return status

    def ready_state(self) -> dict | None:
        if self.process is not None and self.process.poll() is not None:
            raise self.error(f"echo exited while starting:\n{self.log_tail()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=2).close()
            return self.status()
        except OSError:
            return None

    def status(self) -> dict:
        config = json.loads(self.config_file.read_text()) if self.config_file.is_file() else {}
        return {"pid": self.pid(), "models": config.get("models", [])}

    def probe(self, models: list[str] | None = None, timeout: float | None = None) -> list[ProbeResult]:
        def top1(model: str) -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/{model}", timeout=timeout or 5) as answer:
                return answer.read().decode()

        return [timed_probe(m, lambda m=m: top1(m)) for m in models or self.status()["models"]]

    def stop(self, timeout: float = 60.0) -> bool:
        pid = self.pid()
        if pid is not None:
            terminate(pid, timeout, self.process)
        return pid is not None


def add_echo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", action="append", dest="models", default=[])


def start_echo(server: EchoServer, args: argparse.Namespace) -> list[str]:
    status = server.start(args.models, args.timeout)
    return [f"echo serving {', '.join(status['models'])} on 127.0.0.1:{server.port}"]


def write_echo_config(plan: dict, path: Path, name: str, settings, **weights) -> None:
    path.write_text(json.dumps({"model": plan["model"], "name": name}))


ECHO = Backend(name="echo", title="Echo", help="a folder served over HTTP (the fake backend of the tests)",
               add_arguments=add_echo_arguments, server=lambda args: EchoServer(args.run_dir, args.port),
               start=start_echo,
               capacity=CapacityWriter(flag="FILE", help="write the echo config", plan_key="echo_config",
                                       directory=False, target=lambda plan, dest: dest, write_into=write_echo_config))


@pytest.fixture
def echo():
    register(ECHO)
    yield ECHO
    unregister(ECHO.name)


def serve(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["serve", "echo", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_registered_backend_is_served_started_probed_and_stopped_by_the_generic_cli(echo, tmp_path, capsys):
    assert "echo" in backends() and {"torchserve", "triton"} <= set(backends())
    run, port = ["--run-dir", str(tmp_path / "run")], str(free_port())
    code, out, _ = serve(capsys, "start", *run, "--port", port, "--model", "cat", "--model", "dog")
    assert code == 0 and f"echo serving cat, dog on 127.0.0.1:{port}" in out
    pid = int((tmp_path / "run" / "echo.pid").read_text())
    try:
        code, out, _ = serve(capsys, "status", "--probe", "--json", *run, "--port", port)
        report = json.loads(out)
        assert code == 0 and report["running"] and report["pid"] == pid
        assert [(r["model"], r["ok"], r["detail"]) for r in report["probe"]] == [
            ("cat", True, "label of cat"), ("dog", True, "label of dog")]

        (tmp_path / "run" / "models" / "dog").unlink()  # a model that stops answering fails the probe
        code, out, _ = serve(capsys, "status", "--probe", *run, "--port", port)
        assert code == 1 and "cat: ok" in out and "dog: FAILED" in out

        # a start on a port something else holds: the generic readiness wait reports the server's own log
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            code, _, err = serve(capsys, "start", "--run-dir", str(tmp_path / "second"), "--port",
                                 str(holder.getsockname()[1]), "--model", "cat")
        assert code == 1 and err.startswith("splitpack serve echo: error: echo exited while starting")
        assert "Address already in use" in err
    finally:
        code, out, _ = serve(capsys, "stop", *run)
    assert code == 0 and out.strip() == f"Echo stopped (pid {pid})" and not alive(pid)
    assert serve(capsys, "status", *run) == (3, "not running\n", "")
    assert serve(capsys, "stop", *run)[:2] == (0, "Echo is not running\n")


def test_a_registered_backend_with_a_capacity_writer_gets_its_write_flag(echo):
    capacity = cli.build_parser("capacity")
    args = capacity.parse_args(["capacity", "--model", "resnet18", "--size", "64", "--write-echo", "plan.json"])
    assert args.write_echo == "plan.json"


def test_a_backend_that_only_writes_configs_is_not_a_serve_command():
    register(Backend(name="echo-config", title="Echo config", help="", capacity=ECHO.capacity))
    try:
        assert cli.build_parser("capacity").parse_args(
            ["capacity", "--model", "resnet18", "--size", "64", "--write-echo-config", "x.json"]).write_echo_config
        with pytest.raises(SystemExit):
            cli.build_parser("serve").parse_args(["serve", "echo-config", "status"])
    finally:
        unregister("echo-config")


def test_a_backend_name_is_registered_once(echo):
    with pytest.raises(ValueError, match="already registered"):
        register(Backend(name="echo", title="Other", help="", add_arguments=add_echo_arguments,
                         server=ECHO.server, start=start_echo))
