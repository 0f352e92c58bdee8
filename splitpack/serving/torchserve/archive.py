"""Package split-pack models as TorchServe .mar archives and run TorchServe on loopback.

``splitpack archive`` builds ``<export-path>/<name>.mar`` with the real
``torch-model-archiver``: the weights as a state dict, the handler in
``splitpack/serving/torchserve/handler.py``, a copy of the ``splitpack`` package (so the
archive is self-contained) and a model-config.yaml whose ``handler:`` section
holds the split-pack settings. Changing the merge layer is a YAML edit.

``splitpack serve torchserve start|stop|status`` runs TorchServe from a model
store with a generated config.properties: every address on 127.0.0.1, token
auth off, no per-model pip installs, TMPDIR/TEMP, pid file and logs under a
project run folder (``.run/torchserve``). ``start`` returns once every model
has its workers READY (the management API, not /ping, which says Healthy while
a model fails to load) and fails with the model's own error when one cannot load.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import requests
import yaml

from splitpack.errors import SplitError

PACKAGE_DIR = Path(__file__).resolve().parents[2]  # the splitpack package
HANDLER_FILE = Path(__file__).resolve().parent / "handler.py"
ARCHIVED_HANDLER = "splitpack_handler.py"  # the handler module's name inside a .mar
DEFAULT_MODEL_STORE = Path("model_store")
DEFAULT_RUN_DIR = Path(".run") / "torchserve"
HANDLER_SECTION = "handler"


class TorchServeError(RuntimeError):
    """TorchServe could not be started, a model did not load, or archiving failed."""


# -- archive ----------------------------------------------------------------------------


def archive_name(model_name: str) -> str:
    """A model name TorchServe accepts (letters, digits, ``_``, ``-``): ``tv:resnet18`` -> ``tv_resnet18``."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", model_name)


def model_config_yaml(
    serving: dict,
    *,
    batch_size: int = 1,
    max_batch_delay_ms: int = 50,
    workers: int = 1,
    response_timeout_s: int = 120,
    weights_source: str = "file",
) -> dict:
    """The archive's model-config.yaml: TorchServe worker/batch settings + our ``handler:`` section."""
    return {
        "minWorkers": workers,
        "maxWorkers": workers,
        "batchSize": batch_size,
        "maxBatchDelay": max_batch_delay_ms,
        "responseTimeout": response_timeout_s,
        HANDLER_SECTION: {**serving, "weights_source": weights_source},
    }


def _stage_package(dest: Path) -> None:
    """Copy the splitpack sources (not caches, not sample assets) into ``dest/splitpack``."""
    shutil.copytree(PACKAGE_DIR, dest / "splitpack", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "assets"))


