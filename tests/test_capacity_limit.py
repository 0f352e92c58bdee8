"""Capacity under a memory limit: the shape search (replicas x batch size), the fixed costs measured
from real servers, the written configs at the planned size, and a real memory cgroup."""
from __future__ import annotations

import contextlib
import io
import json
import math
import re

import pytest

from splitpack import cli
from splitpack.serving.plan_deployment import Deployment
from splitpack.serving.torchserve.deploy import torchserve_model_config
from splitpack.capacity.cgroup import CgroupUnavailable, MemoryCgroup
from splitpack.capacity.shape import (ActivationModel, ShapeInputs, Terms, batch_bytes_fn, best_shape, plan_shape,
                                      usage_bytes)

MiB = 2**20


def cgroup_unavailable() -> str | None:
    try:
        MemoryCgroup(1 << 30).remove()
    except (CgroupUnavailable, OSError) as e:
        return str(e)
    return None


needs_cgroup = pytest.mark.skipif(cgroup_unavailable() is not None,
                                  reason=f"no memory cgroup can be made here: {cgroup_unavailable()}")


def capacity_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["capacity", *argv])
    return code, out.getvalue(), err.getvalue()


# --- the search --------------------------------------------------------------------------------

def test_best_shape_by_hand():
    terms = Terms(server_bytes=100, process_bytes=200, weights_bytes=50)
    per_batch = lambda b: 30 * b + 10  # noqa: E731
    # 1 replica: 100 + 250 + 30 b + 10 <= 1000 -> b = 21 (21 images); 2: b = 6 (12); 3: b = 1 (3); 4: none
    shape = best_shape(1000, terms, per_batch)
    assert (shape.replicas, shape.batch_size, shape.inflight_images) == (1, 21, 21)
    assert shape.predicted_usage_bytes == 100 + 250 + 30 * 21 + 10 == 990
    # the batch cap moves the best shape to more replicas: 2 x 5 = 10 (100 + 2 (250 + 160)) beats 1 x 5
    capped = best_shape(1000, terms, per_batch, max_batch=5)
    assert capped.to_dict() == {"replicas": 2, "batch_size": 5, "concurrent_batches": 1,
                                "predicted_usage_bytes": 920, "inflight_images": 10}
    # three batches sharing one process and one copy of the weights: 100 + 250 + 3 (30 b + 10) -> 3 x 5 = 15
    shared = best_shape(1000, terms, per_batch, max_batch=5, concurrent=(1, 3))
    assert (shared.replicas, shared.concurrent_batches, shared.batch_size) == (1, 3, 5)
    assert shared.predicted_usage_bytes == 100 + 250 + 3 * 160 == 830
    # without the cap one batch of 21 beats 3 x 6 = 18
    assert best_shape(1000, terms, per_batch, concurrent=(1, 3)).inflight_images == 21
    assert best_shape(300, terms, per_batch) is None


def test_batch_cap_and_ties_prefer_less_memory():
    terms = Terms(server_bytes=0, process_bytes=100, weights_bytes=0)
    shape = best_shape(1000, terms, lambda b: 100 * b, max_batch=2)
    # 1 x 2 (300), 2 x 2 (600), 3 x 2 (900) -> 6 images; 4 replicas do not fit at batch 2 but fit at 1 (800)
    assert (shape.replicas, shape.batch_size, shape.predicted_usage_bytes) == (3, 2, 900)


@pytest.fixture(scope="module")
def resnet18_224():
    return ActivationModel("resnet18", 224)


def test_activations_come_from_the_cost_model_replay(resnet18_224):
    import splitpack
    from splitpack.core.cost.exact_peak import allocation_profile, unsplit_peak
    from splitpack.core.search.planner import Planner

    model = splitpack.create_model("resnet18")
    assert resnet18_224.choice.plan == splitpack.plan_for(model, (1, 3, 224, 224)).plan
    assert resnet18_224.peak(True, 1) == resnet18_224.choice.predicted_peak_bytes
    traced = Planner(model).traced
    profile, shapes = allocation_profile(traced, (1, 3, 224, 224))
    assert resnet18_224.peak(False, 3) == unsplit_peak(traced, profile, 3, shapes)
    assert resnet18_224.peak(True, 4) > resnet18_224.peak(True, 2) > resnet18_224.peak(True, 1)


