"""TorchServe under faults and attacks, against the real server on 127.0.0.1.

One server (module fixture) as an operator runs it by default: lite0 with exact
split-pack, 2 workers x batch 4, started by TorchServe.start() with its defaults
(token authorization on, one share of the cores per worker).
"""
from __future__ import annotations

import http.client
import os
import re
import time

import psutil
import pytest
import requests

from splitpack import cli
from splitpack.serving.net import free_ports
from splitpack.serving.predictor import SAMPLE_IMAGE
from splitpack.serving.torchserve.server import Ports, TorchServe, TorchServeError, probe_timeout_s
from conftest import process_tree_rss, under_load

MODEL = "lite0"
RESPONSE_TIMEOUT_S = 200  # not TorchServe's default (120): the probe must follow the deployed value
pytestmark = pytest.mark.slow


def archive(store, name: str, *extra: str) -> None:
    args = ["archive", "--model", "tf_efficientnet_lite0", "--pretrained", "--name", name,
            "--out", str(store), *extra]
    assert cli.main(args) == 0


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    archive(store, MODEL, "--merge-layer", "blocks.2", "--grid", "2x2", "--replicas", "2", "--batch-size", "4",
            "--response-timeout-s", str(RESPONSE_TIMEOUT_S))
    return store


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    ts = TorchServe(run_dir=tmp_path_factory.mktemp("run"), model_store=store, ports=Ports(*free_ports(5)))
    ts.start(timeout_s=300)
    yield ts
    ts.stop()
    assert ts.pid() is None


def predict(server, body: bytes, headers: dict | None = None, timeout: float = 120) -> requests.Response:
    headers = server.headers("inference") if headers is None else headers
    return requests.post(f"{server.inference_url}/predictions/{MODEL}", data=body, timeout=timeout,
                         headers={"Content-Type": "application/octet-stream", **headers})


def server_rss(server) -> int:
    return process_tree_rss(server.pid())