def build_archive(
    model_name: str | None = None,
    *,
    model_config: dict | None = None,
    pretrained: bool = False,
    weights: str | None = None,
    merge_layer: str | None = None,
    grid: str | tuple[int, int] = (2, 2),
    mode: str = "exact",
    topk: int = 5,
    native_resolution: bool = False,
    max_side: int = 1024,
    max_pixels: int = 50_000_000,
    batch_size: int = 1,
    max_batch_delay_ms: int = 50,
    workers: int = 1,
    response_timeout_s: int = 120,
    name: str | None = None,
    version: str = "1.0",
    export_path: str | Path = DEFAULT_MODEL_STORE,
    force: bool = False,
    validate: bool = True,
) -> Path:
    """Write ``<export_path>/<name>.mar``; returns its path.

    ``model_config``: a whole model-config.yaml (TorchServe keys + ``handler:``
    section) to archive instead of the split/batch keyword arguments; the
    operator's way to change settings by editing YAML. With ``validate`` (default) the archive's settings are loaded exactly as the
    worker will load them and run on the bundled sample image first, so a bad
    merge layer fails here, with the list of valid ones, not at serve time.
    """
    import torch
    import splitpack
    from splitpack.serving.predictor import SAMPLE_IMAGE, Predictor, ServingConfig, weights_data_config

    if model_config is not None:
        section = {k: v for k, v in (model_config.get(HANDLER_SECTION) or {}).items() if k != "weights_source"}
        if model_name and section.get("model_name", model_name) != model_name:
            raise ValueError(f"--model {model_name} differs from model_name {section['model_name']} in the config")
        config = ServingConfig.from_mapping({"model_name": model_name, **section} if model_name else section)
        server_settings = {k: v for k, v in model_config.items() if k != HANDLER_SECTION}
    else:
        if not model_name:
            raise ValueError("a model name is required (--model NAME, or model_name in the config's handler section)")
        config = ServingConfig(
            model_name, merge_layer=merge_layer, grid=grid, mode=mode, topk=topk,
            native_resolution=native_resolution, max_side=max_side, max_pixels=max_pixels,
        )
        server_settings = model_config_yaml({}, batch_size=batch_size, max_batch_delay_ms=max_batch_delay_ms,
                                            workers=workers, response_timeout_s=response_timeout_s)
        server_settings.pop(HANDLER_SECTION)
    model_name = config.model_name
    name = name or archive_name(model_name)
    export_path = Path(export_path)
    target = export_path / f"{name}.mar"
    if target.exists() and not force:
        raise TorchServeError(f"{target} exists; pass --force to overwrite it")
    if pretrained:
        model, source = splitpack.create_model(model_name, pretrained=True), "pretrained"
    elif weights:
        model, source = splitpack.create_model(model_name, weights=weights), f"file:{Path(weights).name}"
    else:
        warnings.warn(f"{model_name}: neither --pretrained nor --weights given; archiving RANDOM weights",
                      stacklevel=2)
        model, source = splitpack.create_model(model_name), "random"
    # Pin the transform the weights expect (e.g. TF-Lite mean/std for the pretrained lite models).
    if config.data_config is None:
        config.data_config = weights_data_config(model)

    with tempfile.TemporaryDirectory(prefix="splitpack-archive-") as tmp:
        stage = Path(tmp)
        weights_file = stage / "weights.pt"
        torch.save(model.state_dict(), weights_file)
        del model
        if validate:
            predictor = Predictor(config, weights=str(weights_file))
            predictor.predict([predictor.decode(SAMPLE_IMAGE.read_bytes())])
        config_file = stage / "model-config.yaml"
        handler_section = {**config.to_mapping(), "weights_source": source}
        config_file.write_text(yaml.safe_dump({**server_settings, HANDLER_SECTION: handler_section},
                                              sort_keys=False))
        extra = stage / "extra"
        _stage_package(extra)
        handler = stage / ARCHIVED_HANDLER
        shutil.copy2(_handler_source(), handler)
        export_path.mkdir(parents=True, exist_ok=True)
        cmd = [
            _tool("torch-model-archiver"), "--model-name", name, "--version", version,
            "--serialized-file", str(weights_file), "--handler", str(handler),
            "--extra-files", str(extra), "--config-file", str(config_file),
            "--export-path", str(export_path),
        ] + (["--force"] if force else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise TorchServeError(f"torch-model-archiver failed ({done.returncode}): {done.stderr or done.stdout}")
    return target


def _handler_source() -> Path:
    if not HANDLER_FILE.is_file():
        raise TorchServeError(f"handler not found at {HANDLER_FILE} (a broken splitpack install)")
    return HANDLER_FILE


def _tool(name: str) -> str:
    """A console script of this environment (the venv's bin), else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise TorchServeError(f"{name} not found: pip install torchserve==0.12.0 torch-model-archiver==0.12.0")
    return found


def read_archive_config(mar: str | Path) -> tuple[str, dict]:
    """(model name, parsed model-config.yaml) of a .mar file."""
    with zipfile.ZipFile(mar) as z:
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        config_name = manifest["model"].get("configFile")
        config = yaml.safe_load(z.read(config_name)) if config_name else {}
    return manifest["model"]["modelName"], config or {}


# -- server -------------------------------------------------------------------------------


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
    token_auth: bool = False,
    enable_model_api: bool = False,
    max_request_mb: int = 32,
    metrics_config: Path | None = None,
) -> str:
    """config.properties for a local TorchServe: loopback only, offline, prometheus metrics.

    ``metrics_config``: a metrics.yaml declaring splitpack's gauges (prometheus mode drops
    undeclared model metrics).
    """
    lines = {
        "inference_address": f"http://127.0.0.1:{ports.inference}",
        "management_address": f"http://127.0.0.1:{ports.management}",
        "metrics_address": f"http://127.0.0.1:{ports.metrics}",
        "grpc_inference_address": "127.0.0.1",
        "grpc_inference_port": ports.grpc_inference,
        "grpc_management_address": "127.0.0.1",
        "grpc_management_port": ports.grpc_management,
        "model_store": str(model_store),
        # Local use: no keys. Production: true + keys from key_file.json (docs/torchserve.md).
        "disable_token_authorization": str(not token_auth).lower(),
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
class TorchServe:
    """One TorchServe instance whose config, pid file, temp files and logs live in ``run_dir``."""

    run_dir: Path = DEFAULT_RUN_DIR
    model_store: Path = DEFAULT_MODEL_STORE
    ports: Ports = field(default_factory=Ports)

    def __post_init__(self):
        self.run_dir = Path(self.run_dir).resolve()
        self.model_store = Path(self.model_store).resolve()

    # paths and URLs
    @property
    def config_file(self) -> Path:
        return self.run_dir / "config.properties"

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def tmp_dir(self) -> Path:
        return self.run_dir / "tmp"

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.inference}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.management}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.metrics}"

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

    @property
    def pid_file(self) -> Path:
        return self.tmp_dir / ".model_server.pid"

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    # lifecycle
    def start(self, models: list[str] | None = None, *, timeout_s: float = 300, token_auth: bool = False,
              enable_model_api: bool = False, max_request_mb: int = 32, stop_on_failure: bool = True) -> dict:
        """Start TorchServe with ``models`` (archive names; None = every .mar in the store) and
        wait until every model has all its workers READY. Returns :meth:`models_status`."""
        if self.pid() is not None:
            raise TorchServeError(f"TorchServe already running from {self.run_dir} (pid {self.pid()}); stop it first")
        names = models or [read_archive_config(m)[0] for m in sorted(self.model_store.glob("*.mar"))]
        if not names:
            raise TorchServeError(f"no .mar archives in {self.model_store}; build one with `splitpack archive`")
        busy = [f"{port} ({api})" for api, port in vars(self.ports).items() if not _port_free(port)]
        if busy:
            raise TorchServeError(f"port(s) in use on 127.0.0.1: {', '.join(busy)}; stop what holds them or "
                                  "choose others (--inference-port, --management-port, ...)")
        for d in (self.run_dir, self.tmp_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True)
        for old in self.log_dir.glob("*.log"):  # failure detection reads this run's logs only
            old.unlink()
        from splitpack.measure.devices import torchserve_metrics_yaml

        metrics_file = self.run_dir / "metrics.yaml"
        metrics_file.write_text(torchserve_metrics_yaml())
        self.config_file.write_text(config_properties(self.model_store, self.ports, token_auth=token_auth,
                                                      enable_model_api=enable_model_api,
                                                      max_request_mb=max_request_mb, metrics_config=metrics_file))
        model_args = [n if n.endswith(".mar") or "=" in n else f"{n}={n}.mar" for n in names]
        cmd = [_tool("torchserve"), "--start", "--ncs", "--ts-config", str(self.config_file),
               "--model-store", str(self.model_store), "--models", *model_args]
        if not token_auth:
            cmd.append("--disable-token-auth")
        if enable_model_api:
            cmd.append("--enable-model-api")
        # Output to a file, not a pipe: the JVM inherits it and would keep a pipe open forever.
        start_log = self.log_dir / "torchserve_start.out"
        with open(start_log, "w") as out:
            code = subprocess.run(cmd, cwd=self.run_dir, env=self.env(), stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL).returncode
        if code != 0 or self.pid() is None:
            raise TorchServeError(f"torchserve --start failed ({code}): {start_log.read_text()}")
        expected = [n.split("=", 1)[0].removesuffix(".mar") for n in names]
        try:
            return self.wait_ready(expected, timeout_s=timeout_s)
        except TorchServeError:
            if stop_on_failure:
                self.stop()
            raise

    def wait_ready(self, names: list[str], *, timeout_s: float = 300) -> dict:
        """Poll the management API until each model has its minWorkers READY; fail fast with the
        model's own error when a worker dies while loading."""
        deadline = time.monotonic() + timeout_s
        status: dict = {}
        while True:
            if self.pid() is None:
                raise TorchServeError(f"TorchServe exited while starting (see {self.log_dir}):\n"
                                      + self.startup_error())
            status = self.models_status(names)
            if status and all(s["ready"] for s in status.values()):
                return status
            for name in names:
                if not status.get(name, {}).get("ready"):
                    error = self.load_error(name)
                    if error:
                        raise TorchServeError(f"model {name!r} failed to load: {error}")
            if time.monotonic() > deadline:
                raise TorchServeError(f"models not READY after {timeout_s:.0f}s: {json.dumps(status)}; "
                                      f"see {self.log_dir}")
            time.sleep(0.5)

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
                                "ready": workers.count("READY") >= max(min_workers, 1)}
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
        return errors[-1] if errors else messages[-1]

    def startup_error(self) -> str:
        """The JVM's own complaint (e.g. a port in use), else the end of ts_log.log."""
        out = self.log_dir / "torchserve_start.out"
        if out.is_file():
            lines = out.read_text(errors="replace").splitlines()
            errors = [line for line in lines if re.search(r"Exception|Error|Caused by", line)]
            if errors:
                return "\n".join(errors[:5])
        return self.last_log_lines("ts_log.log", 20)

    def last_log_lines(self, log_name: str, n: int) -> str:
        log = self.log_dir / log_name
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.is_file() else ""

    def stop(self, timeout_s: float = 60) -> bool:
        """Stop the server and its workers; True if one was running."""
        pid = self.pid()
        if pid is None:
            return False
        subprocess.run([_tool("torchserve"), "--stop", "--foreground"], cwd=self.run_dir, env=self.env(),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                       timeout=timeout_s + 10)
        deadline = time.monotonic() + timeout_s
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        return True


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are no conflict
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie is as good as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


