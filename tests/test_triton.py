"""Triton python-backend model: generator, and the real tritonserver from the nvidia-pytriton wheel.

One server (session fixture) serves the shipped model, regenerated into a temporary
repository by `scripts/triton.sh repo`, plus a model with an unknown merge layer that
the tests try to load. One instance of tf_efficientnet_lite0 keeps memory (~0.8 GB per
stub process) and time low on 2 cores.
"""
from __future__ import annotations

import json

import os
import shutil
import struct
import subprocess
import sys
import time
import urllib.request
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest

from splitpack.serving.triton.repo import (INPUT_IMAGE, OUTPUT_PROBABILITIES, OUTPUT_TOP_K, TritonModelSpec,
                              config_parameters, generate_model_dir, parse_model_config, read_model_config,
                              render_config)
from splitpack.serving.triton.client import classify, classify_each, image_input, parse_top_k
from splitpack.serving.triton.model import format_top_k
from splitpack.serving.config import ServingConfig
from splitpack.serving.net import free_port
from splitpack.serving.process import wait_exit
from splitpack.serving.triton.server import TritonServer, locate_triton, prepare_backends, read_pid

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tf_efficientnet_lite0"
COMMITTED = ROOT / "triton_repo" / MODEL
BAD_MODEL = "lite0_unknown_merge_layer"
NATIVE_MODEL = "lite0_native_2x3"  # exact split-pack 2x3 at native resolution: a 16x16 image is too small
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def cat_image() -> bytes:
    from splitpack.serving.predictor import SAMPLE_IMAGE

    return SAMPLE_IMAGE.read_bytes()  # scikit-image's "Chelsea the cat", shipped in splitpack/assets


def png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(1000)))


# --- without a server -------------------------------------------------------------------

def test_bundled_server_is_found_and_backends_are_copied(tmp_path):
    install = locate_triton()
    assert install.server.is_file() and install.stub.is_file()
    backends = prepare_backends(tmp_path, install)
    python = backends / "python"
    assert (python / "libtriton_python.so").is_file()
    assert (python / "triton_python_backend_stub").stat().st_mode & 0o111  # still executable
    before = (python / "triton_python_backend_stub").stat().st_mtime_ns
    prepare_backends(tmp_path, install)  # idempotent: nothing copied twice
    assert (python / "triton_python_backend_stub").stat().st_mtime_ns == before


def test_rendered_config_parses_with_every_parameter():
    spec = TritonModelSpec(ServingConfig("tv:resnet18", merge_layer="layer1", grid="3x2", mode="seed", topk=3),
                           {"replicas": 3, "batch_size": 4})
    config = parse_model_config(render_config(spec, num_classes=1000, weights="model.pt"))
    assert config.name == "tv_resnet18" and config.max_batch_size == 4
    assert config.instance_group[0].count == 3
    assert config.HasField("dynamic_batching")
    params = config_parameters(config)
    assert params["model_name"] == "tv:resnet18" and params["merge_layer"] == "layer1"
    assert params["grid"] == "3x2" and params["mode"] == "seed" and params["weights"] == "model.pt"
    assert [o.dims for o in config.output] == [[1000], [3]]


def test_top_k_format_round_trips():
    entries = [{"index": 281, "label": "tabby, tabby cat", "probability": 0.5},
               {"index": 3, "label": "a:b", "probability": 0.25}]
    assert parse_top_k(format_top_k(entries)) == entries


# --- the real server ----------------------------------------------------------------------

@pytest.fixture(scope="session")
def repo(tmp_path_factory) -> Path:
    """`scripts/triton.sh repo` into a temporary repository, plus a model that must not load."""
    repo = tmp_path_factory.mktemp("triton_repo")
    env = dict(os.environ, TRITON_REPO=str(repo), PYTHON=sys.executable)
    subprocess.run(["bash", str(ROOT / "scripts" / "triton.sh"), "repo"], env=env, check=True, timeout=300)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random weights: this model must not load anyway
        generate_model_dir(TritonModelSpec(ServingConfig(MODEL, merge_layer="blocks.no_such_layer"),
                                           name=BAD_MODEL), repo, check=False)
    native = ServingConfig(MODEL, merge_layer="blocks.2", grid="2x3", native_resolution=True, max_side=300)
    generate_model_dir(TritonModelSpec(native, name=NATIVE_MODEL, pretrained=True), repo)
    return repo


@pytest.fixture(scope="session")
def server(repo, tmp_path_factory):
    triton = TritonServer(repo, grpc_port=free_port(), metrics_port=free_port(),
                          run_dir=tmp_path_factory.mktemp("run"), models=[MODEL])
    triton.start(timeout=240)
    pid = triton.process.pid
    yield triton
    triton.stop()
    assert not _session_members(pid), "tritonserver left processes behind"


