"""A capacity plan as a running deployment: written with the backends' capacity writers, started with
``splitpack serve ... start`` (optionally inside a memory cgroup), sent images, stopped.

One class for both servers, so the fixed-cost measurement (:mod:`splitpack.capacity.fixed_costs`)
and the validation under a memory limit (:mod:`splitpack.capacity.validate`) drive TorchServe and
Triton the same way; the CLI hands :meth:`Deployment.write` to them.
"""
from __future__ import annotations

import io
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from splitpack.serving.config import deploy_settings
from splitpack.serving.net import free_ports


# How long `serve ... start` may take: load, warm-up and the first answer of a big model at a big size
# on a loaded CPU take minutes.
START_TIMEOUT_S = 1800
MIN_REQUEST_TIMEOUT_S = 600.0


def request_timeout(server: str, settings: dict | None) -> float:
    """How long a client waits for an answer: the batch ahead of its request and its own, each allowed the
    deployment's response timeout (a big batch at a big size on a loaded CPU takes many minutes), at least
    :data:`MIN_REQUEST_TIMEOUT_S`. A server with no response timeout (Triton) gets what its start may take."""
    response_s = deploy_settings(server, {k: v for k, v in (settings or {}).items()
                                          if k == "response_timeout_s"}).get("response_timeout_s")
    if response_s is None:
        return float(START_TIMEOUT_S)
    return max(MIN_REQUEST_TIMEOUT_S, 2 * float(response_s) + 10)


class DeploymentError(RuntimeError):
    pass


def image_at(size: int) -> bytes:
    """The bundled sample photo resized to ``size`` x ``size``, as a JPEG: an image at the planned size."""
    from PIL import Image

    from splitpack.serving.predictor import SAMPLE_IMAGE

    out = io.BytesIO()
    Image.open(SAMPLE_IMAGE).convert("RGB").resize((size, size), Image.BICUBIC).save(out, "JPEG", quality=90)
    return out.getvalue()


@dataclass
class Deployment:
    server: str  # torchserve | triton
    directory: Path  # model store (TorchServe) or model repository (Triton)
    run_dir: Path
    name: str
    ports: list[int] = field(default_factory=lambda: free_ports(5))

    @classmethod
    def write(cls, server: str, plan: dict, root: Path, settings: dict | None = None, name: str = "planned",
              **weights) -> "Deployment":
        """Write the plan's configs for ``server`` under ``root`` (exactly what --write-* writes);
        ``weights``: the writers' pretrained / weights / allow_pickle."""
        root = Path(root)
        settings = dict(settings or {})
        if server == "torchserve":
            store = root / "model_store"
            store.mkdir(parents=True, exist_ok=True)
            from splitpack.serving.torchserve.deploy import write_torchserve

            write_torchserve(plan, store / f"{name}.mar", settings, **weights)
            return cls(server, store, root / "run", name)
        if server == "triton":
            repo = root / "triton_repo"
            repo.mkdir(parents=True, exist_ok=True)
            from splitpack.serving.triton.deploy import write_triton

            write_triton(plan, repo, settings, name=name, **weights)
            return cls(server, repo, root / "run", name)
        raise ValueError(f"server: expected torchserve or triton, got {server!r}")

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- lifecycle through the CLI, as an operator runs it ----------------------------------------
    def start_command(self, timeout_s: float = START_TIMEOUT_S) -> list[str]:
        cmd = [sys.executable, "-m", "splitpack.cli", "serve", self.server, "start", "--run-dir", str(self.run_dir),
               "--timeout", str(timeout_s)]
        if self.server == "torchserve":
            inference, management, metrics, grpc, _ = self.ports
            return cmd + ["--model-store", str(self.directory), "--inference-port", str(inference),
                          "--management-port", str(management), "--metrics-port", str(metrics),
                          "--grpc-port", str(grpc)]
        return cmd + ["--repo", str(self.directory), "--grpc-port", str(self.ports[0])]

    def start(self, preexec_fn: Callable[[], None] | None = None,
              timeout_s: float = START_TIMEOUT_S) -> subprocess.CompletedProcess:
        """``splitpack serve SERVER start``; ``preexec_fn`` runs in the child first (joining a cgroup:
        the servers it starts inherit it). Raises DeploymentError with its output when it fails."""
        done = subprocess.run(self.start_command(timeout_s), capture_output=True, text=True, preexec_fn=preexec_fn,
                              stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise DeploymentError(f"`splitpack serve {self.server} start` failed ({done.returncode}): "
                                  f"{(done.stderr or done.stdout).strip()[-2000:]}")
        return done

    def stop(self, timeout_s: float = 180) -> None:
        """What ``splitpack serve SERVER stop`` runs, in this process (a CLI process would import torch
        first: seconds for nothing)."""
        self._handle().stop(timeout_s)

    def root_pid(self) -> int:
        pid = self._handle().pid()
        if pid is None:
            raise DeploymentError(f"{self.server} is not running from {self.run_dir}")
        return pid

    def _handle(self):
        if self.server == "torchserve":
            from splitpack.serving.torchserve.server import TorchServe

            return TorchServe.from_run_dir(self.run_dir)
        from splitpack.serving.triton.deployment import TritonDeployment

        return TritonDeployment(self.directory, grpc_port=self.ports[0], run_dir=self.run_dir)

    # -- requests ---------------------------------------------------------------------------------
    def request_timeout(self, settings: dict | None) -> float:
        """How long a client of this deployment waits for an answer (:func:`request_timeout`)."""
        return request_timeout(self.server, settings)

    def client(self, timeout_s: float) -> Callable[[bytes], None]:
        """A function that sends one image and returns when it is answered; raises on any failure."""
        if self.server == "torchserve":
            import requests

            ts = self._handle()
            url = f"{ts.inference_url}/predictions/{self.name}"
            headers = {"Content-Type": "application/octet-stream", **ts.headers("inference")}
            session = requests.Session()

            def send(image: bytes) -> None:
                r = session.post(url, data=image, headers=headers, timeout=timeout_s)
                if r.status_code != 200:
                    raise DeploymentError(f"HTTP {r.status_code}: {r.text[:200]}")
            return send

        import tritonclient.grpc as grpcclient

        from splitpack.serving.triton.client import classify

        client = grpcclient.InferenceServerClient(f"127.0.0.1:{self.ports[0]}")

        def send(image: bytes) -> None:
            classify(client, self.name, [image], timeout=timeout_s)
        return send

    image_at = staticmethod(image_at)

    def infer_once(self, size: int, timeout_s: float = 600) -> None:
        self.client(timeout_s)(image_at(size))