def test_plan_is_the_formula_on_the_terms_and_nothing_bigger_fits(resnet18_224):
    # fixed terms as measured for a TorchServe resnet18 here (see the slow test that measures them)
    terms = Terms(server_bytes=786 * MiB, process_bytes=430 * MiB, weights_bytes=resnet18_224.weights_bytes)
    limit = 1400 * MiB
    p = ShapeInputs("resnet18", 224, "torchserve", limit, "test", terms, "test", max_batch=256)
    plan = plan_shape(p, resnet18_224, quiet=True)
    assert_plan_arithmetic(plan, p, resnet18_224)
    assert plan["inflight_images_split"] > plan["inflight_images_unsplit"] > 0
    assert plan["recommended"]["merge_layer"] == resnet18_224.choice.plan.merge_layer_text


def assert_plan_arithmetic(plan: dict, p: ShapeInputs, activations: ActivationModel) -> None:
    rec = plan["recommended"]
    assert plan["memory_limit_bytes"] == p.limit_bytes
    assert plan["batch_size"] == rec["batch_size"]
    assert plan["headroom_bytes"] == p.headroom_bytes and plan["planned_within_bytes"] == p.limit_bytes - p.headroom_bytes
    limit = p.limit_bytes - p.headroom_bytes  # what the shapes must fit
    assert plan["predicted_usage_bytes"] == rec["predicted_usage_bytes"] <= limit
    most = p.pod.max_workers if p.pod else None  # a GPU pod's bound on its workers
    for split, row in ((True, plan["split"]), (False, plan["unsplit"])):
        fn = p.batch_bytes(activations, split)
        r, b = row["replicas"], row["batch_size"]
        assert row["predicted_usage_bytes"] == usage_bytes(p.terms, fn, r, b)
        assert row["inflight_images"] == r * b and (most is None or r <= most)
        # the next batch size does not fit, nor does any shape with more images in flight (within the pod)
        assert b == p.max_batch or usage_bytes(p.terms, fn, r, b + 1) > limit
        more = [(r2, b2) for r2 in range(1, min(r + 3, most or r + 3) + 1) for b2 in range(1, p.max_batch + 1)
                if r2 * b2 > r * b]
        assert all(usage_bytes(p.terms, fn, r2, b2) > limit for r2, b2 in more if b2 <= b + 2 or r2 == 1)
    inflight = {True: plan["inflight_images_split"], False: plan["inflight_images_unsplit"]}
    assert inflight[rec["merge_layer"] is not None] == rec["inflight_images"] == max(inflight.values())


def test_the_pod_bounds_the_replicas_and_the_batch_takes_the_rest():
    terms = Terms(server_bytes=0, process_bytes=100, weights_bytes=0)
    per_batch = lambda b: 10 * b  # noqa: E731
    # r (100 + 10 b) <= 1000: 1 x 64 (the batch cap), 2 x 40, 3 x 23, 4 x 15
    assert best_shape(1000, terms, per_batch).to_dict() == {"replicas": 2, "batch_size": 40, "concurrent_batches": 1,
                                                            "predicted_usage_bytes": 1000, "inflight_images": 80}
    assert best_shape(1000, terms, per_batch, max_replicas=1).inflight_images == 64
    # batches of at most 30: 3 x 23 = 69 beats 2 x 30 = 60, unless the pod allows only 2 workers
    free = best_shape(1000, terms, per_batch, max_batch=30)
    assert (free.replicas, free.batch_size, free.predicted_usage_bytes) == (3, 23, 990)
    bounded = best_shape(1000, terms, per_batch, max_batch=30, max_replicas=2)
    assert (bounded.replicas, bounded.batch_size, bounded.predicted_usage_bytes) == (2, 30, 800)