# -- CLI --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``splitpack archive``: build a .mar with split-pack settings in its model-config.yaml."""
    parser.add_argument("--model", help="timm model name (or tv:NAME for torchvision)")
    parser.add_argument("--config", metavar="YAML",
                        help="a model-config.yaml (TorchServe keys + handler: section) to archive as is; "
                             "replaces the split and batching options below")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true",
                         help="real ImageNet weights, offline (tf_efficientnet_lite0/1/2)")
    weights.add_argument("--weights", metavar="FILE", help="state dict file (.pt/.pth) for the model")
    parser.add_argument("--merge-layer", default="", help="module name to merge packs at; empty = unsplit")
    parser.add_argument("--grid", default="2x2", help="packs as ROWSxCOLS (default 2x2)")
    parser.add_argument("--mode", choices=["exact", "seed"], default="exact")
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--native-resolution", action="store_true",
                        help="serve at the image's own size (longest side <= --max-side) instead of the model's "
                             "eval resize/crop")
    parser.add_argument("--max-side", type=int, default=1024)
    parser.add_argument("--max-pixels", type=int, default=50_000_000, help="reject images declaring more pixels")
    parser.add_argument("--batch-size", type=int, default=1, help="TorchServe batchSize")
    parser.add_argument("--max-batch-delay", type=int, default=50, metavar="MS", help="TorchServe maxBatchDelay")
    parser.add_argument("--workers", type=int, default=1, help="TorchServe min/maxWorkers")
    parser.add_argument("--response-timeout", type=int, default=120, metavar="S")
    parser.add_argument("--name", help="archive/model name (default: from --model)")
    parser.add_argument("--version", default="1.0")
    parser.add_argument("--export-path", default=str(DEFAULT_MODEL_STORE))
    parser.add_argument("--force", action="store_true", help="overwrite an existing archive")
    parser.add_argument("--no-validate", action="store_true",
                        help="skip loading the settings and running the sample image before archiving")


