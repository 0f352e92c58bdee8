"""``merge_layer: auto`` on the real servers: TorchServe (an archive built by the CLI) and Triton (a model
directory from the generator), both serving pretrained tf_efficientnet_lite0 on 127.0.0.1.

Each server resolves the plan at load (the warm-up call at the model's input size), logs it, answers like the
unsplit model, and exports the plan as a labelled gauge (splitpack_plan_info) on its metrics endpoint.
"""
from __future__ import annotations

import json
import re
import urllib.request

import pytest
import requests
import torch

from splitpack import cli
from splitpack.serving.config import ServingConfig
from splitpack.serving.net import free_port, free_ports
from splitpack.serving.predictor import SAMPLE_IMAGE, Predictor

MODEL = "tf_efficientnet_lite0"
MAX_OVERHEAD = "1.3"
PLAN_LINE = re.compile(r'splitpack_plan_info\{[^}]*\} 1(\.0)?$', re.M)


@pytest.fixture(scope="module")
def cat() -> bytes:
    return SAMPLE_IMAGE.read_bytes()


@pytest.fixture(scope="module")
def unsplit(cat) -> torch.Tensor:
    """The unsplit model's probabilities for the cat, computed here (same weights, same transform)."""
    predictor = Predictor(ServingConfig(MODEL), weights="pretrained")
    return predictor.predict([predictor.decode(cat)])[0]


def served_plan(ready_line: str) -> tuple[str, str]:
    """(input size, plan) of the one resolved plan in a ready log line's JSON (Triton's log escapes quotes)."""
    text = ready_line[ready_line.index(" ready: ") + len(" ready: "):].replace('\\"', '"')
    settings = json.JSONDecoder().raw_decode(text)[0]
    assert settings["plan"] == "auto" and settings["max_overhead"] == float(MAX_OVERHEAD)
    [plan] = settings["auto_plans"]
    assert plan["predicted_macs_ratio"] <= float(MAX_OVERHEAD)
    return plan["input_size"], plan["plan"]


def assert_plan_gauge(metrics_text: str, plan: str) -> None:
    lines = [m.group(0) for m in PLAN_LINE.finditer(metrics_text)]
    assert lines, metrics_text[-3000:]
    label = plan.replace(",", "+")
    assert any(label in line and "3x224x224" in line for line in lines), (label, lines)


@pytest.mark.slow
def test_torchserve_serves_auto_and_reports_the_plan(tmp_path, cat, unsplit):
    from splitpack.serving.torchserve.server import Ports, TorchServe

    store = tmp_path / "store"
    assert cli.main(["archive", "--model", MODEL, "--pretrained", "--name", "lite0_auto", "--merge-layer", "auto",
                     "--max-overhead", MAX_OVERHEAD, "--out", str(store)]) == 0
    server = TorchServe(run_dir=tmp_path / "ts", model_store=store, ports=Ports(*free_ports(5)))
    try:
        server.start(["lite0_auto"], timeout_s=300)
        response = requests.post(f"{server.inference_url}/predictions/lite0_auto", data=cat,
                                 headers={"Content-Type": "application/octet-stream"} | server.headers("inference"),
                                 timeout=120)
        assert response.status_code == 200, response.text
        served = {p["index"]: p["probability"] for p in response.json()["predictions"]}
        for index, probability in served.items():  # exact split-pack: the unsplit model's answer
            assert probability == pytest.approx(float(unsplit[index]), abs=1e-4)
        log = (server.log_dir / "model_log.log").read_text()
        ready = next(line for line in log.splitlines() if "splitpack handler ready" in line)
        size, plan = served_plan(ready)
        assert size == "3x224x224" and f"merge_layer=auto: input 3x224x224 float32 -> plan {plan}" in log
        assert_plan_gauge(requests.get(f"{server.metrics_url}/metrics", timeout=30).text, plan)
    finally:
        server.stop()


@pytest.mark.slow
def test_triton_serves_auto_and_reports_the_plan(tmp_path, cat, unsplit):
    from splitpack.serving.triton.client import classify
    from splitpack.serving.triton.repo import TritonModelSpec, generate_model_dir
    from splitpack.serving.triton.server import TritonServer

    import tritonclient.grpc as grpcclient

    repo = tmp_path / "repo"
    config = ServingConfig(MODEL, merge_layer="auto", max_overhead=MAX_OVERHEAD)
    generate_model_dir(TritonModelSpec(config, {"replicas": 1, "batch_size": 2}, name="lite0_auto",
                                       pretrained=True), repo)
    metrics_port = free_port()
    with TritonServer(repo, grpc_port=free_port(), metrics_port=metrics_port, run_dir=tmp_path / "run",
                      models=["lite0_auto"]) as server:
        with grpcclient.InferenceServerClient(server.url) as client:
            probabilities = classify(client, "lite0_auto", [cat], probabilities=True)[0].probabilities
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        log = server.log_text()
    assert torch.allclose(torch.tensor(probabilities, dtype=torch.float32), unsplit, atol=1e-4)
    ready = next(line for line in log.splitlines() if "lite0_auto" in line and " ready: " in line)
    size, plan = served_plan(ready)
    assert size == "3x224x224"
    assert_plan_gauge(metrics, plan)
