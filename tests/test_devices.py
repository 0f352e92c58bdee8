"""Device-memory reporting: NVML where there is a driver, a clear host-memory fallback where not."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from splitpack.measure import nvml
from splitpack.measure.meter import measured_call, peak_activation_bytes, peak_meter
from splitpack.serving import metrics
from splitpack.serving.torchserve import metrics as torchserve_metrics

NVML_OK, NVML_REASON = nvml.nvml_status()
cli = [sys.executable, "-m", "splitpack.cli", "devices"]


@pytest.mark.skipif(NVML_OK, reason="this machine has an NVIDIA driver")
def test_without_driver_report_says_so_and_shows_host_memory():
    report = nvml.query_devices()
    assert not report.nvml_available and report.gpus == []
    assert "NVML" in report.fallback_reason
    host = report.host
    assert host.total_bytes > host.available_bytes > 0 and host.process_rss_bytes > 0
    assert host.used_bytes == host.total_bytes - host.available_bytes


@pytest.mark.skipif(not NVML_OK, reason="no NVIDIA driver here")
def test_with_driver_every_gpu_is_reported():
    report = nvml.query_devices()
    assert report.nvml_available and report.gpus and report.driver_version
    for gpu in report.gpus:
        assert gpu.total_bytes >= gpu.used_bytes and gpu.free_bytes <= gpu.total_bytes


def test_cli_json_is_clean_without_a_traceback():
    done = subprocess.run(cli + ["--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    report = json.loads(done.stdout)
    assert set(report) == {"nvml_available", "fallback_reason", "driver_version", "gpus", "host"}
    assert report["nvml_available"] == NVML_OK


def test_cli_text_names_the_fallback():
    done = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr
    if NVML_OK:
        assert "GPU 0" in done.stdout
    else:
        assert "Showing host memory instead" in done.stdout and "host: total" in done.stdout


def test_metrics_have_fixed_names_whatever_the_machine():
    values = metrics.device_memory_metrics()
    assert set(values) == set(metrics.METRICS) - {"splitpack_peak_activation_bytes"}
    assert all(isinstance(v, float) for v in values.values())
    assert values["splitpack_device_is_gpu"] == 0.0  # a CPU replica reports host memory
    assert values["splitpack_device_memory_total_bytes"] >= values["splitpack_device_memory_used_bytes"] > 0
    with_peak = metrics.device_memory_metrics("cpu", peak_activation_bytes=1234)
    assert set(with_peak) == set(metrics.METRICS) and with_peak["splitpack_peak_activation_bytes"] == 1234.0
    assert all(name.startswith("splitpack_") and name.islower() for name in metrics.METRICS)


def test_measured_call_returns_the_result_and_the_tracker_peak():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 32, 32)
    out, peak = measured_call(model, x)
    assert out.shape == (2, 4, 32, 32)
    assert peak == peak_activation_bytes(model, x) >= out.numel() * 4


def test_torchserve_gauges_are_declared_and_emitted(tmp_path, caplog):
    """The real TorchServe metrics cache (what a handler's context.metrics is) accepts every gauge."""
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    text = torchserve_metrics.torchserve_metrics_yaml()
    config = yaml.safe_load(text)
    declared = {g["name"] for g in config["model_metrics"]["gauge"]}
    assert set(metrics.METRICS) <= declared
    assert {"HandlerTime", "PredictionTime"} <= declared  # TorchServe's defaults are kept
    assert any(g["name"] == "Requests2XX" for g in config["ts_metrics"]["counter"])
    path = tmp_path / "metrics.yaml"
    path.write_text(text)
    cache = MetricsCacheYamlImpl(str(path))
    cache.initialize_cache()
    with caplog.at_level(logging.INFO):
        for _ in range(2):  # same dimensions every time
            torchserve_metrics.report_to_torchserve(cache, metrics.device_memory_metrics(peak_activation_bytes=77), "m")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[METRICS]")]
    assert any(line.startswith("[METRICS]splitpack_peak_activation_bytes.Bytes:77.0|#ModelName:m,Level:Model")
               for line in lines)
    assert len(lines) == 2 * len(metrics.METRICS)
    assert not [r for r in caplog.records if "Failed to update metric" in r.getMessage()]


def test_nvml_absence_is_not_an_exception_for_callers():
    ok, reason = nvml.nvml_status()
    assert ok or (reason and "NVML" in reason)
    if not ok:
        with pytest.raises(nvml.NvmlUnavailable):
            nvml.gpu_memory(0)


def test_peak_activation_block_matches_measured_call():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU()).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.inference_mode(), peak_meter("cpu") as meter:
        model(x)
    assert meter.peak == measured_call(model, x)[1] > 0
    with peak_meter("cpu", enabled=False) as off:
        model(x)
    assert off.peak is None