def run(args: argparse.Namespace) -> int:
    try:
        model_config = None
        if args.config:
            model_config = yaml.safe_load(Path(args.config).read_text()) or {}
            if not isinstance(model_config, dict):
                raise ValueError(f"{args.config}: expected a YAML mapping")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            path = build_archive(
                args.model, model_config=model_config, pretrained=args.pretrained, weights=args.weights, merge_layer=args.merge_layer,
                grid=args.grid, mode=args.mode, topk=args.topk, native_resolution=args.native_resolution,
                max_side=args.max_side, max_pixels=args.max_pixels, batch_size=args.batch_size,
                max_batch_delay_ms=args.max_batch_delay, workers=args.workers,
                response_timeout_s=args.response_timeout, name=args.name, version=args.version,
                export_path=args.export_path, force=args.force, validate=not args.no_validate,
            )
        for w in caught:
            if issubclass(w.category, UserWarning) and "splitpack" in str(w.filename):
                print(f"warning: {w.message}", file=sys.stderr)
    except (TorchServeError, ValueError, SplitError, OSError, ImportError, yaml.YAMLError) as e:
        print(f"splitpack archive: error: {e}", file=sys.stderr)
        return 2
    name, config = read_archive_config(path)
    print(f"wrote {path} (model {name!r}): {json.dumps(config[HANDLER_SECTION])}")
    return 0


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """``splitpack serve torchserve start|stop|status``."""
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--model-store", default=str(DEFAULT_MODEL_STORE))
    parser.add_argument("--models", default="all",
                        help="comma-separated archive names to load (default: every .mar in the store)")
    parser.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR),
                        help="config, pid file, temp files and logs (default .run/torchserve)")
    parser.add_argument("--inference-port", type=int, default=8080)
    parser.add_argument("--management-port", type=int, default=8081)
    parser.add_argument("--metrics-port", type=int, default=8082)
    parser.add_argument("--grpc-port", type=int, default=7070, help="gRPC inference (management = +1)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for READY workers")
    parser.add_argument("--token-auth", action="store_true", help="turn TorchServe token authorization on")
    parser.add_argument("--enable-model-api", action="store_true", help="allow registering models over HTTP")