@pytest.fixture()
def client(server):
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(server.url) as c:
        yield c


def _session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes in session ``sid``: the server and its stubs."""
    members = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                if fields[0] != "Z" and int(fields[3]) == sid:
                    members.append(int(proc.name))
            except (OSError, IndexError, ValueError):
                pass
    return members


def _stats(client) -> dict:
    stats = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    return {
        "inference_count": int(stats.get("inference_count", 0)),
        "execution_count": int(stats.get("execution_count", 0)),
        "batches": {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])},
    }


@pytest.mark.slow
def test_committed_model_is_what_the_script_generates(repo):
    for name in ("config.pbtxt", "1/model.py"):
        assert (repo / MODEL / name).read_text() == (COMMITTED / name).read_text(), \
            f"triton_repo/{MODEL}/{name} is stale: run scripts/triton.sh repo"


@pytest.mark.slow
def test_ready_and_config_parameters_visible(client):
    assert client.is_server_ready() and client.is_model_ready(MODEL)
    config = client.get_model_config(MODEL, as_json=True)["config"]
    params = config_parameters(config)
    committed = config_parameters(read_model_config(COMMITTED / "config.pbtxt"))
    assert params == committed
    assert params["model_name"] == MODEL and params["merge_layer"] == "blocks.2"
    assert params["grid"] == "2x2" and params["mode"] == "exact" and params["weights"] == "model.pt"
    # the transform the pretrained TF-Lite weights expect, pinned like the TorchServe archive pins it
    assert json.loads(params["data_config"])["interpolation"] == "bicubic"
    assert config["instance_group"][0]["count"] == 1
    assert "dynamic_batching" in config and config["max_batch_size"] == 8
    assert [i["name"] for i in config["input"]] == [INPUT_IMAGE]
    assert [o["name"] for o in config["output"]] == [OUTPUT_PROBABILITIES, OUTPUT_TOP_K]


@pytest.mark.slow
def test_server_runs_split_pack_as_configured(server):
    ready = [line for line in server.log_text().splitlines() if "[splitpack]" in line and " ready: " in line]
    assert ready, server.log_tail()
    assert '\\"split\\": true' in ready[0] and '\\"merge_layer\\": \\"blocks.2\\"' in ready[0]


@pytest.mark.slow
def test_exact_split_equals_unsplit_and_cat_is_a_cat(client, repo):
    from splitpack.serving.predictor import Predictor

    image = cat_image()
    served = classify(client, MODEL, [image], probabilities=True)[0]
    served_transform = config_parameters(read_model_config(COMMITTED / "config.pbtxt"))["data_config"]
    unsplit = Predictor(ServingConfig(MODEL, data_config=served_transform), weights=str(repo / MODEL / "1" / "model.pt"))
    expected = unsplit.predict([unsplit.decode(image)])[0]
    assert served.probabilities.shape == tuple(expected.shape) == (1000,)
    np.testing.assert_allclose(served.probabilities, expected.numpy(), rtol=0, atol=1e-5)
    assert served.top_k[0]["index"] in CAT_CLASSES, served.top_k
    assert "cat" in served.top_k[0]["label"]
    assert [e["index"] for e in served.top_k] == [e["index"] for e in unsplit.top_k(expected)]


@pytest.mark.slow
def test_concurrent_requests_are_batched(client):
    before = _stats(client)
    image = cat_image()
    results = classify_each(client, MODEL, [image] * 8)
    assert all(r.error is None and r.top_k[0]["index"] in CAT_CLASSES for r in results)
    # Triton updates its statistics after the responses are sent: wait (bounded) for all 8 to be counted
    deadline = time.monotonic() + 10
    after = _stats(client)
    while after["inference_count"] - before["inference_count"] < 8 and time.monotonic() < deadline:
        time.sleep(0.1)
        after = _stats(client)
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == 8 and executions < 8, (before, after)
    grew = {size for size, count in after["batches"].items() if count > before["batches"].get(size, 0)}
    assert max(grew) > 1, (before, after)


@pytest.mark.slow
def test_bad_requests_fail_alone_and_the_model_keeps_serving(client):
    image = cat_image()
    bad = {
        "not an image": b"this is not an image",
        "truncated": image[: len(image) // 3],
        "too large": png_bomb(10_000, 10_000),
        "empty": b"",
    }
    results = classify_each(client, MODEL, [image, *bad.values(), image])
    assert results[0].error is None and results[-1].error is None
    messages = {kind: r.error for kind, r in zip(bad, results[1:-1])}
    assert "not an image" in messages["not an image"]
    assert "truncated" in messages["truncated"]
    assert "too large" in messages["too large"] and "100000000" in messages["too large"]
    assert "empty" in messages["empty"]

    # One request holding a good and a bad image fails as a whole, naming the image.
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="image 1: not an image") as err:
        classify(client, MODEL, [image, b"junk"])
    assert "INVALID_ARGUMENT" in str(err.value.status())
    assert client.is_server_live() and client.is_model_ready(MODEL)
    assert classify(client, MODEL, [image])[0].top_k[0]["index"] in CAT_CLASSES


def tiny_png(side: int = 16) -> bytes:
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.new("RGB", (side, side), "blue").save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_image_too_small_for_the_grid_is_invalid_argument(client):
    """The same isolation as TorchServe (Predictor.serve): 16x16 merges to 2x2 at blocks.2, too few
    pixels for 2x3 packs -> INVALID_ARGUMENT for that request, the others of the batch are served."""
    from tritonclient.utils import InferenceServerException

    client.load_model(NATIVE_MODEL)
    try:
        image = cat_image()
        results = classify_each(client, NATIVE_MODEL, [image, tiny_png(), image])
        assert results[0].error is None and results[2].error is None
        assert results[0].top_k[0]["index"] in CAT_CLASSES
        assert "cannot be served with split-pack 2x3" in results[1].error
        with pytest.raises(InferenceServerException, match="cannot be served with split-pack 2x3") as err:
            classify(client, NATIVE_MODEL, [tiny_png()])
        assert "INVALID_ARGUMENT" in str(err.value.status())
    finally:
        client.unload_model(NATIVE_MODEL)


@pytest.mark.slow
def test_wrong_type_or_shape_is_rejected(client):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    floats = grpcclient.InferInput(INPUT_IMAGE, [1, 1], "FP32")
    floats.set_data_from_numpy(np.zeros((1, 1), np.float32))
    with pytest.raises(InferenceServerException, match="(?i)data.?type"):
        client.infer(MODEL, [floats])
    pair = grpcclient.InferInput(INPUT_IMAGE, [1, 2], "BYTES")
    pair.set_data_from_numpy(np.array([[b"a", b"b"]], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="(?i)shape"):
        client.infer(MODEL, [pair])
    too_many = image_input([cat_image()] * 9)  # max_batch_size is 8
    with pytest.raises(InferenceServerException, match="(?i)batch"):
        client.infer(MODEL, [too_many])
    assert client.is_model_ready(MODEL)


@pytest.mark.slow
def test_unknown_merge_layer_fails_to_load_with_valid_names(client, server):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as err:
        client.load_model(BAD_MODEL)
    assert not client.is_model_ready(BAD_MODEL)
    log = server.log_text()
    assert "blocks.no_such_layer" in log
    assert "valid merge layers" in log and "blocks.2" in log and "conv_stem" in log, str(err.value)
    assert client.is_model_ready(MODEL)


@pytest.mark.slow
def test_memory_metrics_exported(server, client):
    classify(client, MODEL, [cat_image()])
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    lines = [line for line in text.splitlines()
             if line.startswith("splitpack_process_device_memory_bytes{") and f'model="{MODEL}"' in line]
    assert lines and float(lines[0].rsplit(" ", 1)[1]) > 0


@pytest.mark.slow
def test_cli_start_stop_and_client(repo, tmp_path):
    """`scripts/triton.sh start|client|stop`: a second server on other ports, stopped by its pid."""
    # Only the good model: the bad one would make a load-everything server exit.
    shutil.copytree(repo / MODEL, tmp_path / "repo" / MODEL)
    image = tmp_path / "cat.jpg"
    image.write_bytes(cat_image())
    env = dict(os.environ, TRITON_REPO=str(tmp_path / "repo"), PYTHON=sys.executable,
               GRPC_PORT=str(free_port()), METRICS_PORT="0", RUN_DIR=str(tmp_path / "run"))
    script = ["bash", str(ROOT / "scripts" / "triton.sh")]
    subprocess.run(script + ["start"], env=env, check=True, timeout=300)
    pid_file = tmp_path / "run" / "triton" / "tritonserver.pid"
    pid = read_pid(pid_file)
    try:
        assert pid is not None
        out = subprocess.run([sys.executable, str(ROOT / "scripts" / "triton_client.py"), "--url",
                              f"127.0.0.1:{env['GRPC_PORT']}", str(image)],
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "cat" in out.stdout.splitlines()[1], out.stdout
    finally:
        subprocess.run(script + ["stop"], env=env, check=True, timeout=120)
    assert read_pid(pid_file) is None and _exited(pid)
    assert not _session_members(pid)


def _exited(pid: int, wait: float = 10.0) -> bool:
    """Gone, or a zombie waiting for init to reap it (the server was orphaned by the CLI)."""
    return wait_exit(pid, wait)
