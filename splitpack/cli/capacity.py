"""Plan replicas per GPU, unsplit and with split-pack, and write the config that deploys the plan."""
from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

from splitpack.capacity.footprint import (BACKEND_HELP, BACKENDS, CONTEXT_OVERHEAD_SOURCE, DEFAULT_ALLOCATOR_SLACK,
                                          DEFAULT_CONTEXT_OVERHEAD, PYTHON, parse_fraction, parse_headroom)
from splitpack.capacity.planner import PlanInputs, plan_capacity
from splitpack.cli import arg_type, common
from splitpack.core.plan.spec import parse_grid
from splitpack.measure.units import GiB, MiB, parse_bytes
from splitpack.publish import staged_path
from splitpack.cli.params import add_flags, given
from splitpack.serving.config import MODEL_ARG_PARAMS
from splitpack.serving.backend import CapacityWriter, backends
from splitpack.serving.deploy import PLANNED
from splitpack.capacity.fixed_costs import DEFAULT_CACHE, SERVERS
from splitpack.capacity.shape import DEFAULT_MAX_BATCH
from splitpack.capacity.pod import (DEFAULT_CPUS_PER_WORKER, DEFAULT_POD_CPUS, DEFAULT_POD_HOST_MEMORY,
                                    HOST_BYTES_PER_WORKER, HOST_BYTES_SERVER, GpuPod)

GPU_HEADROOM = "10%"
# Under a real memory limit a worker uses more per image than the formula counts (the heap keeps freed
# blocks, the decoded and padded copies of the batch): ResNet-50 @1024 split-pack, batch 29, peaked
# above the prediction by about 10% of a 3 GiB limit in a cgroup (BENCHMARKS.md), and a plan at the
# limit itself was OOM-killed. Kept free until the formula counts it.
MEMORY_LIMIT_HEADROOM = "15%"
WRITTEN_DEFAULTS = {"instance_kind": "gpu"}  # a --gpu-memory plan is for a GPU; a --memory-limit plan for the CPU


def memory_size(text: str) -> str:
    """A memory size as given ("80GiB"), checked now so a typo fails before anything is measured."""
    parse_bytes(text)
    return text


def seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"must be positive, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_model(parser, "ship in the written configs:")
    common.add_input(parser, batch_help="batch size each replica runs (default: 1)")
    parser.add_argument("--gpu-memory", type=arg_type(memory_size),
                        help="GPU memory to plan for (80GiB, 80GB, ...); default: NVML total of --gpu-index")
    parser.add_argument("--gpu-index", type=int, default=0)
    limit = parser.add_argument_group("deployment shape under a memory limit", "plan replicas x batch size for the "
                                      "most images in flight within a host/pod memory limit (--device cpu), with "
                                      "the server's fixed costs measured on this machine")
    limit.add_argument("--memory-limit", type=arg_type(memory_size),
                       help="the pod/host memory limit to plan for (3GiB, ...): plans the deployment shape")
    limit.add_argument("--server", choices=SERVERS, default="torchserve",
                       help="whose fixed costs to measure and plan with (default: torchserve)")
    limit.add_argument("--largest-batch", type=arg_type(common.positive_int, "batch size"), default=DEFAULT_MAX_BATCH,
                       help=f"largest batch to consider (default {DEFAULT_MAX_BATCH})")
    limit.add_argument("--fixed-costs", type=Path, default=DEFAULT_CACHE, metavar="JSON",
                       help=f"cache of the measured fixed costs (default {DEFAULT_CACHE})")
    limit.add_argument("--remeasure", action="store_true", help="measure the fixed costs again, ignoring the cache")
    limit.add_argument("--validate", action="store_true",
                       help="start the written deployment inside a memory cgroup set to the limit, drive it with "
                            "as many clients as images in flight, then the unsplit model in the same shape "
                            "(exit 2 where no memory cgroup can be made)")
    limit.add_argument("--duration", type=arg_type(seconds, "seconds"), default=60.0,
                       help="--validate: seconds to drive each deployment (default 60)")
    gpu_pod = parser.add_argument_group("deployment shape on a GPU", "with --gpu-memory: --search-batch plans one GPU "
                                        "pod, workers x batch size for the most images in flight on its GPU, the "
                                        "workers bounded by the pod's cores and host memory (planned, not measured: "
                                        "the CUDA context and the host memory per worker are assumed); a GPU plan's "
                                        "pod asks for the CPUs and host memory of its workers")
    gpu_pod.add_argument("--search-batch", action="store_true",
                         help="search workers x batch size (up to --largest-batch) instead of replicas at one "
                              "--batch-size")
    gpu_pod.add_argument("--pod-cpus", type=arg_type(common.positive_int, "count"), default=DEFAULT_POD_CPUS,
                         help=f"CPU cores one GPU pod may have (default {DEFAULT_POD_CPUS})")
    gpu_pod.add_argument("--cpus-per-worker", type=arg_type(common.positive_int, "count"),
                         default=DEFAULT_CPUS_PER_WORKER,
                         help=f"cores each worker gets: decoding, batching, kernel launches (default "
                              f"{DEFAULT_CPUS_PER_WORKER})")
    gpu_pod.add_argument("--pod-host-memory", type=arg_type(memory_size),
                         default=f"{DEFAULT_POD_HOST_MEMORY // GiB}GiB",
                         help=f"host memory one GPU pod may have (default {DEFAULT_POD_HOST_MEMORY // GiB}GiB; "
                              f"{HOST_BYTES_SERVER // GiB} GiB for the server + {HOST_BYTES_PER_WORKER // GiB} GiB per "
                              "worker, assumed)")
    parser.add_argument("--headroom", help=f"kept free: a percentage of the GPU or memory limit, or a size (default "
                                           f"{GPU_HEADROOM} of a GPU, {MEMORY_LIMIT_HEADROOM} of a --memory-limit)"
                        .replace("%", "%%"))  # argparse formats help strings with %
    parser.add_argument("--merge-layers", nargs="*", metavar="LAYER",
                        help="merge layers to measure, one-stage plans at each of --grids (default: the planner's "
                             "staged plans)")
    parser.add_argument("--grids", nargs="*", type=arg_type(parse_grid, "grid"), default=[(2, 2)], metavar="RxC",
                        help="grids to measure --merge-layers at (default 2x2)")
    parser.add_argument("--modes", nargs="*", default=["exact"], choices=common.MODES,
                        help="modes to measure (default exact; seed changes outputs)")
    parser.add_argument("--max-candidates", type=arg_type(common.positive_int, "count"), default=3,
                        help="without --merge-layers: measure the planner's plan within this many MACs caps "
                             "(1.25x, 1.1x, 1.5x, 2x)")
    parser.add_argument("--context-overhead", type=arg_type(memory_size),
                        help=f"per-process CUDA context etc. (default {DEFAULT_CONTEXT_OVERHEAD // MiB} MiB)")
    parser.add_argument("--allocator-slack", type=arg_type(parse_fraction, "fraction"), default=DEFAULT_ALLOCATOR_SLACK,
                        help="extra fraction of peak activations for the caching allocator (default 10%%)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per configuration (0: no latency)")
    parser.add_argument("--max-latency-ratio", type=float, help="ignore split candidates slower than this")
    common.add_device(parser)
    parser.add_argument("--measure-replicas", action="store_true",
                        help="with --device cuda: run each configuration as a real replica process and plan "
                             "with NVML's per-process memory instead of the modelled footprint")
    parser.add_argument("--backend", choices=BACKENDS, default=PYTHON,
                        help="what replicas share: " + "; ".join(f"{k}: {v}" for k, v in BACKEND_HELP.items())
                             + " (default: python)")
    parser.add_argument("--weight-sharing", action="store_true",
                        help="--backend libtorch: the instances share one copy of the weights (ENABLE_WEIGHT_SHARING)")
    common.add_json(parser, "the plan")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--png", help="write a plot of the plan here")
    flags = "/".join(f"--write-{name}" for name in capacity_writers())
    written = parser.add_argument_group("written configs", f"{flags} deploy the recommendation; the plan sets "
                                        + ", ".join(PLANNED) + ", these the rest")
    for name, writer in capacity_writers().items():
        written.add_argument(f"--write-{name}", dest=_dest(name), metavar=writer.flag, help=writer.help)
    for name, writer in capacity_writers().items():
        if writer.add_arguments is not None:
            writer.add_arguments(parser.add_argument_group(f"--write-{name}", f"settings of --write-{name}"))
    add_flags(written, None, exclude=PLANNED + tuple(p.name for p in MODEL_ARG_PARAMS), defaults=WRITTEN_DEFAULTS)


