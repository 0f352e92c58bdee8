"""TorchServe end to end: archives built by the CLI, served by a real TorchServe on 127.0.0.1.

One server (session fixture) serves pretrained tf_efficientnet_lite0 three ways:
exact split-pack (2 workers, batching), unsplit, and seed split-pack (1 worker,
batch of 4 with a long batch delay so concurrent requests land in one batch).
"""
from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from PIL import Image

from splitpack.serving.net import free_ports
from splitpack import cli
from splitpack.serving.predictor import SAMPLE_IMAGE
from splitpack.serving.torchserve.archive import read_archive_config
from splitpack.serving.torchserve.server import Ports, TorchServe, config_properties

MODEL = "tf_efficientnet_lite0"
MERGE_LAYER = "blocks.2"  # exact mode supports it (checked by `splitpack archive` itself)
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
OCTET = {"Content-Type": "application/octet-stream"}
EXACT, UNSPLIT, SEED = "lite0_exact", "lite0_unsplit", "lite0_seed"
NATIVE = "lite0_native_2x3"  # exact split-pack 2x3 at native resolution: a 16x16 image is too small


def archive(store, name: str, *extra: str) -> None:
    args = ["archive", "--model", MODEL, "--pretrained", "--name", name, "--out", str(store), *extra]
    assert cli.main(args) == 0


