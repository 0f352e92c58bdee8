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


def ready_settings(ready_line: str) -> dict:
    """The settings JSON of a replica's ready log line (Triton's log escapes quotes)."""
    text = ready_line[ready_line.index(" ready: ") + len(" ready: "):].replace('\\"', '"')
    return json.JSONDecoder().raw_decode(text)[0]


def served_plan(ready_line: str) -> tuple[str, str]:
    """(input size, plan) of the one resolved plan in a ready log line's JSON."""
    settings = ready_settings(ready_line)
    assert settings["plan"] == "auto" and settings["max_overhead"] == float(MAX_OVERHEAD)
    [plan] = settings["auto_plans"]
    assert plan["predicted_macs_ratio"] <= float(MAX_OVERHEAD)
    return plan["input_size"], plan["plan"]


def assert_plan_gauge(metrics_text: str, plan: str) -> None:
    lines = [m.group(0) for m in PLAN_LINE.finditer(metrics_text)]
    assert lines, metrics_text[-3000:]
    label = plan.replace(",", "+")
    assert any(label in line and "3x224x224" in line for line in lines), (label, lines)


# merge_layer auto + compile + cuda_graphs on a tiny model: what the replica did before its ready line (so before
# any request) -- the plan for its input size (within max_latency as measured on the replica's device: candidate
# plans timed at load), that plan's program recorded for batch 1 and 2, and CUDA-graph buckets up to the
# deployment's batch size (graphs are captured on GPU replicas only; these run on the CPU).
TINY = "test_efficientnet"
TINY_SIZE = 64
COMPILED_AUTO = {"merge_layer": "auto", "compile": "program", "cuda_graphs": True, "max_latency": 3.0,
                 "measure_latency": True, "data_config": {"input_size": [3, TINY_SIZE, TINY_SIZE]}}
BATCH = 4


def assert_compiled_at_load(settings: dict) -> None:
    [plan] = settings["auto_plans"]
    assert plan["input_size"] == f"3x{TINY_SIZE}x{TINY_SIZE}"
    assert settings["measure_latency"] is True and plan["measured_latency_ratio"] > 0
    [program] = [r for r in settings["compiled"] if "first_call_s" in r]  # (captured graphs would follow)
    assert program["size"] == [3, TINY_SIZE, TINY_SIZE] and program["mode"] == "program"
    assert set(program["first_call_s"]) == {"1", "2"}  # both batch sizes ran at load
    assert settings["cuda_graph_buckets"] == [1, 2, 4]  # batch_buckets(BATCH)


LITE0, TINY_NAME = "lite0_auto", "tiny_auto_compiled"  # the two models each server below serves


def ready_line(log: str, marker: str) -> str:
    """The ready line of one model's replica in a log of both: ``marker`` names it (TorchServe's worker
    thread ``W-PORT-NAME_VERSION``, Triton's model name)."""
    return next(line for line in log.splitlines() if marker in line and " ready: " in line)