def capacity_writers() -> dict[str, CapacityWriter]:
    """Every backend that can write the config deploying a plan (``--write-<backend>``)."""
    return {name: b.capacity for name, b in backends().items() if b.capacity is not None}


def _dest(name: str) -> str:
    return "write_" + name.replace("-", "_")


def _written(args: argparse.Namespace) -> dict[str, str]:
    """backend -> the destination its --write-<backend> names."""
    return {name: getattr(args, _dest(name)) for name in capacity_writers() if getattr(args, _dest(name))}


def detect_gpu_memory(index: int = 0) -> tuple[int, str]:
    """(total bytes, description) of GPU ``index`` via NVML; ValueError without a driver."""
    from splitpack.measure.nvml import NvmlUnavailable, gpu_memory

    try:
        gpu = gpu_memory(index)
    except NvmlUnavailable as e:
        raise ValueError(f"cannot detect the GPU's memory ({e}); pass --gpu-memory, e.g. 80GiB") from None
    return gpu.total_bytes, f"nvml: GPU {index} {gpu.name} ({gpu.total_bytes / GiB:.1f} GiB total)"


def _gpu_memory(args: argparse.Namespace) -> tuple[int, str]:
    """(bytes, source) of the GPU memory planned for: --gpu-memory, else NVML's total."""
    if args.gpu_memory:
        return parse_bytes(args.gpu_memory), f"--gpu-memory {args.gpu_memory}"
    return detect_gpu_memory(args.gpu_index)


def _context_overhead(args: argparse.Namespace) -> tuple[int, str]:
    """(bytes, source) of one process's CUDA context: --context-overhead, else the assumed default."""
    if args.context_overhead is not None:
        return parse_bytes(args.context_overhead), f"--context-overhead {args.context_overhead}"
    return DEFAULT_CONTEXT_OVERHEAD, CONTEXT_OVERHEAD_SOURCE


def _inputs_from_args(args: argparse.Namespace) -> PlanInputs:
    gpu_bytes, source = _gpu_memory(args)
    context, context_source = _context_overhead(args)
    if args.measure_replicas and not str(args.device).startswith("cuda"):
        raise ValueError("--measure-replicas needs --device cuda (it measures replica processes with NVML)")
    _check_backend(args)
    spec = common.model_spec(args)
    return PlanInputs(
        model=spec.title, model_spec=spec, model_flags=tuple(_probe_model_flags(args)), size=args.size,
        batch_size=args.batch_size, gpu_memory_bytes=gpu_bytes,
        gpu_memory_source=source, headroom_bytes=parse_headroom(args.headroom or GPU_HEADROOM, gpu_bytes),
        merge_layers=args.merge_layers or None, grids=list(dict.fromkeys(args.grids)),
        modes=list(dict.fromkeys(args.modes)), max_candidates=args.max_candidates, context_overhead_bytes=context,
        context_overhead_source=context_source, allocator_slack=args.allocator_slack, repeats=args.repeats,
        max_latency_ratio=args.max_latency_ratio, device=args.device, measure_replicas=args.measure_replicas,
        backend=args.backend, weight_sharing=args.weight_sharing, pod=_gpu_pod(args),
    )


