"""``splitpack serve torchserve start|stop|status``: the flags, the server they name, how it starts."""
from __future__ import annotations

import argparse
from pathlib import Path

from splitpack.argtypes import arg_type, positive_int
from splitpack.serving.torchserve.archive import DEFAULT_MODEL_STORE
from splitpack.serving.torchserve.server import DEFAULT_RUN_DIR, LOOPBACK, Ports, TorchServe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-store", default=str(DEFAULT_MODEL_STORE))
    parser.add_argument("--models", default="all",
                        help="comma-separated archive names to load (default: every .mar in the store)")
    parser.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR),
                        help="config, pid file, temp files and logs (default .run/torchserve)")
    parser.add_argument("--bind", default=LOOPBACK,
                        help="address every API listens on (default 127.0.0.1; others need token auth)")
    parser.add_argument("--inference-port", type=int, default=8080)
    parser.add_argument("--management-port", type=int, default=8081)
    parser.add_argument("--metrics-port", type=int, default=8082)
    parser.add_argument("--grpc-port", type=int, default=7070, help="gRPC inference (management = +1)")
    parser.add_argument("--max-request-mb", type=arg_type(positive_int, "max request MB"), default=32,
                        help="largest request body in MiB (larger: HTTP 413 before it is read; default 32)")
    parser.add_argument("--no-token-auth", dest="token_auth", action="store_false",
                        help="turn TorchServe token authorization OFF (refused unless --bind is loopback)")
    parser.add_argument("--enable-model-api", action="store_true", help="allow registering models over HTTP")


def server(args: argparse.Namespace):
    """start: the server the flags describe; stop/status: the one a previous start wrote into --run-dir."""
    if args.action != "start":
        return TorchServe.from_run_dir(Path(args.run_dir))
    if not Path(args.model_store).is_dir():
        raise FileNotFoundError(f"model store {args.model_store} does not exist; `splitpack archive` writes one")
    ports = Ports(args.inference_port, args.management_port, args.metrics_port, args.grpc_port, args.grpc_port + 1)
    return TorchServe(run_dir=args.run_dir, model_store=args.model_store, ports=ports)


def start(server, args: argparse.Namespace) -> list[str]:
    models = None if args.models.strip().lower() == "all" else [m.strip() for m in args.models.split(",")]
    status = server.start(models, timeout_s=args.timeout, token_auth=args.token_auth, bind=args.bind,
                          threads=args.threads, max_request_mb=args.max_request_mb,
                          enable_model_api=args.enable_model_api)
    lines = [f"{name}: {s['workers'].count('READY')} worker(s) READY, {server.threads} thread(s) each -> "
             f"POST {server.inference_url}/predictions/{name}" for name, s in status.items()]
    lines.append(f"management {server.management_url}, metrics {server.metrics_url}/metrics, logs {server.log_dir}")
    if args.token_auth:
        lines.append(f"token auth ON: send 'Authorization: Bearer <key>' with the keys in {server.run_dir}/key_file.json")
    return lines
