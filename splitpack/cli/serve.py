"""Start or stop a model server on 127.0.0.1: `splitpack serve torchserve|triton start|stop|status`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from splitpack.serving.torchserve import server as torchserve_server
from splitpack.serving.torchserve.archive import DEFAULT_MODEL_STORE
from splitpack.serving.triton import server as triton_server

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


# --- TorchServe ----------------------------------------------------------------------------

def add_torchserve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--model-store", default=str(DEFAULT_MODEL_STORE))
    parser.add_argument("--models", default="all",
                        help="comma-separated archive names to load (default: every .mar in the store)")
    parser.add_argument("--run-dir", default=str(torchserve_server.DEFAULT_RUN_DIR),
                        help="config, pid file, temp files and logs (default .run/torchserve)")
    parser.add_argument("--inference-port", type=int, default=8080)
    parser.add_argument("--management-port", type=int, default=8081)
    parser.add_argument("--metrics-port", type=int, default=8082)
    parser.add_argument("--grpc-port", type=int, default=7070, help="gRPC inference (management = +1)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for READY workers")
    parser.add_argument("--token-auth", action="store_true", help="turn TorchServe token authorization on")
    parser.add_argument("--enable-model-api", action="store_true", help="allow registering models over HTTP")


def serve_torchserve(args: argparse.Namespace) -> int:
    if args.action == "start":
        if not Path(args.model_store).is_dir():
            raise FileNotFoundError(f"model store {args.model_store} does not exist; `splitpack archive` writes one")
        ports = torchserve_server.Ports(args.inference_port, args.management_port, args.metrics_port,
                                        args.grpc_port, args.grpc_port + 1)
        server = torchserve_server.TorchServe(run_dir=args.run_dir, model_store=args.model_store, ports=ports)
        models = None if args.models.strip().lower() == "all" else [m.strip() for m in args.models.split(",")]
        status = server.start(models, timeout_s=args.timeout, token_auth=args.token_auth,
                              enable_model_api=args.enable_model_api)
        for name, s in status.items():
            print(f"{name}: {s['workers'].count('READY')} worker(s) READY -> "
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
    if pid is None:
        print("TorchServe is not running")
        return 3
    print(json.dumps({"pid": pid, "models": server.models_status()}, indent=2))
    return 0


# --- Triton ---------------------------------------------------------------------------------

def add_triton_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--repo", type=Path, default=Path("triton_repo"), help="model repository (default: triton_repo)")
    parser.add_argument("--grpc-port", type=int, default=triton_server.DEFAULT_GRPC_PORT, help="gRPC port on 127.0.0.1 (default: 8001)")
    parser.add_argument("--http-port", type=int, default=0, help="HTTP port on 127.0.0.1 (default: 0 = HTTP off)")
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus metrics port on 127.0.0.1 (default: 0 = off)")
    parser.add_argument("--model", action="append", dest="models", metavar="NAME",
                        help="load only this model (repeatable; explicit model-control mode). Default: every model")
    parser.add_argument("--run-dir", type=Path, default=triton_server.DEFAULT_RUN_DIR,
                        help="folder for the backends copy, pid file and log (default: .run)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for readiness / exit")
    parser.add_argument("--log-verbose", type=int, default=0)


def serve_triton(args: argparse.Namespace) -> int:
    server = triton_server.TritonServer(args.repo, grpc_port=args.grpc_port, http_port=args.http_port or None,
                                        metrics_port=args.metrics_port or None, run_dir=args.run_dir,
                                        models=args.models, log_verbose=args.log_verbose)
    pid = triton_server.read_pid(server.pid_file)
    if args.action == "status":
        print(f"tritonserver running, pid {pid}" if pid else "tritonserver not running")
        return 0 if pid else 3
    if args.action == "stop":
        if pid is None:
            print("tritonserver not running")
            server.pid_file.unlink(missing_ok=True)
            return 0
        server.stop(args.timeout)
        print(f"tritonserver stopped (pid {pid})")
        return 0
    if not Path(args.repo).is_dir():
        raise FileNotFoundError(f"model repository {args.repo} does not exist; `splitpack triton-repo` writes one")
    server.start(args.timeout)
    print(f"tritonserver ready: gRPC {server.url}, pid {server.process.pid}, log {server.log_file}")
    return 0
