"""Start, stop, inspect and probe a Triton deployment (tritonserver + gateway + supervisor).

A deployment is one detached process (:mod:`splitpack.serving.triton.supervisor`) that
owns tritonserver. Its run folder (``<run-dir>/triton``) holds:

    supervisor.pid    the deployment's process (the only pid ``stop`` signals)
    state.json        starting | ready (ports, models, threads) | failed (the reason) | stopped
    admin.key         the key of the restricted model-control protocols (mode 0600)
    events.jsonl      one line per instance recovery (model, dead instances, seconds)
    tritonserver.log  the server's log; supervisor.log the deployment's own
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from splitpack.serving.backend import in_run_dir
from splitpack.serving.process import kill_group, tail, terminate
from splitpack.serving.triton.gateway import GatewayLimits
from splitpack.serving.triton.server import (DEFAULT_GRPC_PORT, DEFAULT_RUN_DIR, TritonProcess, TritonServerError,
                                             read_pid)
from splitpack.serving.triton.supervisor import StateFile, admin_headers, read_admin_key

PACKAGE_PARENT = Path(__file__).resolve().parents[3]  # the folder holding the splitpack package


SUPERVISOR = "splitpack.serving.triton.supervisor"


@dataclass
class TritonDeployment(TritonProcess):
    """One deployment on 127.0.0.1:``grpc_port``. ``models`` None = every model of the repository."""

    pid_command = SUPERVISOR

    repository: Path
    grpc_port: int = DEFAULT_GRPC_PORT
    run_dir: Path = DEFAULT_RUN_DIR
    models: list[str] | None = None
    threads: int | None = None
    max_request_bytes: int = GatewayLimits.max_request_bytes
    open_model_control: bool = False
    http_port: int | None = None
    metrics_port: int | None = None
    log_verbose: int = 0
    process: subprocess.Popen | None = field(default=None, init=False, repr=False)

    # -- files ----------------------------------------------------------------------------
    pid_file = in_run_dir("triton/supervisor.pid")
    config_file = in_run_dir("triton/state.json")  # what it runs (ports, models, threads) or why it failed
    supervisor_log = in_run_dir("triton/supervisor.log")

    def state(self) -> dict:
        return StateFile(self.config_file).read()

    def admin_key(self) -> str | None:
        return read_admin_key(self.state_dir / "admin.key")

    def admin_headers(self) -> dict[str, str]:
        return admin_headers(self.admin_key())

    def recoveries(self) -> list[dict]:
        events = self.state_dir / "events.jsonl"
        if not events.is_file():
            return []
        return [json.loads(line) for line in events.read_text().splitlines() if line.strip()]

    # -- lifecycle ------------------------------------------------------------------------
    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", SUPERVISOR, "--repo", str(Path(self.repository).resolve()),
               "--run-dir", str(Path(self.run_dir).resolve()), "--grpc-port", str(self.grpc_port),
               "--max-request-bytes", str(self.max_request_bytes), "--log-verbose", str(self.log_verbose)]
        if self.models:
            cmd += ["--models", ",".join(self.models)]
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        if self.open_model_control:
            cmd.append("--open-model-control")
        if self.http_port:
            cmd += ["--http-port", str(self.http_port)]
        if self.metrics_port:
            cmd += ["--metrics-port", str(self.metrics_port)]
        return cmd

    def start(self, timeout: float = 300.0) -> dict:
        """Start the deployment and wait until it serves; raise TritonServerError with the reason if not."""
        if not Path(self.repository).is_dir():
            raise TritonServerError(f"model repository {self.repository} does not exist")
        running = self.pid()
        if running is not None:
            raise TritonServerError(f"a Triton deployment is already running from {self.run_dir} (pid {running})")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config_file.unlink(missing_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_PARENT)] + [p for p in env.get("PYTHONPATH", "").split(
            os.pathsep) if p and p != str(PACKAGE_PARENT)])
        with open(self.supervisor_log, "ab") as out:
            self.process = subprocess.Popen(self.command(), env=env, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        self.pid_file.write_text(f"{self.process.pid}\n")
        try:
            state = self.wait_ready(timeout)
            # Triton's config has no response timeout: the first answer may take what the start allows
            # (a big batch at a big size under load takes minutes).
            self.check_serving(state["models"], timeout)
            return state
        except BaseException:
            self.stop()
            raise

    def ready_state(self) -> dict | None:
        state = self.state()
        if state.get("state") == "ready":
            return state
        if state.get("state") == "failed":
            raise TritonServerError(f"{state.get('error')} (log {state.get('log', self.log_file)})")
        if self.process is not None and self.process.poll() is not None:
            raise TritonServerError(f"the deployment exited with code {self.process.returncode} while starting; "
                                    f"{self.supervisor_log}:\n{tail(self.supervisor_log, 30)}")
        return None

    def served_models(self) -> list[str]:
        return self.state().get("models", [])

    def status(self) -> dict:
        """What runs; the probe then asks the port the deployment really listens on."""
        pid, state = self.pid(), self.state()
        if pid is not None:
            self.grpc_port = state.get("grpc_port", self.grpc_port)
        return {"pid": pid, "state": state.get("state"), "models": state.get("models", []),
                "grpc": f"127.0.0.1:{state.get('grpc_port')}", "threads": state.get("threads"),
                "recoveries": self.recoveries(), "error": state.get("error") if state.get("state") == "failed" else None}

    def stop(self, timeout: float = 60.0) -> bool:
        """SIGTERM the deployment (it closes the gateway and stops tritonserver); kill what is left
        after ``timeout``. True if one was running."""
        pid = self.process.pid if self.process is not None else self.pid()
        server_pid = read_pid(self.state_dir / "tritonserver.pid")
        if pid is None and server_pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        if pid is not None:
            terminate(pid, timeout, self.process)
        server_pid = read_pid(self.state_dir / "tritonserver.pid")
        if server_pid is not None:  # the deployment was killed before it could stop its server
            kill_group(server_pid)
        self.process = None
        self.pid_file.unlink(missing_ok=True)
        return True

    def __enter__(self) -> "TritonDeployment":
        if self.process is None:
            self.start()
        return self