def test_a_gpu_pod_bounds_its_workers_by_cores_and_host_memory():
    from splitpack.capacity.pod import HOST_BYTES_PER_WORKER, HOST_BYTES_SERVER, GpuPod

    assert GpuPod(cpus=8, cpus_per_worker=2, host_memory_bytes=64 << 30).max_workers == 4  # the cores
    memory_bound = GpuPod(cpus=64, cpus_per_worker=1, host_memory_bytes=HOST_BYTES_SERVER + 3 * HOST_BYTES_PER_WORKER)
    assert memory_bound.max_workers == 3
    assert memory_bound.resources(2) == {"workers": 2, "cpus": 2,
                                         "host_memory_bytes": HOST_BYTES_SERVER + 2 * HOST_BYTES_PER_WORKER}
    with pytest.raises(ValueError, match="92 workers do not fit one GPU pod"):
        GpuPod().resources(92)
    with pytest.raises(ValueError, match="cannot run one worker"):
        GpuPod(cpus=1, cpus_per_worker=2)


def gpu_inputs(activations: ActivationModel, gpu_bytes: int, **changes) -> ShapeInputs:
    from splitpack.capacity.pod import GpuPod

    fields = dict(model="resnet18", size=224, server="torchserve", limit_bytes=gpu_bytes, limit_source="test",
                  terms=Terms(server_bytes=0, process_bytes=512 * MiB, weights_bytes=activations.weights_bytes),
                  terms_source="test", device="gpu", max_batch=32, headroom_bytes=gpu_bytes // 10, pod=GpuPod(),
                  threads_per_worker=2)
    return ShapeInputs(**(fields | changes))


def test_a_gpu_plan_is_the_formula_with_gpu_terms_within_the_pod(resnet18_224):
    """An 80 GiB GPU holds far more than the pod's 4 workers: the images in flight come from the batch."""
    p = gpu_inputs(resnet18_224, 80 << 30)
    plan = plan_shape(p, resnet18_224, quiet=True)
    assert_plan_arithmetic(plan, p, resnet18_224)
    rec = plan["recommended"]
    assert (rec["replicas"], rec["batch_size"]) == (4, 32)  # the pod's bound, the largest batch
    assert plan["memory"] == "gpu" and plan["gpu_memory_bytes"] == 80 << 30
    assert plan["pod"]["workers"] == 4 and plan["pod"]["cpus"] == 8 and plan["pod"]["host_memory_bytes"] == 9 << 30
    assert "planned, not measured" in plan["notes"][0]
    # no GPU time model here: the batch's MACs at the assumed GPU rate, planned
    from splitpack.capacity.timeout import ASSUMED_GPU_MACS_PER_S, GPU_SOURCE

    choice = resnet18_224.choice
    macs = choice.macs if rec["merge_layer"] else choice.unsplit_macs
    assert plan["predicted_batch_seconds"] == round(32 * macs / ASSUMED_GPU_MACS_PER_S, 3)
    assert plan["batch_seconds_source"] == GPU_SOURCE and "planned, not measured" in GPU_SOURCE
    # on the device the batch tensor is the only input copy: b images, not 2 b + 1 as on the host
    image = 3 * 224 * 224 * 4
    assert p.batch_bytes(resnet18_224, True)(8) == int(resnet18_224.peak(True, 8) * 1.1) + 8 * image
    # a small GPU: memory, not the pod, bounds the shape
    small = gpu_inputs(resnet18_224, 2 << 30)
    tight = plan_shape(small, resnet18_224, quiet=True)
    assert_plan_arithmetic(tight, small, resnet18_224)
    assert tight["predicted_usage_bytes"] <= (2 << 30) - small.headroom_bytes
    assert tight["recommended"]["inflight_images"] < rec["inflight_images"]