def png_bomb(width: int, height: int) -> bytes:
    """A few hundred bytes of PNG that declare width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(1000)))


@pytest.fixture(scope="session")
def cat() -> bytes:
    return SAMPLE_IMAGE.read_bytes()


@pytest.fixture(scope="session")
def model_store(tmp_path_factory):
    store = tmp_path_factory.mktemp("model_store")
    split = ["--merge-layer", MERGE_LAYER, "--grid", "2x2"]
    archive(store, EXACT, *split, "--mode", "exact", "--batch-size", "4", "--max-batch-delay-ms", "100",
            "--replicas", "2")
    archive(store, UNSPLIT, "--batch-size", "4", "--max-batch-delay-ms", "20")
    archive(store, SEED, *split, "--mode", "seed", "--batch-size", "4", "--max-batch-delay-ms", "300")
    archive(store, NATIVE, "--merge-layer", MERGE_LAYER, "--grid", "2x3", "--native-resolution", "--max-side", "300",
            "--batch-size", "4", "--max-batch-delay-ms", "500")
    return store


@pytest.fixture(scope="session")
def server(model_store, tmp_path_factory):
    ports = Ports(*free_ports(5))
    ts = TorchServe(run_dir=tmp_path_factory.mktemp("ts_run"), model_store=model_store, ports=ports)
    try:
        ts.start(timeout_s=240)
        yield ts
    finally:
        ts.stop()
        assert ts.pid() is None


def predict(server, model: str, body: bytes, timeout: float = 60) -> requests.Response:
    return requests.post(f"{server.inference_url}/predictions/{model}", data=body,
                         headers=OCTET | server.headers("inference"), timeout=timeout)


def probabilities(response: requests.Response) -> dict[int, float]:
    assert response.status_code == 200, response.text
    return {p["index"]: p["probability"] for p in response.json()["predictions"]}


# -- no server needed --------------------------------------------------------------------


def test_config_properties_binds_loopback_only(tmp_path):
    text = config_properties(tmp_path, Ports(1, 2, 3, 4, 5))
    props = dict(line.split("=", 1) for line in text.splitlines())
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:")
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["disable_token_authorization"] == "false"  # token auth on by default
    assert props["install_py_dep_per_model"] == "false"
    assert "disable_token_authorization=true" in config_properties(tmp_path, Ports(), token_auth=False)
    exposed = config_properties(tmp_path, Ports(1, 2, 3, 4, 5), bind="0.0.0.0")
    assert "inference_address=http://0.0.0.0:1" in exposed and "grpc_management_address=0.0.0.0" in exposed


def test_archive_refuses_unknown_merge_layer(tmp_path, capsys):
    code = cli.main(["archive", "--model", MODEL, "--merge-layer", "blocks.99", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown merge layer 'blocks.99'" in err and "blocks.2" in err
    assert not list(tmp_path.glob("*.mar"))


# -- real TorchServe -------------------------------------------------------------------------


@pytest.mark.slow
def test_archive_holds_split_settings(model_store):
    name, config = read_archive_config(model_store / f"{EXACT}.mar")
    assert name == EXACT
    assert (config["batchSize"], config["minWorkers"], config["maxWorkers"]) == (4, 2, 2)
    handler = config["handler"]
    assert (handler["model_name"], handler["merge_layer"], handler["grid"], handler["mode"]) == (
        MODEL, MERGE_LAYER, "2x2", "exact")
    assert handler["weights_source"] == "pretrained"


@pytest.mark.slow
def test_every_worker_ready(server):
    status = server.models_status()
    assert set(status) == {EXACT, UNSPLIT, SEED, NATIVE}
    assert status[EXACT]["workers"] == ["READY", "READY"]
    assert requests.get(f"{server.inference_url}/ping", headers=server.headers("inference"),
                        timeout=5).json()["status"] == "Healthy"


@pytest.mark.slow
def test_exact_equals_unsplit_and_finds_the_cat(server, cat):
    exact, unsplit = predict(server, EXACT, cat), predict(server, UNSPLIT, cat)
    exact_p, unsplit_p = probabilities(exact), probabilities(unsplit)
    assert list(exact_p) == list(unsplit_p)
    for index, p in unsplit_p.items():
        assert abs(exact_p[index] - p) <= 1e-5
    top = exact.json()["predictions"][0]
    assert top["index"] in CAT_CLASSES and "cat" in top["label"]
    assert len(exact.json()["predictions"]) == 5


@pytest.mark.slow
def test_seed_mode_differs_only_in_probabilities(server, cat):
    """Seed mode (no halo) serves the same kind of answer: the same classes near the top,
    the same labels, a cat first; only the probabilities move (they may swap close ranks)."""
    seed, exact = predict(server, SEED, cat).json(), predict(server, EXACT, cat).json()
    assert seed.keys() == exact.keys() == {"predictions"}
    assert [p.keys() for p in seed["predictions"]] == [p.keys() for p in exact["predictions"]]
    seed_p = {p["index"]: (p["label"], p["probability"]) for p in seed["predictions"]}
    exact_p = {p["index"]: (p["label"], p["probability"]) for p in exact["predictions"]}
    assert seed["predictions"][0]["index"] in CAT_CLASSES
    assert {p["index"] for p in seed["predictions"][:3]} == {p["index"] for p in exact["predictions"][:3]}
    assert all(seed_p[i][0] == exact_p[i][0] for i in seed_p.keys() & exact_p.keys())
    assert any(abs(seed_p[i][1] - exact_p[i][1]) > 1e-4 for i in seed_p.keys() & exact_p.keys())


def _truncated(cat: bytes) -> bytes:
    return cat[: len(cat) // 2]


BAD_INPUTS = {
    "garbage": (lambda cat: b"\x00\x01 definitely not an image", "not an image"),
    "truncated-jpeg": (_truncated, "truncated"),
    "over-pixel-limit": (lambda cat: png_bomb(8000, 8000), "too large"),
    "empty-body": (lambda cat: b"", "empty request body"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_is_a_4xx_and_the_server_keeps_serving(server, cat, kind):
    make, message = BAD_INPUTS[kind]
    bad = predict(server, EXACT, make(cat))
    assert 400 <= bad.status_code < 500, bad.text
    assert message in bad.json()["message"]
    assert probabilities(predict(server, EXACT, cat))  # the next good request succeeds


@pytest.mark.slow
def test_one_bad_image_in_a_batch_of_four(server, cat):
    bodies = [cat, b"not an image", cat, cat]
    barrier = threading.Barrier(len(bodies))

    def send(body):
        barrier.wait()
        return predict(server, SEED, body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(send, bodies))
    assert [r.status_code for r in responses] == [200, 400, 200, 200]
    assert {r.headers.get("x-splitpack-batch-size") for r in responses} == {"4"}  # one batch of 4
    good = [probabilities(r) for r in (responses[0], responses[2], responses[3])]
    assert good[0] == good[1] == good[2]


def tiny_png(side: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), "blue").save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_image_too_small_for_the_grid_is_a_400(server, cat):
    """The same isolation as Triton (Predictor.serve): 16x16 merges to 2x2 at blocks.2, too few pixels
    for 2x3 packs -> HTTP 400 for that request; the others of the batch are served."""
    with ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(lambda body: predict(server, NATIVE, body), [cat, tiny_png(), cat]))
    assert responses[1].status_code == 400, responses[1].text
    assert "cannot be served with split-pack 2x3" in responses[1].json()["message"]
    for response in (responses[0], responses[2]):
        assert response.status_code == 200 and response.json()["predictions"][0]["index"] in CAT_CLASSES


@pytest.mark.slow
def test_concurrent_clients_with_batching(server, cat):
    reference = probabilities(predict(server, EXACT, cat))
    small = io.BytesIO()
    Image.open(io.BytesIO(cat)).resize((160, 120)).save(small, format="PNG")
    bodies = [cat, small.getvalue()]
    deadline = time.monotonic() + 8
    failures, batch_sizes, counts = [], set(), [0]
    lock = threading.Lock()

    def client(k: int):
        i = 0
        while time.monotonic() < deadline:
            body = bodies[(k + i) % 2]
            i += 1
            r = predict(server, EXACT, body)
            with lock:
                counts[0] += 1
                batch_sizes.add(r.headers.get("x-splitpack-batch-size"))
                if r.status_code != 200:
                    failures.append((r.status_code, r.text[:200]))
                elif body is cat and any(abs(p - reference[j]) > 1e-5 for j, p in probabilities(r).items()):
                    failures.append(("wrong answer", r.text[:200]))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(client, range(4)))
    assert not failures
    assert counts[0] >= 8
    assert any(int(b) > 1 for b in batch_sizes if b), f"no batching happened: {batch_sizes}"


@pytest.mark.slow
def test_unknown_merge_layer_fails_to_load_and_names_valid_layers(tmp_path, capsys):
    store = tmp_path / "store"
    archive(store, "lite0_bad_layer", "--merge-layer", "blocks.99", "--no-check")
    ports = free_ports(5)
    run_dir = tmp_path / "run"
    code = cli.main(["serve", "torchserve", "start", "--model-store", str(store), "--run-dir", str(run_dir),
                     "--inference-port", str(ports[0]), "--management-port", str(ports[1]),
                     "--metrics-port", str(ports[2]), "--grpc-port", str(ports[3]), "--timeout", "120"])
    err = capsys.readouterr().err
    try:
        assert code == 1
        assert "lite0_bad_layer" in err and "unknown merge layer 'blocks.99'" in err
        assert "valid merge layers" in err and "blocks.2" in err and "conv_stem" in err
    finally:
        TorchServe.from_run_dir(run_dir).stop()
    assert TorchServe.from_run_dir(run_dir).pid() is None  # start stopped the server it could not ready


def test_archive_from_an_edited_model_config(tmp_path):
    """Operators change settings by editing model-config.yaml, not code."""
    import yaml

    edited = {"minWorkers": 2, "maxWorkers": 2, "batchSize": 8, "maxBatchDelay": 10,
              "handler": {"model_name": MODEL, "merge_layer": "blocks.3", "grid": "3x3", "mode": "seed",
                          "topk": "3"}}
    config = tmp_path / "model-config.yaml"
    config.write_text(yaml.safe_dump(edited))
    assert cli.main(["archive", "--config", str(config), "--name", "edited", "--out", str(tmp_path)]) == 0
    name, archived = read_archive_config(tmp_path / "edited.mar")
    assert name == "edited" and archived["batchSize"] == 8 and archived["minWorkers"] == 2
    handler = archived["handler"]
    assert (handler["merge_layer"], handler["grid"], handler["mode"], handler["topk"]) == ("blocks.3", "3x3", "seed", 3)
    assert handler["weights_source"] == "random" and handler["data_config"]["input_size"] == [3, 224, 224]


@pytest.mark.slow
def test_memory_gauges_on_the_metrics_endpoint(server, cat):
    assert predict(server, EXACT, cat).status_code == 200
    text = requests.get(f"http://127.0.0.1:{server.ports.metrics}/metrics", timeout=30).text
    # (splitpack_peak_activation_bytes is reported on CUDA only: the CPU tracker would slow every batch)
    for name in ("splitpack_device_memory_used_bytes", "splitpack_process_device_memory_bytes"):
        assert name in text, text[-2000:]