def serve(args: argparse.Namespace) -> int:
    if args.action == "start":
        server = TorchServe(run_dir=args.run_dir, model_store=args.model_store,
                            ports=Ports(args.inference_port, args.management_port, args.metrics_port,
                                        args.grpc_port, args.grpc_port + 1))
        models = None if args.models.strip().lower() == "all" else [m.strip() for m in args.models.split(",")]
        try:
            status = server.start(models, timeout_s=args.timeout, token_auth=args.token_auth,
                                  enable_model_api=args.enable_model_api)
        except (TorchServeError, OSError) as e:
            print(f"splitpack serve torchserve: {e}", file=sys.stderr)
            return 1
        for name, s in status.items():
            print(f"{name}: {s['workers'].count('READY')} worker(s) READY -> "
                  f"POST {server.inference_url}/predictions/{name}")
        print(f"management {server.management_url}, metrics {server.metrics_url}/metrics, logs {server.log_dir}")
        if args.token_auth:
            print(f"token auth ON: send 'Authorization: Bearer <key>' with the keys in {server.run_dir}/key_file.json")
        return 0
    server = TorchServe.from_run_dir(Path(args.run_dir))
    if args.action == "stop":
        print("TorchServe stopped" if server.stop() else "TorchServe is not running")
        return 0
    pid = server.pid()
    if pid is None:
        print("TorchServe is not running")
        return 3
    print(json.dumps({"pid": pid, "models": server.models_status()}, indent=2))
    return 0
