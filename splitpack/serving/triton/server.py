"""Run the Triton Inference Server bundled in the ``nvidia-pytriton`` wheel on loopback.

PyPI has no other tritonserver build, so this module finds the binary, the
python backend and the python-backend stubs inside the installed wheel, copies
the backend plus the stub for the running Python next to each other in a
project folder (the wheel keeps them apart and we never edit the venv), and
starts the server with the environment the stub needs to embed this Python.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from splitpack.errors import ServerError
from splitpack.serving.process import read_pid as read_process_pid, terminate
from splitpack.serving.backend import Server, in_run_dir
from splitpack.serving.health import ProbeResult, probe_image, timed_probe

PYTRITON_REQUIREMENT = "nvidia-pytriton==0.7.0"
DEFAULT_GRPC_PORT = 8001
DEFAULT_RUN_DIR = Path(".run")
PROBE_TIMEOUT_S = 30.0  # `status --probe`'s wait for an answer (an exec liveness probe's own limit is the operator's)
SERVER_COMMAND = "tritonserver"


class TritonServerError(ServerError):
    """The server could not be found, started, or stopped."""


@dataclass(frozen=True)
class TritonInstall:
    """Where the pieces of the bundled server live inside the installed wheel."""

    server: Path          # bin/tritonserver
    python_backend: Path  # backends/python (libtriton_python.so, triton_python_backend_utils.py)
    stub: Path            # python_backend_stubs/<X.Y>/triton_python_backend_stub
    libs: Path            # the wheel's vendored shared libraries (the stub's RPATH is relative)


def locate_triton() -> TritonInstall:
    """Find tritonserver, the python backend and this Python's stub in the pytriton wheel."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError(f"tritonserver not found: install {PYTRITON_REQUIREMENT}")
    package_dir = Path(list(spec.submodule_search_locations)[0])
    root = package_dir / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stubs = root / "python_backend_stubs"
    install = TritonInstall(
        server=root / "bin" / "tritonserver",
        python_backend=root / "backends" / "python",
        stub=stubs / version / "triton_python_backend_stub",
        libs=package_dir.parent / "nvidia_pytriton.libs",
    )
    if not install.server.is_file() or not (install.python_backend / "libtriton_python.so").is_file():
        raise TritonServerError(f"{root} has no tritonserver/python backend: reinstall {PYTRITON_REQUIREMENT}")
    if not install.stub.is_file():
        available = sorted(p.name for p in stubs.iterdir()) if stubs.is_dir() else []
        raise TritonServerError(f"no python-backend stub for Python {version} in {stubs} (has: {available})")
    return install


def prepare_backends(dest: Path, install: TritonInstall | None = None) -> Path:
    """Copy the python backend and the stub into ``dest/python``; return ``dest``.

    The backend looks for ``triton_python_backend_stub`` next to ``libtriton_python.so``,
    so the two must share a folder. Files are copied only when missing or changed.
    """
    install = install or locate_triton()
    target = Path(dest) / "python"
    target.mkdir(parents=True, exist_ok=True)
    sources = [p for p in install.python_backend.iterdir() if p.is_file()] + [install.stub]
    for source in sources:
        copy = target / source.name
        if not copy.exists() or copy.stat().st_size != source.stat().st_size or \
                copy.stat().st_mtime < source.stat().st_mtime:
            shutil.copy2(source, copy)
    return Path(dest)


def server_env(install: TritonInstall | None = None, base: dict | None = None) -> dict[str, str]:
    """Environment in which the stub embeds this very Python with this venv's packages.

    - PATH: the stub picks its environment from the first ``python3`` on PATH.
    - LD_LIBRARY_PATH: this Python's libpython (same version as the stub links), and the
      wheel's vendored libraries, which the copied stub no longer finds through its RPATH.
    - PYTHONPATH: the folder holding ``splitpack`` so model.py can import it uninstalled.
    """
    install = install or locate_triton()
    env = dict(os.environ if base is None else base)

    def prepend(key: str, *paths: str) -> None:
        old = [p for p in env.get(key, "").split(os.pathsep) if p]
        env[key] = os.pathsep.join(list(paths) + [p for p in old if p not in paths])

    prepend("PATH", str(Path(sys.executable).parent))
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    prepend("LD_LIBRARY_PATH", *[p for p in (libdir, str(install.libs)) if p])
    prepend("PYTHONPATH", str(Path(__file__).resolve().parents[3]))
    return env