def test_the_response_timeout_covers_the_predicted_and_a_measured_batch(resnet18_224):
    import time

    import torch

    import splitpack
    from splitpack.capacity.timeout import MIN_RESPONSE_TIMEOUT_S, RESPONSE_SAFETY, response_timeout_s

    assert response_timeout_s(1.0) == MIN_RESPONSE_TIMEOUT_S and response_timeout_s(100.2) == 802
    # a big batch: its predicted time, times the safety factor
    terms = Terms(server_bytes=0, process_bytes=100 * MiB, weights_bytes=resnet18_224.weights_bytes)
    big = ShapeInputs("resnet18", 224, "torchserve", 64 << 30, "test", terms, "test", max_batch=1024)
    plan = plan_shape(big, resnet18_224, quiet=True)
    batch = plan["recommended"]["batch_size"]
    predicted = resnet18_224.batch_seconds(plan["recommended"]["merge_layer"] is not None, batch, 1)
    assert plan["predicted_batch_seconds"] == round(predicted, 3) and batch > 500
    assert plan["response_timeout_s"] == max(MIN_RESPONSE_TIMEOUT_S, math.ceil(RESPONSE_SAFETY * predicted))
    assert plan["response_timeout_s"] > predicted
    # the prediction is not far below a real batch of the plan on this machine (one thread, as a worker runs)
    small = plan_shape(ShapeInputs("resnet18", 224, "torchserve", 1400 * MiB, "test", terms, "test", max_batch=8),
                       resnet18_224, quiet=True)
    rec = small["recommended"]
    model = splitpack.create_model("resnet18").eval()
    if rec["merge_layer"]:
        model = splitpack.wrap(model, rec["merge_layer"], rec["grid"])
    x = torch.randn(rec["batch_size"], 3, 224, 224)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            model(x)
            start = time.perf_counter()
            model(x)
            measured = time.perf_counter() - start
    finally:
        torch.set_num_threads(before)
    assert measured <= RESPONSE_SAFETY * small["predicted_batch_seconds"], (measured, small["predicted_batch_seconds"])


def test_the_headroom_is_kept_free(resnet18_224):
    terms = Terms(server_bytes=786 * MiB, process_bytes=430 * MiB, weights_bytes=resnet18_224.weights_bytes)
    whole = ShapeInputs("resnet18", 224, "torchserve", 1400 * MiB, "test", terms, "test", max_batch=256)
    kept = ShapeInputs("resnet18", 224, "torchserve", 1400 * MiB, "test", terms, "test", max_batch=256,
                       headroom_bytes=100 * MiB)
    plan, with_headroom = plan_shape(whole, resnet18_224, quiet=True), plan_shape(kept, resnet18_224, quiet=True)
    assert_plan_arithmetic(with_headroom, kept, resnet18_224)
    assert with_headroom["predicted_usage_bytes"] <= 1300 * MiB
    assert with_headroom["inflight_images_split"] <= plan["inflight_images_split"]


def test_clients_wait_as_long_as_the_deployment_lets_two_batches_take():
    from splitpack.serving.plan_deployment import MIN_REQUEST_TIMEOUT_S, START_TIMEOUT_S, request_timeout

    assert request_timeout("torchserve", {"response_timeout_s": 1800}) == 2 * 1800 + 10  # the batch ahead, its own
    assert request_timeout("torchserve", {}) == MIN_REQUEST_TIMEOUT_S  # TorchServe's default 120 s
    assert request_timeout("triton", {}) == START_TIMEOUT_S  # no response timeout: what its start may take


def test_a_limit_nothing_fits_is_a_clear_error(resnet18_224):
    terms = Terms(server_bytes=786 * MiB, process_bytes=430 * MiB, weights_bytes=resnet18_224.weights_bytes)
    p = ShapeInputs("resnet18", 224, "torchserve", 1 << 30, "test", terms, "test")
    with pytest.raises(ValueError, match="nothing fits 1024 MiB"):
        plan_shape(p, resnet18_224, quiet=True)


# --- the written configs -----------------------------------------------------------------------

def shape_plan(merge_layer: str | None = "blocks.2", grid: str | None = "2x2", size: int = 160, replicas: int = 1,
               batch: int = 2) -> dict:
    return {"model": "tf_efficientnet_lite0", "size": size, "batch_size": batch, "server": "torchserve",
            "memory_limit_bytes": 3 << 30, "predicted_usage_bytes": 2 << 30,
            "recommended": {"merge_layer": merge_layer, "grid": grid, "mode": "exact" if merge_layer else None,
                            "replicas": replicas, "batch_size": batch, "concurrent_batches": 1,
                            "inflight_images": replicas * batch}}


def test_written_config_serves_the_planned_shape_at_the_planned_size():
    config = torchserve_model_config(shape_plan(size=160, replicas=2, batch=3), {"instance_kind": "cpu"})
    assert config["minWorkers"] == config["maxWorkers"] == 2 and config["batchSize"] == 3
    assert list(config["handler"]["data_config"]["input_size"]) == [3, 160, 160]
    assert config["handler"]["merge_layer"] == "blocks.2"
    # the operator's other data-config keys stay; another input size contradicts the plan
    kept = torchserve_model_config(shape_plan(), {"data_config": {"crop_pct": 1.0}})
    assert kept["handler"]["data_config"]["crop_pct"] == 1.0
    with pytest.raises(ValueError, match="the plan is for 160x160"):
        torchserve_model_config(shape_plan(), {"data_config": {"input_size": [3, 224, 224]}})