def workers(server) -> list[psutil.Process]:
    found = []
    for p in psutil.Process(server.pid()).children(recursive=True):
        try:
            if "model_service_worker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def busy_with_a_batch(worker: psutil.Process, timeout_s: float = 10) -> None:
    """Return while ``worker`` runs a batch (burning CPU), so a kill lands mid-batch: TorchServe 0.12's
    frontend answers a dead worker's batch with "Worker died.", but drops the requests it was still
    gathering into the next batch for an idle worker (docs/torchserve.md, "A worker that dies")."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and worker.cpu_percent(interval=0.05) < 50:
        pass


def test_each_worker_runs_its_share_of_the_cores(server):
    expected = max(1, len(os.sched_getaffinity(0)) // 2)
    assert server.threads == expected
    log = (server.log_dir / "model_log.log").read_text(errors="replace")
    applied = re.findall(r'"torch_threads": (\d+), "torch_interop_threads": (\d+)', log)
    assert applied == [(str(expected), "1")] * 2


def test_management_and_inference_need_the_token(server):
    for method, url in [("get", f"{server.management_url}/models"),
                        ("put", f"{server.management_url}/models/{MODEL}?min_worker=3"),
                        ("get", f"{server.inference_url}/ping")]:
        refused = getattr(requests, method)(url, timeout=10)
        assert refused.status_code == 400 and "InvalidKeyException" in refused.text, (url, refused.text)
    assert predict(server, SAMPLE_IMAGE.read_bytes(), headers={}).status_code == 400
    assert requests.get(f"{server.management_url}/models", headers=server.headers("management"),
                        timeout=10).status_code == 200
    assert predict(server, SAMPLE_IMAGE.read_bytes()).status_code == 200
    key_file = server.run_dir / "key_file.json"
    assert key_file.stat().st_mode & 0o077 == 0  # readable by the owner only
    assert server.models_status()[MODEL]["workers"] == ["READY", "READY"]  # the refused scale-up did nothing


def test_refuses_to_bind_beyond_loopback_without_token(tmp_path, store):
    ts = TorchServe(run_dir=tmp_path / "run", model_store=store, ports=Ports(*free_ports(5)))
    with pytest.raises(ValueError, match="refusing to bind TorchServe to 0.0.0.0 without token"):
        ts.start(bind="0.0.0.0", token_auth=False)
    assert ts.pid() is None and not (tmp_path / "run" / "config.properties").exists()


def test_probe_runs_a_real_inference(server, capsys):
    [result] = server.probe()
    assert result.model == MODEL and result.ok and "cat" in result.detail
    assert cli.main(["serve", "torchserve", "status", "--probe", "--run-dir", str(server.run_dir)]) == 0
    assert f"{MODEL}: ok" in capsys.readouterr().out


def test_probe_waits_as_long_as_the_deployed_response_timeout(server):
    # A first batch at a big size under load can take minutes; TorchServe lets the worker take
    # responseTimeout, so a start's probe that gives up sooner fails a deployment that is fine.
    status = server.models_status([MODEL])[MODEL]
    assert status["response_timeout_s"] == RESPONSE_TIMEOUT_S  # model-config.yaml, as TorchServe deployed it
    assert probe_timeout_s(status["response_timeout_s"]) > RESPONSE_TIMEOUT_S


def test_256_mib_request_is_refused_before_it_is_buffered(server):
    before = server_rss(server)
    connection = http.client.HTTPConnection("127.0.0.1", server.ports.inference, timeout=120)
    connection.putrequest("POST", f"/predictions/{MODEL}")
    connection.putheader("Content-Length", str(256 << 20))
    for key, value in server.headers("inference").items():
        connection.putheader(key, value)
    connection.endheaders()
    chunk, sent = b"\xff" * (1 << 20), 0
    try:
        while sent < 256 << 20:
            connection.send(chunk)
            sent += len(chunk)
    except OSError:  # the server may close the connection once it has answered
        pass
    response = connection.getresponse()
    grown = server_rss(server) - before
    print(f"256 MiB request: HTTP {response.status} after {sent >> 20} MiB sent; server RSS grew {grown / 2**20:.1f} MiB")
    assert response.status == 413
    assert grown < 100 * 2**20
    assert predict(server, SAMPLE_IMAGE.read_bytes()).status_code == 200


CLIENT_TIMEOUT_S = 30  # a request the server leaves unanswered this long counts as a failure


def test_killed_worker_is_replaced_under_load(server):
    image = SAMPLE_IMAGE.read_bytes()
    outcomes: list[tuple[float, int | str]] = []

    def client_loop(stop):
        session = requests.Session()
        headers = {"Content-Type": "application/octet-stream", **server.headers("inference")}
        while not stop.is_set():
            try:
                code: int | str = session.post(f"{server.inference_url}/predictions/{MODEL}", data=image,
                                               headers=headers, timeout=CLIENT_TIMEOUT_S).status_code
            except requests.RequestException as e:  # a timeout is a failure, never a lost client thread
                code = type(e).__name__
            outcomes.append((time.monotonic(), code))

    def kill_a_worker():
        victim = workers(server)[0]
        busy_with_a_batch(victim)
        killed_at = time.monotonic()
        victim.kill()
        deadline = killed_at + 60
        while time.monotonic() < deadline:
            time.sleep(1)
            status = server.models_status([MODEL]).get(MODEL, {})
            if status.get("ready") and len(workers(server)) == 2 and time.monotonic() - killed_at > 5:
                break
        return victim, killed_at

    victim, killed_at = under_load(client_loop, kill_a_worker)
    after = [o for o in outcomes if o[0] > killed_at]
    failures = [o for o in after if o[1] != 200]
    timeouts = [o for o in failures if isinstance(o[1], str)]
    last_failure = max((t for t, _ in failures), default=killed_at)
    print(f"killed worker {victim.pid}: {len(failures)} failed ({len(timeouts)} unanswered after "
          f"{CLIENT_TIMEOUT_S} s) / {len(after)} requests after the kill ({sorted({str(c) for _, c in failures})}); "
          f"good again {last_failure - killed_at:.1f} s after the kill")
    assert not timeouts, "every request of the dead worker's batch must be answered, not left to the client's timeout"
    assert last_failure - killed_at <= 30
    assert any(code == 200 and t > last_failure for t, code in after)
    assert server.models_status([MODEL])[MODEL]["workers"] == ["READY", "READY"]


def test_model_that_cannot_load_fails_start_and_its_requests_fast(tmp_path, capsys):
    store = tmp_path / "store"
    archive(store, "broken", "--merge-layer", "blocks.no_such_layer", "--no-check")
    ts = TorchServe(run_dir=tmp_path / "run", model_store=store, ports=Ports(*free_ports(5)))
    with pytest.raises(TorchServeError, match="blocks.no_such_layer") as failed:
        ts.start(timeout_s=300, stop_on_failure=False)
    try:
        assert "model 'broken'" in str(failed.value) and "valid merge layers" in str(failed.value)
        started = time.monotonic()
        r = requests.post(f"{ts.inference_url}/predictions/broken", data=SAMPLE_IMAGE.read_bytes(),
                          headers={"Content-Type": "application/octet-stream", **ts.headers("inference")}, timeout=60)
        elapsed = time.monotonic() - started
        print(f"request to a model that cannot load: HTTP {r.status_code} in {elapsed:.2f} s: {r.text[:200]}")
        assert r.status_code == 503 and "blocks.no_such_layer" in r.text
        assert elapsed < 5
        # a probe reports it: exit 1, the reason on its line
        assert cli.main(["serve", "torchserve", "status", "--probe", "--run-dir", str(ts.run_dir)]) == 1
        assert "broken: FAILED" in capsys.readouterr().out
    finally:
        ts.stop()