class TritonProcess(Server):
    """What a bare tritonserver and a whole deployment share: the run folder ``<run_dir>/triton``, the
    server's log, the gRPC url and the probe through it."""

    error = TritonServerError
    run_dir: Path
    grpc_port: int

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    state_dir = in_run_dir("triton")
    log_file = in_run_dir("triton/tritonserver.log")

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def served_models(self) -> list[str]:
        """The models a probe without names asks."""
        return []

    def probe(self, models: list[str] | None = None, timeout: float | None = None) -> list[ProbeResult]:
        """One real inference (the bundled cat photo) per model. ``timeout``: per answer (None:
        :data:`PROBE_TIMEOUT_S`, a liveness probe's wait; a start waits as long as its own timeout)."""
        timeout = timeout or PROBE_TIMEOUT_S
        import tritonclient.grpc as grpcclient

        from splitpack.serving.triton.client import classify

        image = probe_image()
        with grpcclient.InferenceServerClient(self.url) as client:
            def top1(model: str) -> str:
                top = classify(client, model, [image], timeout=timeout)[0].top_k
                return top[0]["label"] if top else ""

            return [timed_probe(m, lambda m=m: top1(m)) for m in models or self.served_models()]


@dataclass
class TritonServer(TritonProcess):
    """One tritonserver process bound to 127.0.0.1.

    ``http_port``/``metrics_port`` of ``None`` turn those endpoints off. With ``models``
    given, the server runs in explicit model-control mode and loads only those at start
    (others can be loaded later through the client's ``load_model``).
    """

    pid_command = SERVER_COMMAND

    repository: Path
    grpc_port: int = DEFAULT_GRPC_PORT
    http_port: int | None = None
    metrics_port: int | None = None
    run_dir: Path = DEFAULT_RUN_DIR
    models: list[str] | None = None
    log_verbose: int = 0
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = field(default=None, init=False, repr=False)

    pid_file = in_run_dir("triton/tritonserver.pid")
    config_file = in_run_dir("triton/tritonserver.args")  # its command line: tritonserver takes flags

    def command(self, install: TritonInstall, backends: Path) -> list[str]:
        cmd = [
            str(install.server),
            f"--model-repository={Path(self.repository).resolve()}",
            f"--backend-directory={backends.resolve()}",
            "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
            f"--log-verbose={self.log_verbose}",
        ]
        cmd += (["--http-address=127.0.0.1", f"--http-port={self.http_port}"]
                if self.http_port else ["--allow-http=false"])
        cmd += (["--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}"]
                if self.metrics_port else ["--allow-metrics=false"])
        if self.models is not None:
            cmd += ["--model-control-mode=explicit"] + [f"--load-model={m}" for m in self.models]
        return cmd + list(self.extra_args)

    def start(self, timeout: float = 180.0) -> "TritonServer":
        """Start the server in its own session and wait until it (and its models) are ready."""
        if not Path(self.repository).is_dir():
            raise TritonServerError(f"model repository {self.repository} does not exist")
        running = self.pid()
        if running is not None:
            raise TritonServerError(f"tritonserver already running (pid {running}, {self.pid_file})")
        install = locate_triton()
        backends = prepare_backends(Path(self.run_dir) / "triton_backends", install)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        command = self.command(install, backends)
        self.config_file.write_text(shlex.join(command) + "\n")
        with open(self.log_file, "wb") as log:
            self.process = subprocess.Popen(command, env=server_env(install), stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid_file.write_text(f"{self.process.pid}\n")
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def ready_state(self) -> dict | None:
        import tritonclient.grpc as grpcclient

        if self.process is not None and self.process.poll() is not None:
            raise TritonServerError(f"tritonserver exited with code {self.process.returncode} during start; "
                                    f"log {self.log_file}:\n{self.log_tail()}")
        with contextlib.suppress(Exception), grpcclient.InferenceServerClient(self.url) as client:
            if client.is_server_ready() and all(client.is_model_ready(m) for m in self.models or []):
                return self.status()
        return None

    def served_models(self) -> list[str]:
        return list(self.models or [])

    def status(self) -> dict:
        return {"pid": self.pid(), "grpc": self.url, "models": self.served_models()}

    def stop(self, timeout: float = 60.0) -> bool:
        """SIGTERM the server (it drains in-flight requests), SIGKILL its session (the stubs) if it hangs."""
        pid = self.process.pid if self.process is not None else self.pid()
        if pid is not None:
            terminate(pid, timeout, child=self.process)
        self.process = None
        self.pid_file.unlink(missing_ok=True)
        return pid is not None

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self


def read_pid(pid_file: Path) -> int | None:
    """The pid in ``pid_file`` if that process is alive and is a tritonserver, else None."""
    return read_process_pid(pid_file, SERVER_COMMAND)
