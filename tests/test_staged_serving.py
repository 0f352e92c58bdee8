"""A staged plan through squeeze-excitation to the global pooling, read from each server's model config
and served by the real TorchServe and the real Triton on 127.0.0.1.

efficientnet_b0 (an SE gate in every block) with seeded random weights; the plan has three stages:
packs of the image to blocks.1.0, packs of that to blocks.3.0, packs of that reduced into the global
pooling. Both servers must answer what the unsplit model answers in this process.
"""
from __future__ import annotations

import warnings

import pytest
import requests
import torch

import splitpack
from conftest import classify_on_triton
from splitpack import cli
from splitpack.serving.config import ServingConfig
from splitpack.serving.net import free_ports
from splitpack.serving.predictor import SAMPLE_IMAGE, Predictor

pytestmark = pytest.mark.slow

MODEL = "efficientnet_b0"
PLAN, GRIDS = "blocks.1.0,blocks.3.0,global_pool", "3x3,2x2,2x2"
NAME = "b0_staged"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "b0.pt"
    torch.save(splitpack.create_model(MODEL).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def expected(weights) -> torch.Tensor:
    """The unsplit model's probabilities for the cat photo, in this process."""
    predictor = Predictor(ServingConfig(MODEL), weights=str(weights))
    return predictor.predict([predictor.decode(SAMPLE_IMAGE.read_bytes())])[0]


def _close(probabilities, expected: torch.Tensor) -> bool:
    got = torch.as_tensor(probabilities, dtype=torch.float32)
    return ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-5


def test_torchserve_serves_the_staged_plan(weights, expected, tmp_path):
    from splitpack.serving.torchserve.archive import read_archive_config
    from splitpack.serving.torchserve.server import Ports, TorchServe

    store = tmp_path / "store"
    args = ["archive", "--model", MODEL, "--weights", str(weights), "--name", NAME, "--out", str(store),
            "--merge-layer", PLAN, "--grid", GRIDS, "--topk", "1000"]
    assert cli.main(args) == 0
    _, config = read_archive_config(store / f"{NAME}.mar")
    assert config["handler"]["merge_layer"] == PLAN and config["handler"]["grid"] == GRIDS
    ts = TorchServe(run_dir=tmp_path / "run", model_store=store, ports=Ports(*free_ports(5)))
    try:
        ts.start(timeout_s=240)
        response = requests.post(f"{ts.inference_url}/predictions/{NAME}", data=SAMPLE_IMAGE.read_bytes(),
                                 headers={"Content-Type": "application/octet-stream", **ts.headers("inference")},
                                 timeout=120)
        assert response.status_code == 200, response.text
        rows = response.json()["predictions"]
        got = torch.zeros(1000)
        for row in rows:
            got[row["index"]] = row["probability"]
        assert _close(got, expected)
    finally:
        ts.stop()


def test_triton_serves_the_staged_plan(weights, expected, tmp_path):
    from splitpack.serving.triton.repo import TritonModelSpec, config_parameters, generate_model_dir, \
        read_model_config

    repo = tmp_path / "repo"
    config = ServingConfig(MODEL, merge_layer=PLAN, grid=GRIDS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        generate_model_dir(TritonModelSpec(config, name=NAME, weights=weights), repo)
    params = config_parameters(read_model_config(repo / NAME / "config.pbtxt"))
    assert params["merge_layer"] == PLAN and params["grid"] == GRIDS
    prediction = classify_on_triton(repo, NAME, SAMPLE_IMAGE.read_bytes(), tmp_path / "run")
    assert prediction.error is None
    assert _close(prediction.probabilities, expected)
