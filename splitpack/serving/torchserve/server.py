"""Run TorchServe from a model store of split-pack archives, locked down by default.

``splitpack serve torchserve start|stop|status`` runs TorchServe with a
generated config.properties: every address on 127.0.0.1 (``bind``), token
authorization ON (keys in ``<run-dir>/key_file.json``, mode 0600; turning it off
is refused unless every address is loopback), no model registration over HTTP,
no per-model pip installs, a 32 MiB request limit, and TMPDIR/TEMP, pid file and
logs under a project run folder (``.run/torchserve``). Each worker gets its share
of the cores (:mod:`splitpack.serving.threads`). ``start`` returns once every
model has its workers READY (the management API, not /ping, which says Healthy
while a model fails to load) and answers a real inference
(:mod:`splitpack.serving.health`), and fails with the model's own error when one
cannot load.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from splitpack.serving.backend import Server, in_run_dir
from splitpack.serving.extras import console_script, require
from splitpack.serving.health import ProbeResult, probe_image, timed_probe
from splitpack.serving.process import port_free, tail, wait_exit
from splitpack.serving.threads import default_threads, thread_env
from splitpack.serving.torchserve.archive import DEFAULT_MODEL_STORE, TorchServeError, read_archive_config

DEFAULT_RUN_DIR = Path(".run") / "torchserve"
LOOPBACK = "127.0.0.1"
# TorchServe's keys expire after 60 minutes by default, and every request with an expired key
# then fails until someone rotates it (POST /token with the API key): a year here, rotate on purpose.
TOKEN_EXPIRATION_MIN = 525_600
TORCHSERVE_RESPONSE_TIMEOUT_S = 120  # TorchServe 0.12's responseTimeout when model-config.yaml sets none
PROBE_MARGIN_S = 10


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def check_exposure(bind: str, token_auth: bool) -> None:
    """Refuse to serve beyond this machine without token authorization (a ValueError: a user error)."""
    if not token_auth and not is_loopback(bind):
        raise ValueError(f"refusing to bind TorchServe to {bind} without token authorization: anyone who can "
                         "reach it could scale or query models; drop --no-token-auth or bind to 127.0.0.1")


@dataclass
class Ports:
    inference: int = 8080
    management: int = 8081
    metrics: int = 8082
    grpc_inference: int = 7070
    grpc_management: int = 7071


def config_properties(
    model_store: Path,
    ports: Ports,
    *,
    bind: str = LOOPBACK,
    token_auth: bool = True,
    enable_model_api: bool = False,
    max_request_mb: int = 32,
    metrics_config: Path | None = None,
) -> str:
    """config.properties: every address on ``bind``, offline, prometheus metrics, token auth.

    ``metrics_config``: a metrics.yaml declaring splitpack's gauges (prometheus mode drops
    undeclared model metrics).
    """
    lines = {
        "inference_address": f"http://{bind}:{ports.inference}",
        "management_address": f"http://{bind}:{ports.management}",
        "metrics_address": f"http://{bind}:{ports.metrics}",
        "grpc_inference_address": bind,
        "grpc_inference_port": ports.grpc_inference,
        "grpc_management_address": bind,
        "grpc_management_port": ports.grpc_management,
        "model_store": str(model_store),
        # Keys in key_file.json (docs/operations.md); off only on loopback (check_exposure).
        "disable_token_authorization": str(not token_auth).lower(),
        "token_expiration_min": TOKEN_EXPIRATION_MIN,
        "enable_model_api": str(enable_model_api).lower(),
        "install_py_dep_per_model": "false",  # offline; the worker uses this environment
        "metrics_mode": "prometheus",
        "max_request_size": max_request_mb * 1024 * 1024,
        "max_response_size": max_request_mb * 1024 * 1024,
    }
    if metrics_config is not None:
        lines["metrics_config"] = str(metrics_config)
    return "".join(f"{k}={v}\n" for k, v in lines.items())


def _read_properties(path: Path) -> dict[str, str]:
    props = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


@dataclass
class TorchServe(Server):
    """One TorchServe instance whose config, pid file, temp files and logs live in ``run_dir``."""

    error = TorchServeError

    run_dir: Path = DEFAULT_RUN_DIR
    model_store: Path = DEFAULT_MODEL_STORE
    ports: Ports = field(default_factory=Ports)
    threads: int | None = field(default=None, init=False)  # per worker, set by start()
    expected: list[str] = field(default_factory=list, init=False)  # the models start() waits for

    def __post_init__(self):
        self.run_dir = Path(self.run_dir).resolve()
        self.model_store = Path(self.model_store).resolve()

    # paths and URLs
    config_file = in_run_dir("config.properties")
    log_dir = in_run_dir("logs")
    log_file = in_run_dir("logs/ts_log.log")
    tmp_dir = in_run_dir("tmp")  # TMPDIR: torchserve writes its pid file here
    pid_file = in_run_dir("tmp/.model_server.pid")
    inference_url = property(lambda self: self.api_url("inference"))
    management_url = property(lambda self: self.api_url("management"))
    metrics_url = property(lambda self: self.api_url("metrics"))

    def api_url(self, api: str) -> str:
        return f"http://127.0.0.1:{getattr(self.ports, api)}"

    @classmethod
    def from_run_dir(cls, run_dir: Path = DEFAULT_RUN_DIR) -> "TorchServe":
        """The instance a previous ``start`` wrote into ``run_dir`` (ports and store from its config)."""
        server = cls(run_dir=run_dir)
        if server.config_file.is_file():
            props = _read_properties(server.config_file)
            port = lambda key, default: int(props.get(key, f":{default}").rsplit(":", 1)[-1])  # noqa: E731
            server.ports = Ports(port("inference_address", 8080), port("management_address", 8081),
                                 port("metrics_address", 8082), int(props.get("grpc_inference_port", 7070)),
                                 int(props.get("grpc_management_port", 7071)))
            server.model_store = Path(props.get("model_store", server.model_store))
        return server

    def env(self) -> dict[str, str]:
        """TMPDIR (pid file) and TEMP (java.io.tmpdir, where archives unpack) in the run folder."""
        env = dict(os.environ)
        env.update(TMPDIR=str(self.tmp_dir), TEMP=str(self.tmp_dir), LOG_LOCATION=str(self.log_dir),
                   METRICS_LOCATION=str(self.log_dir))
        env.pop("TS_CONFIG_FILE", None)
        return env

    # lifecycle
    def start(self, models: list[str] | None = None, *, timeout_s: float = 300, token_auth: bool = True,
              bind: str = LOOPBACK, threads: int | None = None, enable_model_api: bool = False,
              max_request_mb: int = 32, stop_on_failure: bool = True) -> dict:
        """Start TorchServe with ``models`` (archive names; None = every .mar in the store) and
        wait until every model has all its workers READY and answers a probe. Returns
        :meth:`models_status`. ``threads``: per worker (default: the cores / all workers)."""
        check_exposure(bind, token_auth)
        if self.pid() is not None:
            raise TorchServeError(f"TorchServe already running from {self.run_dir} (pid {self.pid()}); stop it first")
        names = models or [read_archive_config(m)[0] for m in sorted(self.model_store.glob("*.mar"))]
        if not names:
            raise TorchServeError(f"no .mar archives in {self.model_store}; build one with `splitpack archive`")
        busy = [f"{port} ({api})" for api, port in vars(self.ports).items() if not port_free(port)]
        if busy:
            raise TorchServeError(f"port(s) in use on 127.0.0.1: {', '.join(busy)}; stop what holds them or "
                                  "choose others (--inference-port, --management-port, ...)")
        for d in (self.run_dir, self.tmp_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True)
        for old in self.log_dir.glob("*.log"):  # failure detection reads this run's logs only
            old.unlink()
        from splitpack.serving.torchserve.metrics import torchserve_metrics_yaml

        metrics_file = self.run_dir / "metrics.yaml"
        metrics_file.write_text(torchserve_metrics_yaml())
        self.config_file.write_text(config_properties(self.model_store, self.ports, bind=bind, token_auth=token_auth,
                                                      enable_model_api=enable_model_api,
                                                      max_request_mb=max_request_mb, metrics_config=metrics_file))
        model_args = [n if n.endswith(".mar") or "=" in n else f"{n}={n}.mar" for n in names]
        cmd = [console_script("torchserve", "torchserve"), "--start", "--ncs", "--ts-config", str(self.config_file),
               "--model-store", str(self.model_store), "--models", *model_args]
        if not token_auth:
            cmd.append("--disable-token-auth")
        if enable_model_api:
            cmd.append("--enable-model-api")
        # Output to a file, not a pipe: the JVM inherits it and would keep a pipe open forever.
        start_log = self.log_dir / "torchserve_start.out"
        self.threads = threads or default_threads(self.total_workers(names))
        with open(start_log, "w") as out:
            code = subprocess.run(cmd, cwd=self.run_dir, env=self.env() | thread_env(self.threads),
                                  stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
        if code != 0 or self.pid() is None:
            raise TorchServeError(f"torchserve --start failed ({code}): {start_log.read_text()}")
        self.expected = [n.split("=", 1)[0].removesuffix(".mar") for n in names]
        try:
            status = self.wait_ready(timeout_s)
            self.check_serving(self.expected)
            return status
        except TorchServeError:
            if stop_on_failure:
                self.stop()
            raise

    def total_workers(self, names: list[str]) -> int:
        """Worker processes the server will run for ``names`` (minWorkers of each archive)."""
        total = 0
        for name in names:
            archive = name.split("=", 1)[-1]
            mar = self.model_store / (archive if archive.endswith(".mar") else f"{archive}.mar")
            try:
                total += int(read_archive_config(mar)[1].get("minWorkers") or 1)
            except (OSError, KeyError, ValueError):
                total += 1
        return total

    def probe(self, names: list[str] | None = None, timeout: float | None = None) -> list[ProbeResult]:
        """One real inference (the bundled cat photo) per model (default: every registered model), waited
        for as long as the model's own response timeout (``timeout``: instead of it)."""
        requests = require("requests", "torchserve")
        status = self.models_status(names)
        names = list(status) if names is None else names
        image, headers = probe_image(), {"Content-Type": "application/octet-stream", **self.headers("inference")}

        def top1(name: str) -> str:
            wait = timeout or probe_timeout_s(status.get(name, {}).get("response_timeout_s"))
            r = requests.post(f"{self.inference_url}/predictions/{name}", data=image, headers=headers, timeout=wait)
            if r.status_code != 200:
                raise TorchServeError(f"HTTP {r.status_code}: {_error_message(r)}")
            predictions = r.json().get("predictions") or []
            return predictions[0]["label"] if predictions else ""

        return [timed_probe(n, lambda n=n: top1(n)) for n in names]

    def ready_state(self) -> dict | None:
        """Every expected model has its minWorkers READY; fail fast with the model's own error when a
        worker dies while loading."""
        if self.pid() is None:
            raise TorchServeError(f"TorchServe exited while starting (see {self.log_dir}):\n" + self.startup_error())
        status = self.models_status(self.expected)
        if status and all(s["ready"] for s in status.values()):
            return status
        for name in self.expected:
            if not status.get(name, {}).get("ready"):
                error = self.load_error(name)
                if error:
                    raise TorchServeError(f"model {name!r} failed to load: {error}")
        return None

    def status(self) -> dict:
        pid = self.pid()
        return {"pid": pid, "models": self.models_status() if pid else {}}

    def api_key(self, api: str = "management") -> str | None:
        """With token auth on, TorchServe writes its keys to key_file.json in the run folder."""
        key_file = self.run_dir / "key_file.json"
        try:
            return json.loads(key_file.read_text())[api]["key"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def headers(self, api: str = "management") -> dict[str, str]:
        key = self.api_key(api)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def models_status(self, names: list[str] | None = None) -> dict:
        """{name: {"workers": [statuses], "min_workers": n, "ready": bool}} from the management API."""
        requests = require("requests", "torchserve")
        try:
            headers = self.headers("management")
            if names is None:
                listing = requests.get(f"{self.management_url}/models", headers=headers, timeout=5).json()
                names = [m["modelName"] for m in listing.get("models", [])]
            status = {}
            for name in names:
                r = requests.get(f"{self.management_url}/models/{name}", headers=headers, timeout=5)
                if r.status_code != 200:
                    status[name] = {"workers": [], "min_workers": None, "ready": False}
                    continue
                desc = r.json()[0]
                workers = [w.get("status") for w in desc.get("workers", [])]
                min_workers = int(desc.get("minWorkers") or 1)
                status[name] = {"workers": workers, "min_workers": min_workers,
                                "ready": workers.count("READY") >= max(min_workers, 1),
                                "response_timeout_s": desc.get("responseTimeout")}
            return status
        except (requests.ConnectionError, requests.Timeout, ValueError):
            return {}

    def load_error(self, name: str) -> str | None:
        """The exception a worker of ``name`` died with while loading, from model_log.log."""
        log = self.log_dir / "model_log.log"
        if not log.is_file():
            return None
        worker = re.compile(rf"W-\d+-{re.escape(name)}_[^ ]*-std(out|err) MODEL_LOG - (.*)$")
        messages = [m.group(2) for m in map(worker.search, log.read_text(errors="replace").splitlines()) if m]
        if not any("Traceback" in m for m in messages):
            return None
        exception = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception)\b.*: ")
        errors = [m for m in messages if exception.match(m)]
        # a traceback still being written ends in its code lines and carets: the next poll has the exception
        return errors[-1] if errors else None

    def startup_error(self) -> str:
        """The JVM's own complaint (e.g. a port in use), else the end of ts_log.log."""
        out = self.log_dir / "torchserve_start.out"
        if out.is_file():
            lines = out.read_text(errors="replace").splitlines()
            errors = [line for line in lines if re.search(r"Exception|Error|Caused by", line)]
            if errors:
                return "\n".join(errors[:5])
        return tail(self.log_file, 20)

    def stop(self, timeout_s: float = 60) -> bool:
        """Stop the server and its workers; True if one was running."""
        pid = self.pid()
        if pid is None:
            return False
        subprocess.run([console_script("torchserve", "torchserve"), "--stop", "--foreground"], cwd=self.run_dir, env=self.env(),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                       timeout=timeout_s + 10)
        wait_exit(pid, timeout_s)
        return True


def probe_timeout_s(response_timeout_s: int | None) -> float:
    """How long a probe waits for a model's answer: as long as TorchServe itself lets the worker take
    (the deployed responseTimeout; a big batch at a big size under load can take minutes), plus the
    frontend's own time to answer. A constant would fail the start of a deployment that is fine."""
    return (response_timeout_s or TORCHSERVE_RESPONSE_TIMEOUT_S) + PROBE_MARGIN_S


def _error_message(response) -> str:
    try:
        return str(response.json().get("message", response.text))
    except ValueError:
        return response.text