@pytest.fixture(scope="module")
def torchserve(tmp_path_factory):
    """One TorchServe serving both of this file's archives (one start and stop instead of two): pretrained
    lite0 with merge_layer auto, and the tiny model with auto + compile + measure_latency."""
    from splitpack.serving.torchserve.server import Ports, TorchServe

    store = tmp_path_factory.mktemp("store")
    assert cli.main(["archive", "--model", MODEL, "--pretrained", "--name", LITE0, "--merge-layer", "auto",
                     "--max-overhead", MAX_OVERHEAD, "--out", str(store)]) == 0
    flags = ["--merge-layer", "auto", "--compile", "program", "--cuda-graphs", "--max-latency", "3",
             "--measure-latency",
             "--data-config", json.dumps(COMPILED_AUTO["data_config"])]
    assert cli.main(["archive", "--model", TINY, "--name", TINY_NAME, *flags, "--batch-size", str(BATCH),
                     "--startup-timeout-s", "300", "--out", str(store)]) == 0
    server = TorchServe(run_dir=tmp_path_factory.mktemp("ts"), model_store=store, ports=Ports(*free_ports(5)))
    try:
        server.start([LITE0, TINY_NAME], timeout_s=300)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    """One Triton serving both of this file's model directories (as :func:`torchserve`)."""
    from splitpack.serving.triton.repo import TritonModelSpec, generate_model_dir
    from splitpack.serving.triton.server import TritonServer

    repo = tmp_path_factory.mktemp("repo")
    config = ServingConfig(MODEL, merge_layer="auto", max_overhead=MAX_OVERHEAD)
    generate_model_dir(TritonModelSpec(config, {"replicas": 1, "batch_size": 2}, name=LITE0, pretrained=True), repo)
    generate_model_dir(TritonModelSpec(ServingConfig(TINY, **COMPILED_AUTO), {"replicas": 1, "batch_size": BATCH},
                                       name=TINY_NAME), repo)
    with TritonServer(repo, grpc_port=free_port(), metrics_port=free_port(), run_dir=tmp_path_factory.mktemp("run"),
                      models=[LITE0, TINY_NAME]) as server:
        yield server


@pytest.mark.slow
def test_torchserve_serves_auto_and_reports_the_plan(torchserve, cat, unsplit):
    server = torchserve
    response = requests.post(f"{server.inference_url}/predictions/{LITE0}", data=cat,
                             headers={"Content-Type": "application/octet-stream"} | server.headers("inference"),
                             timeout=120)
    assert response.status_code == 200, response.text
    served = {p["index"]: p["probability"] for p in response.json()["predictions"]}
    for index, probability in served.items():  # exact split-pack: the unsplit model's answer
        assert probability == pytest.approx(float(unsplit[index]), abs=1e-4)
    log = (server.log_dir / "model_log.log").read_text()
    size, plan = served_plan(ready_line(log, f"-{LITE0}_"))
    assert size == "3x224x224" and f"merge_layer=auto: input 3x224x224 float32 -> plan {plan}" in log
    assert_plan_gauge(requests.get(f"{server.metrics_url}/metrics", timeout=30).text, plan)


@pytest.mark.slow
def test_triton_serves_auto_and_reports_the_plan(triton, cat, unsplit):
    from splitpack.serving.triton.client import classify

    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(triton.url) as client:
        probabilities = classify(client, LITE0, [cat], probabilities=True)[0].probabilities
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{triton.metrics_port}/metrics", timeout=10).read().decode()
    assert torch.allclose(torch.tensor(probabilities, dtype=torch.float32), unsplit, atol=1e-4)
    size, plan = served_plan(ready_line(triton.log_text(), LITE0))
    assert size == "3x224x224"
    assert_plan_gauge(metrics, plan)


@pytest.mark.slow
def test_torchserve_records_an_auto_plans_program_at_load(torchserve, cat):
    server, name = torchserve, TINY_NAME
    log = (server.log_dir / "model_log.log").read_text()  # read before any request to this model is sent
    assert_compiled_at_load(ready_settings(ready_line(log, f"-{name}_")))
    [described] = requests.get(f"{server.management_url}/models/{name}", headers=server.headers(),
                               timeout=10).json()
    assert described["startupTimeout"] == 300 and described["batchSize"] == BATCH  # model-config.yaml, read
    response = requests.post(f"{server.inference_url}/predictions/{name}", data=cat,
                             headers={"Content-Type": "application/octet-stream"} | server.headers("inference"),
                             timeout=120)
    assert response.status_code == 200, response.text


@pytest.mark.slow
def test_triton_records_an_auto_plans_program_at_load(triton, cat):
    from splitpack.serving.triton.client import classify

    import tritonclient.grpc as grpcclient

    assert_compiled_at_load(ready_settings(ready_line(triton.log_text(), TINY_NAME)))  # logged before the request
    with grpcclient.InferenceServerClient(triton.url) as client:
        assert len(classify(client, TINY_NAME, [cat])[0].top_k) == 5