def _gpu_pod(args: argparse.Namespace) -> GpuPod:
    """What one GPU pod gives its workers: the bound of --search-batch, the pod of both GPU plans."""
    return GpuPod(args.pod_cpus, args.cpus_per_worker, parse_bytes(args.pod_host_memory))


def _probe_model_flags(args: argparse.Namespace) -> list[str]:
    """The model's flags for `splitpack replica-probe` (random weights: memory does not depend on them)."""
    flags = common.model_flags(args)
    return flags[:flags.index("--weights")] if "--weights" in flags else [f for f in flags if f != "--pretrained"]


def _check_backend(args: argparse.Namespace) -> None:
    if args.backend == PYTHON:
        if args.weight_sharing:
            raise ValueError("--weight-sharing is a setting of --backend libtorch (python-backend replicas are "
                             "processes with their own weights)")
        return
    if args.measure_replicas:
        raise ValueError("--measure-replicas starts one process per replica: --backend python only")
    if _written(args):
        flags = "/".join(f"--write-{name}" for name in capacity_writers())
        raise ValueError(f"{flags} deploy the python backend; for --backend libtorch write the model directory "
                         "with `splitpack export --format triton-libtorch` and the recommended plan and replicas")


def run(args: argparse.Namespace) -> int:
    from splitpack.capacity.report import format_plan

    common.build_model(args)  # a model, weights or labels that do not fit: found out before minutes of measuring
    if args.memory_limit or args.search_batch:
        return run_memory_limit(args)
    if args.validate:
        raise ValueError("--validate proves a plan under a memory limit: give --memory-limit")
    plan = plan_capacity(_inputs_from_args(args), quiet=args.quiet)
    _write_outputs(plan, args)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


def run_memory_limit(args: argparse.Namespace) -> int:
    """--memory-limit (a host/pod limit) or --search-batch (a GPU pod): the deployment shape with the most
    images in flight; --validate proves a --memory-limit plan."""
    from splitpack.capacity.report import format_shape
    from splitpack.capacity.shape import plan_shape

    if args.search_batch:
        _check_gpu_shape(args)
    elif args.device != "cpu":
        raise ValueError("--memory-limit plans a host/pod limit with fixed costs measured from CPU servers: "
                         "--device cpu (for a GPU use --gpu-memory)")
    cgroup = _cgroup_check() if args.validate else None
    if cgroup:
        raise CgroupUnavailableError(cgroup)
    inputs, activations = _shape_inputs(args)
    plan = plan_shape(inputs, activations, quiet=args.quiet)
    _write_outputs(plan, args)
    if args.validate:
        from splitpack.capacity.validate import validate_plan
        from splitpack.serving.plan_deployment import Deployment

        plan["validation"] = validate_plan(Deployment.write, plan, args.duration, _written_settings(args),
                                           quiet=args.quiet, pretrained=args.pretrained, weights=args.weights,
                                           allow_pickle=args.allow_pickle)
    print(json.dumps(plan, indent=2) if args.json else format_shape(plan))
    return 0


class CgroupUnavailableError(ValueError):
    """No memory cgroup here: a usage error of --validate on this machine (exit 2 with the reason)."""


def _cgroup_check() -> str | None:
    """None if a memory cgroup can be made here, else why not."""
    from splitpack.capacity.cgroup import CgroupUnavailable, MemoryCgroup

    try:
        MemoryCgroup(1 << 30).remove()
    except (CgroupUnavailable, OSError) as e:
        return f"--validate needs a memory cgroup and none can be made here: {e}"
    return None


