#!/usr/bin/env python
"""Load test both servers as an operator runs them, with their DEFAULT settings.

For each server (TorchServe, Triton): build the deployment with the project's own
commands (tf_efficientnet_lite0, pretrained, exact split-pack 2x2 at blocks.2;
TorchServe 2 workers x batch 4, Triton 2 instances), start it with
``splitpack serve ... start`` on 127.0.0.1, then run CLIENTS concurrent clients
sending real photos for DURATION seconds (after a WARMUP_S warm-up that is not
counted: the first batches of each replica) while one more client sends bad inputs
(empty, garbage, truncated, a decompression bomb, an over-limit body).

Then the same load, shorter, once per thread setting (``serve ... start --threads N``
for N in 1..cores) to find the best one; the default must be within 15% of it.

Checks (exit 1 if any fails): 0 failed good requests; every bad input answered
4xx (TorchServe) / INVALID_ARGUMENT (Triton); default throughput >= 85% of the best
thread setting's; p99 <= 3 x p50.

``--model-args`` deploys another model (the archive/triton-repo flags that name it and its split);
``--heaps default,kept`` runs the default-settings load once per C-heap mode (the ``heap`` model
parameter), ``--sweep none`` skips the thread sweep.

    python scripts/loadtest.py                       # both servers, 4 clients x 60 s
    python scripts/loadtest.py --servers triton --duration 20 --sweep-duration 10
    python scripts/loadtest.py --servers torchserve --sweep none --heaps default,kept \
        --model-args "--model resnet50 --data-config '{\"input_size\": [3, 1024, 1024]}' --merge-layer none"
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "tf_efficientnet_lite0"
NAME = "lite0"
SPLIT = ["--merge-layer", "blocks.2", "--grid", "2x2", "--mode", "exact"]
DEPLOYED = ["--model", MODEL, "--pretrained", *SPLIT]  # what --model-args replaces
IMAGENET_SAMPLE = Path("/work/shared/imagenet-sample")
BAD_CLIENT_PAUSE_S = 0.2
WARMUP_S = 5.0  # every client sends for this long before the measured window (first batches of each replica)


# --- inputs ---------------------------------------------------------------------------------

def good_images(limit: int = 24) -> list[bytes]:
    """Real photos of different sizes: the bundled cat plus ImageNet sample JPEGs when present."""
    from splitpack.serving.predictor import SAMPLE_IMAGE

    images = [SAMPLE_IMAGE.read_bytes()]
    if IMAGENET_SAMPLE.is_dir():
        images += [p.read_bytes() for p in sorted(IMAGENET_SAMPLE.glob("*.JPEG"))[: limit - 1]]
    return images


def bad_images(cat: bytes) -> dict[str, bytes]:
    """Inputs a server must refuse with a client error, by name."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(1000))))
    return {
        "empty": b"",
        "garbage": b"this is not an image" * 10,
        "truncated": cat[: len(cat) // 2],
        "bomb": bomb,
        "over_limit": b"\xff" * (40 << 20),  # over the 32 MiB request limit of both servers
    }


# --- servers ----------------------------------------------------------------------------------

def splitpack_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "splitpack.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"splitpack {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


class TorchServeTarget:
    name = "torchserve"

    def __init__(self, work: Path):
        from splitpack.serving.net import free_ports

        self.store, self.run_dir = work / "model_store", work / "ts_run"
        self.ports = free_ports(5)

    def prepare(self, model_args: list[str] = DEPLOYED) -> None:
        splitpack_cli("archive", *model_args, "--name", NAME, "--replicas", "2", "--batch-size", "4",
                      "--out", str(self.store), "--force")

    def start(self, threads: int | None) -> None:
        inference, management, metrics, grpc, _ = self.ports
        args = ["serve", "torchserve", "start", "--model-store", str(self.store), "--run-dir", str(self.run_dir),
                "--inference-port", str(inference), "--management-port", str(management),
                "--metrics-port", str(metrics), "--grpc-port", str(grpc)]
        splitpack_cli(*args, *(["--threads", str(threads)] if threads else []))
        from splitpack.serving.torchserve.server import TorchServe

        self.server = TorchServe.from_run_dir(self.run_dir)

    def root_pid(self) -> int | None:
        return self.server.pid()

    def stop(self) -> None:
        splitpack_cli("serve", "torchserve", "stop", "--run-dir", str(self.run_dir), check=False)

    def client(self):
        import requests

        session = requests.Session()
        session.headers.update({"Content-Type": "application/octet-stream", **self.server.headers("inference")})
        url = f"{self.server.inference_url}/predictions/{NAME}"

        def send(body: bytes) -> tuple[str, str]:
            try:
                r = session.post(url, data=body, timeout=120)
            except requests.RequestException as err:
                return "transport", str(err)[:200]
            kind = "ok" if r.status_code == 200 else ("client_error" if 400 <= r.status_code < 500 else "error")
            return kind, f"{r.status_code} {r.text[:200]}"
        return send


class TritonTarget:
    name = "triton"

    def __init__(self, work: Path):
        from splitpack.serving.net import free_port

        self.repo, self.run_dir = work / "triton_repo", work / "triton_run"
        self.port = free_port()

    def prepare(self, model_args: list[str] = DEPLOYED) -> None:
        splitpack_cli("triton-repo", *model_args, "--name", NAME, "--replicas", "2", "--out", str(self.repo))

    def start(self, threads: int | None) -> None:
        args = ["serve", "triton", "start", "--repo", str(self.repo), "--run-dir", str(self.run_dir),
                "--grpc-port", str(self.port)]
        splitpack_cli(*args, *(["--threads", str(threads)] if threads else []))

    def root_pid(self) -> int | None:
        from splitpack.serving.triton.deployment import TritonDeployment

        return TritonDeployment(self.repo, grpc_port=self.port, run_dir=self.run_dir).pid()

    def stop(self) -> None:
        splitpack_cli("serve", "triton", "stop", "--run-dir", str(self.run_dir), check=False)

    def client(self):
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        from splitpack.serving.triton.client import image_input

        triton = grpcclient.InferenceServerClient(f"127.0.0.1:{self.port}")

        def send(body: bytes, images: int = 1) -> tuple[str, str]:
            try:
                triton.infer(NAME, [image_input([body] * images)], client_timeout=120)
                return "ok", ""
            except InferenceServerException as err:
                status = str(err.status() or "")
                kind = "client_error" if status in ("StatusCode.INVALID_ARGUMENT", "StatusCode.RESOURCE_EXHAUSTED") \
                    else "error"
                return kind, f"{status} {err.message()[:200]}"
        return send


# --- load -------------------------------------------------------------------------------------

@dataclass
class Run:
    server: str
    threads: str
    clients: int
    duration_s: float
    heap: str = "default"
    good_ok: int = 0
    good_failed: int = 0
    bad_refused: int = 0
    bad_other: int = 0
    throughput_rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    load_1min: float = 0.0  # the machine's load average when the run ended (others' jobs included)
    worker_peak_rss_mib: float = 0.0  # the largest peak RSS (VmHWM) of the server's workers, at the run's end
    failures: list[str] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else 0.0


def load(target, images: list[bytes], bad: dict[str, bytes], clients: int, duration: float, threads: str,
         with_bad: bool = True, heap: str = "default") -> Run:
    """CLIENTS threads send good photos back to back for DURATION s; one more sends bad inputs."""
    run = Run(target.name, threads, clients, duration, heap)
    latencies: list[float] = []
    lock = threading.Lock()
    window: dict[str, float] = {}
    # the measured window opens when the last client finished its warm-up (the barrier's action)
    warm = threading.Barrier(clients + 1, action=lambda: window.update(
        start=time.monotonic(), deadline=time.monotonic() + duration))
    warmup_end = time.monotonic() + WARMUP_S

    def good_client(offset: int) -> None:
        send, i = target.client(), offset
        while time.monotonic() < warmup_end:  # not counted
            send(images[i % len(images)])
            i += 1
        warm.wait()
        while time.monotonic() < window["deadline"]:
            t0 = time.perf_counter()
            kind, message = send(images[i % len(images)])
            elapsed = time.perf_counter() - t0
            i += 1
            with lock:
                if kind == "ok":
                    run.good_ok += 1
                    latencies.append(elapsed)
                else:
                    run.good_failed += 1
                    run.failures.append(f"good: {message}")

    def bad_client() -> None:
        send, cases = target.client(), list(bad.items())
        i = 0
        while time.monotonic() < window["deadline"]:
            name, body = cases[i % len(cases)]
            kind, message = send(body)
            i += 1
            with lock:
                if kind == "client_error":
                    run.bad_refused += 1
                else:
                    run.bad_other += 1
                    run.failures.append(f"bad {name}: {kind} {message}")
            time.sleep(BAD_CLIENT_PAUSE_S)

    workers = [threading.Thread(target=good_client, args=(c * 7,)) for c in range(clients)]
    for w in workers:
        w.start()
    warm.wait()
    if with_bad:
        workers.append(threading.Thread(target=bad_client))
        workers[-1].start()
    for w in workers:
        w.join()
    elapsed = time.monotonic() - window["start"]
    run.duration_s = round(elapsed, 1)
    run.throughput_rps = round(run.good_ok / elapsed, 2)
    run.p50_ms = round(percentile(latencies, 0.50) * 1000, 1)
    run.p99_ms = round(percentile(latencies, 0.99) * 1000, 1)
    run.max_ms = round(max(latencies, default=0) * 1000, 1)
    run.load_1min = round(os.getloadavg()[0], 2)
    run.worker_peak_rss_mib = round(max(worker_peak_rss(target.name, target.root_pid()), default=0) / 2**20, 1)
    run.failures = run.failures[:10]
    return run


def worker_peak_rss(server: str, root_pid: int | None) -> list[int]:
    """Peak resident bytes (VmHWM) of each replica process in the tree of the server started here (not
    another deployment's on the same machine)."""
    import psutil

    from splitpack.capacity.fixed_costs import split_tree

    if root_pid is None:
        return []
    try:
        replicas, _, _ = split_tree(root_pid, server)
    except psutil.Error:  # the server is gone
        return []
    peaks = []
    for replica in replicas:
        try:
            peaks.append(peak_rss(replica["pid"]))
        except (OSError, StopIteration):  # a replica that exited since
            pass
    return peaks


def peak_rss(pid: int) -> int:
    """A process's peak resident bytes (VmHWM), from /proc."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(line.split()[1] for line in status if line.startswith("VmHWM"))) * 1024  # kB


def measure(target, threads: int | None, images, bad, clients, duration, with_bad=True, heap="default") -> Run:
    try:
        target.start(threads)
        return load(target, images, bad, clients, duration, str(threads or "default"), with_bad, heap)
    finally:
        target.stop()


def checks(default: Run, best: Run) -> list[str]:
    problems = []
    if default.good_failed:
        problems.append(f"{default.good_failed} good requests failed: {default.failures[:3]}")
    if default.bad_other:
        problems.append(f"{default.bad_other} bad inputs not answered with a client error")
    if default.throughput_rps < 0.85 * best.throughput_rps:
        problems.append(f"default {default.throughput_rps} req/s < 85% of the best ({best.threads} threads: "
                        f"{best.throughput_rps} req/s)")
    if default.p99_ms > 3 * default.p50_ms:
        problems.append(f"p99 {default.p99_ms} ms > 3 x p50 {default.p50_ms} ms")
    return problems


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def table(runs: list[Run]) -> str:
    lines = ["| server | heap | threads | clients x s | good ok | good failed | bad refused | bad other | req/s | "
             "p50 ms | p99 ms | max ms | worker peak RSS MiB | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r.server} | {r.heap} | {r.threads} | {r.clients} x {r.duration_s:.0f} | {r.good_ok} | "
                     f"{r.good_failed} "
                     f"| {r.bad_refused} | {r.bad_other} | {r.throughput_rps} | {r.p50_ms} | {r.p99_ms} | {r.max_ms} "
                     f"| {r.worker_peak_rss_mib} | {r.load_1min} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default="torchserve,triton")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--duration", type=float, default=60, help="seconds of the default-settings run")
    parser.add_argument("--sweep-duration", type=float, default=20, help="seconds per thread setting")
    parser.add_argument("--sweep", default="", help="thread settings to try (default: 1..cores; none: no sweep)")
    parser.add_argument("--model-args", metavar="FLAGS",
                        help=f"archive/triton-repo flags naming the model and its split "
                             f"(default: {shlex.join(DEPLOYED)})")
    parser.add_argument("--heaps", default="default",
                        help="C-heap modes (the heap parameter) to run the default-settings load with, "
                             "e.g. default,kept")
    parser.add_argument("--json", metavar="FILE", help="also write the runs as JSON")
    parser.add_argument("--work-dir", help="where archives, repositories and run folders go (default: a temp dir)")
    args = parser.parse_args(argv)

    cores = len(os.sched_getaffinity(0))
    sweep = [] if args.sweep == "none" else [int(t) for t in args.sweep.split(",")] if args.sweep \
        else list(range(1, cores + 1))
    model_args = shlex.split(args.model_args) if args.model_args else DEPLOYED
    images = good_images()
    bad = bad_images(images[0])
    targets = {"torchserve": TorchServeTarget, "triton": TritonTarget}
    runs: list[Run] = []
    problems: list[str] = []
    print(f"cores {cores}; load average before: {load_average()}", flush=True)
    heaps = args.heaps.split(",")
    with tempfile.TemporaryDirectory(prefix="splitpack-loadtest-", dir=args.work_dir) as work:
        for server in args.servers.split(","):
            target = targets[server](Path(work))
            for heap in heaps:
                target.prepare([*model_args, "--heap", heap])
                default = measure(target, None, images, bad, args.clients, args.duration, heap=heap)
                print(table([default]), flush=True)
                swept = [measure(target, t, images, bad, args.clients, args.sweep_duration, with_bad=False, heap=heap)
                         for t in (sweep if heap == heaps[0] else ())]  # the sweep runs with the first heap mode
                runs += [default] + swept
                best = max(swept + [default], key=lambda r: r.throughput_rps)
                problems += [f"{server} ({heap} heap): {p}" for p in checks(default, best)]
    print(f"load average after: {load_average()}")
    print(table(runs))
    if args.json:
        Path(args.json).write_text(json.dumps({"cores": cores, "runs": [asdict(r) for r in runs],
                                               "problems": problems}, indent=2))
    for p in problems:
        print(f"FAIL {p}")
    print("PASS" if not problems else f"{len(problems)} check(s) failed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
