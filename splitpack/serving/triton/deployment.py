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

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from splitpack.serving.health import ProbeResult, probe_image, timed_probe
from splitpack.serving.triton.gateway import GatewayLimits
from splitpack.serving.triton.server import DEFAULT_GRPC_PORT, DEFAULT_RUN_DIR, TritonServerError, read_pid
from splitpack.serving.triton.supervisor import StateFile, admin_headers, read_admin_key

PACKAGE_PARENT = Path(__file__).resolve().parents[3]  # the folder holding the splitpack package


@dataclass
class TritonDeployment:
    """One deployment on 127.0.0.1:``grpc_port``. ``models`` None = every model of the repository."""

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
    @property
    def state_dir(self) -> Path:
        return Path(self.run_dir) / "triton"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "supervisor.pid"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "tritonserver.log"

    @property
    def supervisor_log(self) -> Path:
        return self.state_dir / "supervisor.log"

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def state(self) -> dict:
        return StateFile(self.state_dir / "state.json").read()

    def admin_key(self) -> str | None:
        return read_admin_key(self.state_dir / "admin.key")

    def admin_headers(self) -> dict[str, str]:
        return admin_headers(self.admin_key())

    def pid(self) -> int | None:
        """The deployment's pid if it is alive and is ours."""
        try:
            pid = int(self.pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if b"splitpack.serving.triton.supervisor" in cmdline else None

    def recoveries(self) -> list[dict]:
        events = self.state_dir / "events.jsonl"
        if not events.is_file():
            return []
        return [json.loads(line) for line in events.read_text().splitlines() if line.strip()]

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    # -- lifecycle ------------------------------------------------------------------------
    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "splitpack.serving.triton.supervisor", "--repo", str(Path(self.repository).resolve()),
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
        (self.state_dir / "state.json").unlink(missing_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_PARENT)] + [p for p in env.get("PYTHONPATH", "").split(
            os.pathsep) if p and p != str(PACKAGE_PARENT)])
        with open(self.supervisor_log, "ab") as out:
            self.process = subprocess.Popen(self.command(), env=env, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        self.pid_file.write_text(f"{self.process.pid}\n")
        try:
            state = self._wait_ready(timeout)
            self._check_serving(state["models"])
            return state
        except BaseException:
            self.stop()
            raise

    def _check_serving(self, models: list[str]) -> None:
        """Ready models can still fail every request: one real inference per model, or the reason."""
        failed = [r for r in self.probe(models) if not r.ok]
        if failed:
            raise TritonServerError("; ".join(f"model {r.model!r} does not serve: {r.detail}" for r in failed))

    def _wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            state = self.state()
            if state.get("state") == "ready":
                return state
            if state.get("state") == "failed":
                raise TritonServerError(f"{state.get('error')} (log {state.get('log', self.log_file)})")
            if self.process is not None and self.process.poll() is not None:
                raise TritonServerError(f"the deployment exited with code {self.process.returncode} while starting; "
                                        f"{self.supervisor_log}:\n{_tail(self.supervisor_log)}")
            if time.monotonic() > deadline:
                raise TritonServerError(f"not ready after {timeout:.0f} s; log {self.log_file}:\n{_tail(self.log_file)}")
            time.sleep(0.3)

    def stop(self, timeout: float = 60.0) -> bool:
        """SIGTERM the deployment (it closes the gateway and stops tritonserver); kill what is left
        after ``timeout``. True if one was running."""
        pid = self.process.pid if self.process is not None else self.pid()
        server_pid = read_pid(self.state_dir / "tritonserver.pid")
        if pid is None and server_pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not _wait_exit(pid, timeout, self.process):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                _wait_exit(pid, 10, self.process)
        server_pid = read_pid(self.state_dir / "tritonserver.pid")
        if server_pid is not None:  # the deployment was killed before it could stop its server
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(server_pid, signal.SIGKILL)
        self.process = None
        self.pid_file.unlink(missing_ok=True)
        return True

    def __enter__(self) -> "TritonDeployment":
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- health ---------------------------------------------------------------------------
    def probe(self, models: list[str] | None = None, timeout: float = 30.0) -> list[ProbeResult]:
        """One real inference (the bundled cat photo) per model, through the gateway."""
        import tritonclient.grpc as grpcclient

        from splitpack.serving.triton.client import classify

        image = probe_image()
        with grpcclient.InferenceServerClient(self.url) as client:
            def top1(model: str) -> str:
                top = classify(client, model, [image], timeout=timeout)[0].top_k
                return top[0]["label"] if top else ""

            return [timed_probe(m, lambda m=m: top1(m)) for m in models or self.state().get("models", [])]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _wait_exit(pid: int, timeout: float, child: subprocess.Popen | None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None:
            if child.poll() is not None:
                return True
        else:
            try:
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
            except (OSError, IndexError):
                return True
        time.sleep(0.2)
    return False