def test_cuda_visible_devices_maps_torch_indices_to_nvml(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert [nvml._visible_to_nvml(i) for i in (0, 1)] == [3, 1]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert nvml._visible_to_nvml(0) == 0


# --- the gauges on a real TorchServe ------------------------------------------------------

HANDLER = '''
from ts.torch_handler.base_handler import BaseHandler
from splitpack.serving.metrics import device_memory_metrics
from splitpack.serving.torchserve.metrics import report_to_torchserve


class MemoryOnly(BaseHandler):
    def initialize(self, context):
        self.context = context
        self.initialized = True

    def handle(self, data, context):
        values = device_memory_metrics(peak_activation_bytes=4321)
        report_to_torchserve(context.metrics, values, context.model_name)
        return ["ok"] * len(data)
'''


@pytest.mark.slow
def test_gauges_reach_torchserve_prometheus_endpoint_once_declared(tmp_path):
    """A handler reporting through report_to_torchserve, TorchServe 0.12 with the generated metrics config."""
    import shutil
    import socket
    import time

    import requests

    bindir = Path(sys.executable).parent
    (tmp_path / "h.py").write_text(HANDLER)
    store = tmp_path / "store"
    store.mkdir()
    subprocess.run([str(bindir / "torch-model-archiver"), "--model-name", "mem", "--version", "1", "--handler",
                    str(tmp_path / "h.py"), "--export-path", str(store)], check=True)
    (tmp_path / "metrics.yaml").write_text(torchserve_metrics.torchserve_metrics_yaml())
    sockets = [socket.socket() for _ in range(5)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    inference, management, metrics_port, grpc_i, grpc_m = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    (tmp_path / "config.properties").write_text("\n".join([
        f"inference_address=http://127.0.0.1:{inference}", f"management_address=http://127.0.0.1:{management}",
        f"metrics_address=http://127.0.0.1:{metrics_port}", "grpc_inference_address=127.0.0.1",
        "grpc_management_address=127.0.0.1", f"grpc_inference_port={grpc_i}", f"grpc_management_port={grpc_m}",
        "install_py_dep_per_model=false", "disable_token_authorization=true", f"model_store={store}",
        "metrics_mode=prometheus", f"metrics_config={tmp_path / 'metrics.yaml'}", ""]))
    env = dict(os.environ, TMPDIR=str(tmp_path), TEMP=str(tmp_path), LOG_LOCATION=str(tmp_path / "logs"),
               METRICS_LOCATION=str(tmp_path / "logs"), PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    env.pop("TS_CONFIG_FILE", None)
    torchserve = str(bindir / "torchserve")
    subprocess.run([torchserve, "--start", "--ncs", "--ts-config", str(tmp_path / "config.properties"),
                    "--models", "mem=mem.mar", "--disable-token-auth"], cwd=tmp_path, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if "READY" in requests.get(f"http://127.0.0.1:{management}/models/mem", timeout=5).text:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        assert requests.post(f"http://127.0.0.1:{inference}/predictions/mem", data=b"x", timeout=30).text == "ok"
        text = ""
        for _ in range(20):  # the frontend picks the worker's metric lines up asynchronously
            text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
            if "splitpack_peak_activation_bytes{" in text:
                break
            time.sleep(0.5)
        for name in metrics.METRICS:
            assert f"# TYPE {name} gauge" in text
        assert 'splitpack_peak_activation_bytes{ModelName="mem",Level="Model"' in text
    finally:
        subprocess.run([torchserve, "--stop", "--foreground"], cwd=tmp_path, env=env, timeout=120,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(tmp_path / "logs", ignore_errors=True)
