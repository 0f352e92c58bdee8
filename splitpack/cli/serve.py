"""Start, stop or probe a model server on 127.0.0.1: `splitpack serve torchserve|triton start|stop|status [--probe]`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from splitpack.cli import arg_type
from splitpack.cli.common import positive_int
from splitpack.serving import health
from splitpack.serving.torchserve import server as torchserve_server
from splitpack.serving.torchserve.archive import DEFAULT_MODEL_STORE
from splitpack.serving.triton import server as triton_server
from splitpack.serving.triton.deployment import TritonDeployment

SERVERS = {
    "torchserve": "TorchServe serving the .mar archives of a model store",
    "triton": "Triton (from the nvidia-pytriton wheel) serving a model repository",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="server", required=True)
    for name, help_text in SERVERS.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(_run=globals()[f"serve_{name}"], _parser=p)
        globals()[f"add_{name}_arguments"](p)


def run(args: argparse.Namespace) -> int:
    return args._run(args)


# --- shared ------------------------------------------------------------------------------------

def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--probe", action="store_true",
                        help="status: run one real inference per model; exit 0 healthy, 1 a model failed, "
                             "3 not running (a Kubernetes exec probe)")
    parser.add_argument("--json", action="store_true", help="status: print the result as JSON on stdout")
    parser.add_argument("--threads", type=arg_type(positive_int, "threads"), default=None,
                        help="start: torch threads per worker/instance (default: the cores / all of them; "
                             "a model's own `threads` setting wins)")


def report_status(running: bool, summary: dict, probe, args: argparse.Namespace) -> int:
    """``status [--probe]``: print what runs (and the probe per model); the exit code probes read."""
    if not running:
        error = summary.get("error")
        print(json.dumps({"running": False, "error": error}) if args.json else
              "not running" + (f" (last start failed: {error})" if error else ""))
        return health.NOT_RUNNING
    results = probe() if args.probe else []
    if args.json:
        print(json.dumps(summary | {"running": True, "probe": [r.as_dict() for r in results]}, indent=2))
    else:
        print(json.dumps(summary, indent=2))
        for result in results:
            print(result.line())
    return health.exit_code(results) if args.probe else health.HEALTHY


# --- TorchServe ----------------------------------------------------------------------------

def add_torchserve_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--model-store", default=str(DEFAULT_MODEL_STORE))
    parser.add_argument("--models", default="all",
                        help="comma-separated archive names to load (default: every .mar in the store)")
    parser.add_argument("--run-dir", default=str(torchserve_server.DEFAULT_RUN_DIR),
                        help="config, pid file, temp files and logs (default .run/torchserve)")
    parser.add_argument("--bind", default=torchserve_server.LOOPBACK,
                        help="address every API listens on (default 127.0.0.1; others need token auth)")
    parser.add_argument("--inference-port", type=int, default=8080)
    parser.add_argument("--management-port", type=int, default=8081)
    parser.add_argument("--metrics-port", type=int, default=8082)
    parser.add_argument("--grpc-port", type=int, default=7070, help="gRPC inference (management = +1)")
    parser.add_argument("--max-request-mb", type=arg_type(positive_int, "max request MB"), default=32,
                        help="largest request body in MiB (larger: HTTP 413 before it is read; default 32)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for READY workers")
    parser.add_argument("--no-token-auth", dest="token_auth", action="store_false",
                        help="turn TorchServe token authorization OFF (refused unless --bind is loopback)")
    parser.add_argument("--enable-model-api", action="store_true", help="allow registering models over HTTP")


def serve_torchserve(args: argparse.Namespace) -> int:
    if args.action == "start":
        if not Path(args.model_store).is_dir():
            raise FileNotFoundError(f"model store {args.model_store} does not exist; `splitpack archive` writes one")
        ports = torchserve_server.Ports(args.inference_port, args.management_port, args.metrics_port,
                                        args.grpc_port, args.grpc_port + 1)
        server = torchserve_server.TorchServe(run_dir=args.run_dir, model_store=args.model_store, ports=ports)
        models = None if args.models.strip().lower() == "all" else [m.strip() for m in args.models.split(",")]
        status = server.start(models, timeout_s=args.timeout, token_auth=args.token_auth, bind=args.bind,
                              threads=args.threads, max_request_mb=args.max_request_mb,
                              enable_model_api=args.enable_model_api)
        for name, s in status.items():
            print(f"{name}: {s['workers'].count('READY')} worker(s) READY, {server.threads} thread(s) each -> "
                  f"POST {server.inference_url}/predictions/{name}")
        print(f"management {server.management_url}, metrics {server.metrics_url}/metrics, logs {server.log_dir}")
        if args.token_auth:
            print(f"token auth ON: send 'Authorization: Bearer <key>' with the keys in {server.run_dir}/key_file.json")
        return 0
    server = torchserve_server.TorchServe.from_run_dir(Path(args.run_dir))
    if args.action == "stop":
        print("TorchServe stopped" if server.stop() else "TorchServe is not running")
        return 0
    pid = server.pid()
    return report_status(pid is not None, {"pid": pid, "models": server.models_status() if pid else {}},
                         server.probe, args)


# --- Triton ---------------------------------------------------------------------------------

def add_triton_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--repo", type=Path, default=Path("triton_repo"), help="model repository (default: triton_repo)")
    parser.add_argument("--grpc-port", type=int, default=triton_server.DEFAULT_GRPC_PORT,
                        help="gRPC port on 127.0.0.1, served by the gateway (default: 8001)")
    parser.add_argument("--http-port", type=int, default=0,
                        help="Triton's own HTTP port on 127.0.0.1 (default: 0 = off; it bypasses the request limit)")
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus metrics port on 127.0.0.1 (default: 0 = off)")
    parser.add_argument("--model", action="append", dest="models", metavar="NAME",
                        help="load only this model (repeatable). Default: every model of the repository")
    parser.add_argument("--run-dir", type=Path, default=triton_server.DEFAULT_RUN_DIR,
                        help="folder for the backends copy, pid file, admin key and logs (default: .run)")
    parser.add_argument("--max-request-mb", type=arg_type(positive_int, "max request MB"), default=32,
                        help="largest gRPC request in MiB, refused by the gateway before it is read (default 32)")
    parser.add_argument("--open-model-control", action="store_true",
                        help="let any client load/unload models (and upload model code): no admin key")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for readiness / exit")
    parser.add_argument("--log-verbose", type=int, default=0)


def serve_triton(args: argparse.Namespace) -> int:
    deployment = TritonDeployment(args.repo, grpc_port=args.grpc_port, run_dir=args.run_dir, models=args.models,
                                  threads=args.threads, max_request_bytes=args.max_request_mb << 20,
                                  open_model_control=args.open_model_control, http_port=args.http_port or None,
                                  metrics_port=args.metrics_port or None, log_verbose=args.log_verbose)
    pid = deployment.pid()
    if args.action == "status":
        state = deployment.state()
        summary = {"pid": pid, "state": state.get("state"), "models": state.get("models", []),
                   "grpc": f"127.0.0.1:{state.get('grpc_port')}", "threads": state.get("threads"),
                   "recoveries": deployment.recoveries(),
                   "error": state.get("error") if state.get("state") == "failed" else None}
        if pid is not None:  # probe the port the deployment really listens on
            deployment.grpc_port = state.get("grpc_port", args.grpc_port)
        return report_status(pid is not None, summary, deployment.probe, args)
    if args.action == "stop":
        print(f"Triton deployment stopped (pid {pid})" if deployment.stop(args.timeout) else "Triton is not running")
        return 0
    if not Path(args.repo).is_dir():
        raise FileNotFoundError(f"model repository {args.repo} does not exist; `splitpack triton-repo` writes one")
    state = deployment.start(args.timeout)
    control = "open to any client" if args.open_model_control else \
        f"restricted to the key in {deployment.state_dir / 'admin.key'}"
    print(f"Triton ready: gRPC {deployment.url} (requests <= {args.max_request_mb} MiB), models "
          f"{', '.join(state['models'])}, {state['threads']} thread(s) per instance; model control {control}; "
          f"pid {state['pid']}, log {deployment.log_file}")
    return 0
