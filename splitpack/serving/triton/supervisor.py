"""The process that runs a Triton deployment: tritonserver, its gateway, and a watchdog.

``splitpack serve triton start`` starts this module as a detached process, which

1. starts tritonserver on an internal loopback port, in explicit model-control mode,
   with the model-control protocols (model-repository, shared-memory, trace, logging)
   restricted to callers that send the deployment's admin key (``admin.key`` in the
   run folder, readable by its owner only), and with the thread environment of
   :mod:`splitpack.serving.threads`;
2. opens the gateway (:mod:`splitpack.serving.triton.gateway`) on the public port;
3. watches every loaded python-backend model: when one of its instances' stub process
   is gone (killed, OOM-killed, crashed) it reloads the model through the repository
   API. Triton reloads a version in the background only when its files changed, so the
   version folder's mtime is bumped first: the surviving instances keep serving while
   the new ones load, then Triton swaps them in;
4. writes its state (starting / ready with ports and models / failed with the reason
   from tritonserver's log) to ``state.json`` for ``start`` and ``status`` to read, and
   every recovery to ``events.jsonl``;
5. on SIGTERM closes the gateway and stops tritonserver.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import secrets
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from splitpack.serving.threads import default_threads, thread_env
from splitpack.serving.triton.gateway import Gateway, GatewayLimits
from splitpack.serving.triton.server import TritonServer, TritonServerError

log = logging.getLogger("splitpack.triton.supervisor")

ADMIN_KEY_HEADER = "splitpack-admin"  # Triton checks the gRPC header triton-grpc-protocol-splitpack-admin
RESTRICTED_PROTOCOLS = ("model-repository", "shared-memory", "trace", "logging")
STUB_BINARY = "triton_python_backend_stub"
LOAD_FAILURE = re.compile(r"failed to load '([^']+)' version \d+: (.*?)\"?$")


def admin_headers(key: str | None) -> dict[str, str]:
    """gRPC headers that open the restricted protocols (none when control is open)."""
    return {f"triton-grpc-protocol-{ADMIN_KEY_HEADER}": key} if key else {}


def restricted_protocol_args(key: str | None) -> list[str]:
    if not key:
        return []
    return [f"--grpc-restricted-protocol={','.join(RESTRICTED_PROTOCOLS)}:{ADMIN_KEY_HEADER}={key}"]


def load_failures(log_text: str) -> dict[str, str]:
    """{model: reason} for every "failed to load" line of a tritonserver log (last one wins)."""
    failures = {}
    for line in log_text.splitlines():
        match = LOAD_FAILURE.search(line)
        if match:
            failures[match.group(1)] = match.group(2).replace("\\n", "\n").strip()
    return failures


# --- what runs ----------------------------------------------------------------------------

def repository_models(repo: Path) -> list[str]:
    """Model directories (those with a config.pbtxt) of a repository, sorted."""
    return sorted(p.name for p in Path(repo).iterdir() if (p / "config.pbtxt").is_file())


def instance_names(repo: Path, model: str) -> list[str]:
    """The python-backend instance names Triton gives ``model``'s instance groups: ``<group>_<i>``."""
    from splitpack.serving.triton.repo import read_model_config

    config = read_model_config(Path(repo) / model / "config.pbtxt")
    groups = config.instance_group or []
    if not groups:
        return [f"{model}_0"]
    names = []
    for g, group in enumerate(groups):
        prefix = group.name or f"{model}_{g}"
        names += [f"{prefix}_{i}" for i in range(max(1, group.count or 1))]
    return names


def live_stubs(server_pid: int) -> list[tuple[str, str, int]]:
    """(instance name, shared-memory region, pid) of every live stub process of tritonserver ``server_pid``."""
    import psutil

    stubs = []
    try:
        children = psutil.Process(server_pid).children()
    except psutil.Error:
        return stubs
    for child in children:
        try:
            cmdline = child.cmdline()
            if cmdline and cmdline[0].endswith(STUB_BINARY) and child.status() != psutil.STATUS_ZOMBIE:
                # <stub> <model.py> <shm region> <sizes...> <parent pid> <lib> <ipc handle> <instance> <runtime>
                stubs.append((cmdline[-2], cmdline[2], child.pid))
        except (psutil.Error, IndexError):
            continue
    return stubs