def _check_gpu_shape(args: argparse.Namespace) -> None:
    if args.memory_limit:
        raise ValueError("--search-batch plans a GPU (--gpu-memory), --memory-limit a host/pod limit: give one")
    if args.validate:
        raise ValueError("--validate proves a plan under a memory limit: give --memory-limit")
    if args.device != "cpu" or args.measure_replicas or args.backend != PYTHON:
        raise ValueError("--search-batch plans TorchServe workers / Triton python-backend instances from the cost "
                         "model's activations and assumed GPU terms: --device cpu, --backend python, no "
                         "--measure-replicas")


def _gpu_shape_inputs(args: argparse.Namespace, activations):
    """--search-batch: the GPU's memory with the CUDA context and the weights per worker (assumed terms)."""
    from splitpack.capacity.shape import ShapeInputs, Terms

    gpu_bytes, source = _gpu_memory(args)
    context, context_source = _context_overhead(args)
    terms = Terms(server_bytes=0, process_bytes=context, weights_bytes=activations.weights_bytes)
    return ShapeInputs(args.model_name, args.size, args.server, gpu_bytes, source, terms,
                       f"CUDA context per worker: {context_source}; the server is host memory, not the GPU's",
                       device="gpu", allocator_slack=args.allocator_slack, max_batch=args.largest_batch,
                       headroom_bytes=parse_headroom(args.headroom or GPU_HEADROOM, gpu_bytes), pod=_gpu_pod(args))


def _shape_inputs(args: argparse.Namespace):
    from splitpack.capacity.fixed_costs import fixed_costs
    from splitpack.capacity.shape import ActivationModel, ShapeInputs, Terms
    from splitpack.serving.plan_deployment import Deployment

    model = args.model_name
    if not model or getattr(args, "model_class", None):
        raise ValueError("--memory-limit and --search-batch plan a timm/torchvision model named with --model")
    activations = ActivationModel(model, args.size)
    if args.search_batch:
        return _gpu_shape_inputs(args, activations), activations
    costs = fixed_costs(args.server, model, activations.weights_bytes, Deployment.write, args.fixed_costs,
                        args.remeasure, quiet=args.quiet)
    terms = Terms(costs.server_bytes, costs.process_bytes, costs.weights_bytes)
    limit = parse_bytes(args.memory_limit)
    inputs = ShapeInputs(model, args.size, args.server, limit, f"--memory-limit {args.memory_limit}", terms,
                         costs.measured, allocator_slack=args.allocator_slack, max_batch=args.largest_batch,
                         headroom_bytes=parse_headroom(args.headroom or MEMORY_LIMIT_HEADROOM, limit))
    return inputs, activations


def _written_settings(args: argparse.Namespace) -> dict:
    defaults = WRITTEN_DEFAULTS | ({"instance_kind": "cpu"} if args.memory_limit else {})  # --search-batch: gpu
    return defaults | {k: v for k, v in given(args).items() if k not in PLANNED}


def _write_outputs(plan: dict, args: argparse.Namespace) -> None:
    """--png and each --write-<backend>: each built in a staging place, all moved into place
    once every one of them is complete (one failing leaves none)."""
    from splitpack.capacity.report import plot_plan

    settings = _written_settings(args)
    weights = {"pretrained": args.pretrained, "weights": args.weights, "allow_pickle": args.allow_pickle}
    writers = capacity_writers()
    with contextlib.ExitStack() as outputs:
        for name, dest in _written(args).items():
            writer = writers[name]
            target = writer.target(plan, Path(dest))
            stage = outputs.enter_context(staged_path(target, directory=writer.directory))
            options = {option: getattr(args, option) for option in writer.options}
            writer.write_into(plan, stage, target.name, settings, **weights, **options)
            plan[writer.plan_key] = str(target)
        if args.png:
            plot_plan(plan, outputs.enter_context(staged_path(args.png)))
            plan["png"] = args.png
