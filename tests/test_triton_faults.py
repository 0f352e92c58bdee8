"""A Triton deployment under faults and attacks, against the real tritonserver on 127.0.0.1.

One deployment (module fixture) as an operator runs it by default: lite0 with exact
split-pack, 2 instances, started through TritonDeployment (the supervisor process:
gateway + explicit model control with an admin key + stub watchdog).
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import psutil
import pytest

from splitpack.serving.config import ServingConfig
from splitpack.serving.net import free_port
from splitpack.serving.predictor import SAMPLE_IMAGE
from splitpack.serving.triton.client import classify, image_input
from splitpack.serving.triton.deployment import TritonDeployment
from splitpack.serving.triton.repo import TritonModelSpec, generate_model_dir
from splitpack.serving.triton.server import TritonServerError
from conftest import process_tree_rss, under_load

MODEL = "lite0"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    config = ServingConfig("tf_efficientnet_lite0", merge_layer="blocks.2", grid="2x2")
    generate_model_dir(TritonModelSpec(config, {"replicas": 2}, name=MODEL, pretrained=True), repo)
    return repo


@pytest.fixture(scope="module")
def deployment(repo, tmp_path_factory):
    triton = TritonDeployment(repo, grpc_port=free_port(), run_dir=tmp_path_factory.mktemp("run"))
    triton.start(timeout=300)
    yield triton
    triton.stop()
    assert triton.pid() is None


def cat() -> bytes:
    return SAMPLE_IMAGE.read_bytes()


def client_for(deployment):
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(deployment.url)


def deployment_rss(deployment) -> int:
    """Resident memory of the deployment: supervisor + gateway, tritonserver, its stubs."""
    return process_tree_rss(deployment.pid())


def stubs(deployment) -> list[psutil.Process]:
    server = psutil.Process(deployment.state()["server_pid"])
    alive = []
    for child in server.children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and child.cmdline()[0].endswith("triton_python_backend_stub"):
                alive.append(child)
        except psutil.Error:
            pass
    return alive


def test_serves_with_one_thread_per_instance_by_default(deployment):
    state = deployment.state()
    assert state["state"] == "ready" and state["restricted"] is True
    expected = max(1, len(os.sched_getaffinity(0)) // 2)
    assert state["threads"] == expected
    # each instance (its own stub process) logs what took effect
    applied = re.findall(r'torch_threads\W+(\d+)\W+torch_interop_threads\W+(\d+)', deployment.log_text())
    assert applied == [(str(expected), "1")] * 2
    with client_for(deployment) as client:
        assert classify(client, MODEL, [cat()])[0].top_k[0]["index"] in range(281, 286)


def test_probe_runs_a_real_inference(deployment, capsys):
    from splitpack import cli

    [result] = deployment.probe()
    assert result.model == MODEL and result.ok and "cat" in result.detail
    status = ["serve", "triton", "status", "--probe", "--run-dir", str(deployment.run_dir)]
    assert cli.main(status) == 0  # the exit code a Kubernetes exec probe reads
    assert f"{MODEL}: ok" in capsys.readouterr().out
    assert cli.main(status[:4] + ["--run-dir", str(deployment.run_dir.parent / "elsewhere")]) == 3  # not running


def test_256_mib_request_is_refused_before_the_server_buffers_it(deployment):
    from tritonclient.utils import InferenceServerException

    before = deployment_rss(deployment)
    with client_for(deployment) as client, pytest.raises(InferenceServerException) as refused:
        client.infer(MODEL, [image_input([b"\xff" * (256 << 20)])], client_timeout=120)
    grown = deployment_rss(deployment) - before
    assert "RESOURCE_EXHAUSTED" in str(refused.value.status()) and "larger than max" in refused.value.message()
    print(f"256 MiB request: {refused.value.message()}; deployment RSS grew {grown / 2**20:.1f} MiB")
    assert grown < 100 * 2**20
    with client_for(deployment) as client:  # and the deployment still serves
        assert classify(client, MODEL, [cat()])[0].top_k


def test_uploaded_model_code_is_refused_without_the_admin_key(deployment, tmp_path):
    from tritonclient.utils import InferenceServerException

    marker = tmp_path / "uploaded-code-ran"
    model_py = f"open({str(marker)!r}, 'w').write('pwned')\nclass TritonPythonModel:\n    def execute(self, r): return []\n"
    config = json.dumps({"name": "uploaded", "backend": "python", "max_batch_size": 0,
                         "input": [{"name": "X", "data_type": "TYPE_FP32", "dims": [1]}],
                         "output": [{"name": "Y", "data_type": "TYPE_FP32", "dims": [1]}]})
    files = {"file:1/model.py": model_py.encode()}
    with client_for(deployment) as client:
        with pytest.raises(InferenceServerException, match="restricted"):
            client.load_model("uploaded", config=config, files=files)
        with pytest.raises(InferenceServerException, match="restricted"):
            client.unload_model(MODEL)
        assert not marker.exists()
        assert client.is_model_ready(MODEL)
        # The same call with the deployment's key goes through: the key is what stops it.
        client.load_model("uploaded", config=config, files=files, headers=deployment.admin_headers())
        assert marker.read_text() == "pwned"
        client.unload_model("uploaded", headers=deployment.admin_headers())


CLIENT_TIMEOUT_S = 30  # a request the server leaves unanswered this long counts as a failure


def test_killed_instance_is_replaced_under_load(deployment):
    """kill -9 of one stub while 4 clients send: the supervisor reloads the model, and good
    requests keep succeeding (the gateway retries them on the other instance)."""
    from tritonclient.utils import InferenceServerException

    image = cat()
    outcomes: list[tuple[float, bool, str]] = []

    def client_loop(stop):
        with client_for(deployment) as client:
            while not stop.is_set():
                try:
                    client.infer(MODEL, [image_input([image])], client_timeout=CLIENT_TIMEOUT_S)
                    outcomes.append((time.monotonic(), True, ""))
                except InferenceServerException as err:  # a client timeout (DEADLINE_EXCEEDED) included
                    outcomes.append((time.monotonic(), False, err.message()))

    def kill_a_stub():
        victim = stubs(deployment)[0]
        name = victim.cmdline()[-2]
        killed_at = time.monotonic()
        victim.kill()
        deadline = killed_at + 120
        while not deployment.recoveries() and time.monotonic() < deadline:
            time.sleep(0.5)
        return name, killed_at

    name, killed_at = under_load(client_loop, kill_a_stub)
    [recovery] = deployment.recoveries()
    after = [o for o in outcomes if o[0] > killed_at]
    failures = [o for o in after if not o[1]]
    timeouts = [o for o in failures if "deadline" in o[2].lower()]
    last_failure = max((o[0] for o in failures), default=killed_at)
    print(f"killed {name}: {len(failures)} failed ({len(timeouts)} unanswered after {CLIENT_TIMEOUT_S} s) / "
          f"{len(after)} requests after the kill; reloaded in {recovery['seconds']} s; "
          f"good again {last_failure - killed_at:.1f} s after the kill")
    assert not timeouts, "every request must be answered, not left to the client's timeout"
    assert recovery["ok"] and recovery["dead"] == [name]
    assert any(ok and t > last_failure for t, ok, _ in after)
    assert last_failure - killed_at <= 30
    # Triton unloads the old version (its surviving stub) once the new one serves
    deadline = time.monotonic() + 60
    while len(stubs(deployment)) != 2 and time.monotonic() < deadline:
        time.sleep(1)
    assert len(stubs(deployment)) == 2
    with client_for(deployment) as client:
        assert classify(client, MODEL, [cat()])[0].top_k


def test_broken_model_fails_start_with_the_reason(repo, tmp_path):
    broken = tmp_path / "repo"
    generate_model_dir(TritonModelSpec(ServingConfig("tf_efficientnet_lite0", merge_layer="blocks.no_such_layer"),
                                       name="broken"), broken, check=False)
    triton = TritonDeployment(broken, grpc_port=free_port(), run_dir=tmp_path / "run")
    started = time.monotonic()
    with pytest.raises(TritonServerError) as failed:
        triton.start(timeout=300)
    message = str(failed.value)
    assert "model 'broken' failed to load" in message
    assert "blocks.no_such_layer" in message and "valid merge layers" in message and "blocks.2" in message
    assert triton.pid() is None and triton.state()["state"] == "failed"
    print(f"failed start took {time.monotonic() - started:.1f} s: {message[:300]}")
