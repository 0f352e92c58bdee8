"""Capacity under a memory limit: the shape search (replicas x batch size), the fixed costs measured
from real servers, the written configs at the planned size, and a real memory cgroup."""
from __future__ import annotations

import contextlib
import io
import json
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
    for split, row in ((True, plan["split"]), (False, plan["unsplit"])):
        fn = batch_bytes_fn(lambda b: activations.peak(split, b), p.size, p.allocator_slack)
        r, b = row["replicas"], row["batch_size"]
        assert row["predicted_usage_bytes"] == usage_bytes(p.terms, fn, r, b)
        assert row["inflight_images"] == r * b
        # the next batch size does not fit, nor does any shape with more images in flight
        assert b == p.max_batch or usage_bytes(p.terms, fn, r, b + 1) > limit
        more = [(r2, b2) for r2 in range(1, r + 3) for b2 in range(1, p.max_batch + 1) if r2 * b2 > r * b]
        assert all(usage_bytes(p.terms, fn, r2, b2) > limit for r2, b2 in more if b2 <= b + 2 or r2 == 1)
    inflight = {True: plan["inflight_images_split"], False: plan["inflight_images_unsplit"]}
    assert inflight[rec["merge_layer"] is not None] == rec["inflight_images"] == max(inflight.values())


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