def stop_processes(pids: list[int]) -> None:
    """SIGKILL whichever of ``pids`` (stubs of a replaced model version) still runs."""
    import psutil

    for pid in pids:
        try:
            process = psutil.Process(pid)
            if process.status() != psutil.STATUS_ZOMBIE and process.cmdline()[0].endswith(STUB_BINARY):
                log.warning("stopping stub %d left behind by the replaced model version", pid)
                process.kill()
        except (psutil.Error, IndexError):
            continue


def remove_shm_regions(names: set[str]) -> int:
    """Unlink the python backend's /dev/shm regions of a stopped server (a killed stub's region is
    never unlinked by the backend). Returns how many were removed."""
    removed = 0
    for name in names:
        path = Path("/dev/shm") / name
        if name.startswith("triton_python_backend_shm_region_") and path.exists():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


# --- the watchdog -------------------------------------------------------------------------

@dataclass
class Recovery:
    model: str
    dead: list[str]
    seconds: float
    ok: bool
    error: str = ""


@dataclass
class Supervisor:
    """Reloads a model whose instance died; :meth:`wake` makes it look now instead of at the next tick."""

    server: TritonServer
    repo: Path
    models: list[str]
    admin_key: str | None
    interval_s: float = 1.0
    # Triton 2.51 never finishes unloading a version with a dead instance while that instance
    # had requests (the backend waits forever for the dead stub to acknowledge "finalize"), so
    # the old version's surviving stubs would stay (~0.8 GB each): stopped after this grace.
    old_stub_grace_s: float = 15.0
    events_file: Path | None = None
    recoveries: list[Recovery] = field(default_factory=list)

    def __post_init__(self):
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.recovered = threading.Condition()
        self.generation = 0
        self.expected = {m: instance_names(self.repo, m) for m in self.models}
        self.shm_regions: set[str] = set()  # every region a stub used, removed after the server stops
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)

    def start(self) -> "Supervisor":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def wake(self, reason: str = "") -> None:
        self._wake.set()

    def wait_recovered(self, generation: int, timeout: float) -> bool:
        """Block until a recovery newer than ``generation`` finished (the gateway's requests wait here)."""
        with self.recovered:
            return self.recovered.wait_for(lambda: self.generation > generation, timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.check()
            except Exception:  # noqa: BLE001 -- the watchdog must outlive any one failure
                log.exception("supervisor check failed")

    def dead_instances(self) -> dict[str, list[str]]:
        stubs = live_stubs(self.server.process.pid)
        self.shm_regions.update(region for _, region, _ in stubs)
        live = Counter(name for name, _, _ in stubs)
        dead = {m: [n for n in names if live[n] == 0] for m, names in self.expected.items()}
        return {m: names for m, names in dead.items() if names}

    def check(self) -> None:
        for model, dead in self.dead_instances().items():
            self.recover(model, dead)

    def recover(self, model: str, dead: list[str]) -> Recovery:
        log.warning("model %s: instance(s) %s have no live stub process; reloading", model, ", ".join(dead))
        start = time.monotonic()
        old = [pid for name, _, pid in live_stubs(self.server.process.pid) if name in self.expected[model]]
        try:
            self._reload(model)
            reaper = threading.Timer(self.old_stub_grace_s, stop_processes, args=(old,))
            reaper.daemon = True
            reaper.start()
            recovery = Recovery(model, dead, round(time.monotonic() - start, 2), True)
            log.warning("model %s recovered in %.1f s", model, recovery.seconds)
        except Exception as err:  # noqa: BLE001
            recovery = Recovery(model, dead, round(time.monotonic() - start, 2), False, str(err))
            log.error("model %s: reload failed after %.1f s: %s", model, recovery.seconds, err)
        self.recoveries.append(recovery)
        if self.events_file is not None:
            with open(self.events_file, "a") as f:
                f.write(json.dumps({"time": time.time(), "event": "reload", **recovery.__dict__}) + "\n")
        with self.recovered:
            self.generation += 1
            self.recovered.notify_all()
        return recovery

    def _reload(self, model: str) -> None:
        """Reload ``model`` in the background of the serving one (its version folders' mtime bumped)."""
        import tritonclient.grpc as grpcclient

        model_dir = Path(self.repo) / model
        for version in (p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()):
            os.utime(version)
        with grpcclient.InferenceServerClient(self.server.url) as client:
            client.load_model(model, headers=admin_headers(self.admin_key), client_timeout=600)


# --- the daemon ---------------------------------------------------------------------------

class StateFile:
    """state.json: what ``start`` waits for and ``status`` reports."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def write(self, **state) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "time": time.time(), **state}, indent=1))
        tmp.replace(self.path)

    def read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}


def write_admin_key(path: Path) -> str:
    key = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def read_admin_key(path: Path) -> str | None:
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def total_instances(repo: Path, models: list[str]) -> int:
    return sum(len(instance_names(repo, m)) for m in models)


def add_daemon_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--grpc-port", type=int, required=True, help="public (gateway) port on 127.0.0.1")
    parser.add_argument("--models", default="", help="comma-separated models to load (default: all)")
    parser.add_argument("--threads", type=int, default=0, help="threads per instance (0 = cores / instances)")
    parser.add_argument("--max-request-bytes", type=int, default=GatewayLimits.max_request_bytes)
    parser.add_argument("--open-model-control", action="store_true")
    parser.add_argument("--http-port", type=int, default=0)
    parser.add_argument("--metrics-port", type=int, default=0)
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300)


def run_daemon(args: argparse.Namespace) -> int:
    from splitpack.serving.net import free_port

    state_dir = Path(args.run_dir) / "triton"
    state_dir.mkdir(parents=True, exist_ok=True)
    state = StateFile(state_dir / "state.json")
    state.write(state="starting")
    models = [m for m in args.models.split(",") if m] or repository_models(args.repo)
    key = None if args.open_model_control else write_admin_key(state_dir / "admin.key")
    if args.open_model_control:
        (state_dir / "admin.key").unlink(missing_ok=True)
    try:
        threads = args.threads or default_threads(total_instances(args.repo, models))
    except Exception as err:  # noqa: BLE001 -- an unreadable config.pbtxt
        state.write(state="failed", error=f"cannot read the model configs in {args.repo}: {err}")
        return 1
    os.environ.update(thread_env(threads))
    server = TritonServer(args.repo, grpc_port=free_port(), http_port=args.http_port or None,
                          metrics_port=args.metrics_port or None, run_dir=args.run_dir, models=models,
                          log_verbose=args.log_verbose,
                          extra_args=restricted_protocol_args(key) + ["--exit-timeout-secs=10"])
    stopping = threading.Event()
    def on_signal(signum, _frame):
        log.info("signal %s: stopping", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start(args.timeout)
    except TritonServerError as err:
        failures = load_failures(server.log_text())
        reason = "; ".join(f"model {m!r} failed to load: {r}" for m, r in failures.items()) or str(err)
        state.write(state="failed", error=reason, log=str(server.log_file))
        return 1
    supervisor = Supervisor(server, args.repo, models, key, events_file=state_dir / "events.jsonl")
    try:
        gateway = Gateway(f"127.0.0.1:{args.grpc_port}", server.url,
                          GatewayLimits(max_request_bytes=args.max_request_bytes), supervisor=supervisor).start()
    except (OSError, RuntimeError) as err:
        server.stop()
        state.write(state="failed", error=f"gateway: {err}")
        return 1
    supervisor.start()
    state.write(state="ready", grpc_port=args.grpc_port, internal_port=server.grpc_port, models=models,
                threads=threads, server_pid=server.process.pid, restricted=not args.open_model_control,
                max_request_bytes=args.max_request_bytes, log=str(server.log_file))
    log.info("ready: gateway 127.0.0.1:%d -> tritonserver %s, models %s, %d thread(s) per instance",
             args.grpc_port, server.url, ",".join(models), threads)
    code = 0
    while not stopping.wait(0.5):
        if server.process.poll() is not None:
            state.write(state="failed", error=f"tritonserver exited with code {server.process.returncode}",
                        log=str(server.log_file))
            code = 1
            break
    supervisor.stop()
    gateway.stop()
    server.stop()
    remove_shm_regions(supervisor.shm_regions)
    if code == 0:
        state.write(state="stopped")
    return code


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m splitpack.serving.triton.supervisor",
                                     description=__doc__.splitlines()[0])
    add_daemon_arguments(parser)
    return run_daemon(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
