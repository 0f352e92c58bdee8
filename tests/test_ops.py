"""The production helpers without a server: thread shares, the Triton deployment's parsing,
the TorchServe exposure check. The real servers are in tests/test_*_faults.py."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from splitpack.serving import threads
from splitpack.serving.config import ServingConfig
from splitpack.serving.torchserve.server import check_exposure, is_loopback
from splitpack.serving.triton.gateway import forwarded_metadata
from splitpack.serving.triton.repo import TritonModelSpec, render_config
from splitpack.serving.triton.supervisor import (admin_headers, instance_names, load_failures,
                                                 restricted_protocol_args)


@pytest.mark.parametrize("cores, processes, expected", [(2, 2, 1), (2, 1, 2), (16, 3, 5), (2, 5, 1), (8, 0, 8)])
def test_threads_split_the_cores_between_processes(cores, processes, expected):
    assert threads.default_threads(processes, cores=cores) == expected


@pytest.mark.parametrize("text, cores", [("max 100000", None), ("200000 100000", 2), ("150000 100000", 2),
                                         ("50000 100000", 1), ("garbage", None)])
def test_cgroup_quota_in_whole_cpus(tmp_path, text, cores):
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text(text + "\n")
    assert threads.cgroup_cpu_quota(cpu_max) == cores
    assert threads.cgroup_cpu_quota(tmp_path / "missing") is None


def test_a_models_threads_win_over_the_servers_share():
    assert threads.resolve_threads(3, 2, env={"SPLITPACK_THREADS": "1"}) == 3
    assert threads.resolve_threads(None, 2, env={"SPLITPACK_THREADS": "4"}) == 4
    assert threads.resolve_threads(None, 1, env={}) == threads.available_cores()
    env = threads.thread_env(2)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == env["SPLITPACK_THREADS"] == "2"


def test_threads_are_applied_in_a_fresh_process():
    """What a worker does first: torch threads from the model's setting, one inter-op thread."""
    code = ("from splitpack.serving.threads import configure_threads; import json;"
            "print(json.dumps(configure_threads('auto', 1)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"SPLITPACK_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.stdout.strip() == '{"torch_threads": 1, "torch_interop_threads": 1}'


def test_instance_names_follow_the_instance_group(tmp_path):
    spec = TritonModelSpec(ServingConfig("resnet18"), {"replicas": 3}, name="r18")
    (tmp_path / "r18").mkdir()
    (tmp_path / "r18" / "config.pbtxt").write_text(render_config(spec, 1000, ""))
    assert instance_names(tmp_path, "r18") == ["r18_0_0", "r18_0_1", "r18_0_2"]


def test_load_failures_are_read_from_the_triton_log():
    log = ('I1127 11:16:57.486243 15159 model_lifecycle.cc:472] "loading: good:1"\n'
           'E1127 11:16:58.1 15159 model_lifecycle.cc:654] "failed to load \'broken\' version 1: Internal: '
           'ValueError: unknown merge layer \'x\'; valid merge layers: a, b"\n')
    assert load_failures(log) == {"broken": "Internal: ValueError: unknown merge layer 'x'; valid merge layers: a, b"}
    assert load_failures("nothing failed\n") == {}


def test_model_control_is_restricted_with_the_key():
    [arg] = restricted_protocol_args("k3y")
    assert arg == "--grpc-restricted-protocol=model-repository,shared-memory,trace,logging:splitpack-admin=k3y"
    assert admin_headers("k3y") == {"triton-grpc-protocol-splitpack-admin": "k3y"}
    assert restricted_protocol_args(None) == [] and admin_headers(None) == {}


def test_gateway_forwards_the_callers_headers_not_the_transports():
    metadata = [(":authority", "x"), ("user-agent", "grpc"), ("grpc-accept-encoding", "gzip"),
                ("triton-grpc-protocol-splitpack-admin", "k"), ("x-request-id", "7")]
    assert forwarded_metadata(metadata) == [("triton-grpc-protocol-splitpack-admin", "k"), ("x-request-id", "7")]


@pytest.mark.parametrize("address, loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                               ("localhost", True), ("0.0.0.0", False), ("10.1.2.3", False)])
def test_only_loopback_may_go_without_token(address, loopback):
    assert is_loopback(address) == loopback
    check_exposure(address, token_auth=True)
    if loopback:
        check_exposure(address, token_auth=False)
    else:
        with pytest.raises(ValueError, match="without token authorization"):
            check_exposure(address, token_auth=False)


def test_cli_refuses_an_open_server_beyond_loopback(tmp_path, capsys):
    from splitpack import cli

    (tmp_path / "store").mkdir()
    code = cli.main(["serve", "torchserve", "start", "--model-store", str(tmp_path / "store"), "--bind", "0.0.0.0",
                     "--no-token-auth", "--run-dir", str(tmp_path / "run")])
    assert code == 2 and "refusing to bind TorchServe to 0.0.0.0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
