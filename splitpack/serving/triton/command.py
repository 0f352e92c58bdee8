"""``splitpack serve triton start|stop|status``: the flags, the deployment they name, how it starts."""
from __future__ import annotations

import argparse
from pathlib import Path

from splitpack.argtypes import arg_type, positive_int
from splitpack.serving.triton.server import DEFAULT_GRPC_PORT, DEFAULT_RUN_DIR


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", type=Path, default=Path("triton_repo"), help="model repository (default: triton_repo)")
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT,
                        help="gRPC port on 127.0.0.1, served by the gateway (default: 8001)")
    parser.add_argument("--http-port", type=int, default=0,
                        help="Triton's own HTTP port on 127.0.0.1 (default: 0 = off; it bypasses the request limit)")
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus metrics port on 127.0.0.1 (default: 0 = off)")
    parser.add_argument("--model", action="append", dest="models", metavar="NAME",
                        help="load only this model (repeatable). Default: every model of the repository")
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR,
                        help="folder for the backends copy, pid file, admin key and logs (default: .run)")
    parser.add_argument("--max-request-mb", type=arg_type(positive_int, "max request MB"), default=32,
                        help="largest gRPC request in MiB, refused by the gateway before it is read (default 32)")
    parser.add_argument("--open-model-control", action="store_true",
                        help="let any client load/unload models (and upload model code): no admin key")
    parser.add_argument("--log-verbose", type=int, default=0)


def server(args: argparse.Namespace):
    from splitpack.serving.triton.deployment import TritonDeployment

    if args.action == "start" and not Path(args.repo).is_dir():
        raise FileNotFoundError(f"model repository {args.repo} does not exist; `splitpack triton-repo` writes one")
    return TritonDeployment(args.repo, grpc_port=args.grpc_port, run_dir=args.run_dir, models=args.models,
                            threads=args.threads, max_request_bytes=args.max_request_mb << 20,
                            open_model_control=args.open_model_control, http_port=args.http_port or None,
                            metrics_port=args.metrics_port or None, log_verbose=args.log_verbose)


def start(deployment, args: argparse.Namespace) -> list[str]:
    state = deployment.start(args.timeout)
    control = "open to any client" if args.open_model_control else \
        f"restricted to the key in {deployment.state_dir / 'admin.key'}"
    return [f"Triton ready: gRPC {deployment.url} (requests <= {args.max_request_mb} MiB), models "
            f"{', '.join(state['models'])}, {state['threads']} thread(s) per instance; model control {control}; "
            f"pid {state['pid']}, log {deployment.log_file}"]