def test_memory_limit_cli_errors_are_clear(tmp_path):
    code, out, err = capacity_cli("--model", "resnet18", "--size", "64", "--memory-limit", "3GiB", "--device", "cuda")
    assert code == 2 and "--device cpu" in err and not out
    code, out, err = capacity_cli("--model", "resnet18", "--size", "64", "--gpu-memory", "8GiB", "--validate")
    assert code == 2 and "give --memory-limit" in err
    with pytest.raises(SystemExit) as exit_:  # argparse: the usage error before anything is measured
        capacity_cli("--model", "resnet18", "--size", "64", "--memory-limit", "3 apples")
    assert exit_.value.code == 2


# --- real servers --------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
def test_fixed_costs_are_measured_from_a_real_worker_and_planned_with(tmp_path, resnet18_224):
    from splitpack.capacity.fixed_costs import fixed_costs, load_cached, cache_key

    cache = tmp_path / "fixed_costs.json"
    costs = fixed_costs("torchserve", "resnet18", resnet18_224.weights_bytes, Deployment.write, cache, quiet=True)
    assert load_cached(cache, cache_key("torchserve", "resnet18")) == costs  # the next plan reads it back
    # a Python worker with torch loaded is hundreds of MiB of its own; the JVM and libtorch more
    assert 150 * MiB < costs.process_bytes < 2048 * MiB and 200 * MiB < costs.server_bytes < 4096 * MiB
    assert costs.weights_bytes == resnet18_224.weights_bytes
    limit = costs.server_bytes + costs.process_bytes + costs.weights_bytes + 300 * MiB
    p = ShapeInputs("resnet18", 224, "torchserve", limit, "test", Terms(costs.server_bytes, costs.process_bytes,
                                                                         costs.weights_bytes), costs.measured)
    assert_plan_arithmetic(plan_shape(p, resnet18_224, quiet=True), p, resnet18_224)


def served_settings(deployment) -> dict:
    """What the deployment serves with: TorchServe's handler logs it when ready; Triton reports the
    model's config parameters (the Python model reads its settings from them)."""
    if deployment.server == "triton":
        import tritonclient.grpc as grpcclient

        with grpcclient.InferenceServerClient(f"127.0.0.1:{deployment.ports[0]}") as client:
            params = client.get_model_config(deployment.name, as_json=True)["config"]["parameters"]
        return {k: v.get("string_value") for k, v in params.items()}
    text = "\n".join(p.read_text(errors="replace") for p in deployment.run_dir.rglob("*.log"))
    found = re.findall(r"splitpack handler ready: (\{.*\})\s*$", text, re.M)
    assert found, text[-3000:]
    return json.loads(found[-1])


@pytest.mark.slow
@pytest.mark.parametrize("server", ["torchserve", "triton"])
@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
def test_written_deployment_serves_at_the_planned_size(server, tmp_path):
    plan = shape_plan(size=160, batch=2) | {"server": server}
    with Deployment.write(server, plan, tmp_path, {"instance_kind": "cpu"}) as deployment:
        deployment.start()  # `splitpack serve SERVER start`, as an operator runs it
        deployment.infer_once(160)
        served = served_settings(deployment)
    if server == "triton":
        served["input_size"] = json.loads(served["data_config"])["input_size"]
    assert list(served["input_size"]) == [3, 160, 160]
    assert served["merge_layer"] == "blocks.2" and served["grid"] == "2x2"


@pytest.mark.slow
@needs_cgroup
@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
def test_a_small_model_validates_under_a_small_limit():
    from splitpack.capacity.validate import run_under_limit

    plan = shape_plan(size=160, batch=2)
    result = run_under_limit(Deployment.write, "torchserve", plan, 1536 * MiB, clients=2, duration_s=5, quiet=True)
    assert result["started"], result
    assert result["served"] > 0 and result["failed"] == 0 and result["oom_kills"] == 0, result
    assert result["idle_usage_bytes"] < result["peak_usage_bytes"] <= 1536 * MiB
