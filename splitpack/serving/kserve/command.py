"""``splitpack capacity --write-kserve DIR``: its flags and the writer the capacity command calls."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Mapping

from splitpack.argtypes import arg_type, positive_int
from splitpack.measure.units import parse_bytes

OPTIONS = ("storage_uri", "min_pods", "max_pods", "pod_memory", "quiet")
# serving parameters the stock-runtime flavours do not run: the artifact is one input size's program
UNSUPPORTED = ("native_resolution", "max_side", "min_side", "compile", "cuda_graphs", "threads", "memory_budget",
               "max_overhead", "max_latency", "measure_latency", "heap")


def pod_count(text: str) -> int:
    """--min-pods: 0 lets Knative scale the service to zero."""
    value = int(text)
    if value < 0:
        raise ValueError(f"must be >= 0, got {value}")
    return value


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--storage-uri", metavar="URI",
                       help="where DIR/<flavour>/storage is uploaded, as BASE: the manifests read BASE/torchserve "
                            "and BASE/triton (default: pvc://splitpack-models/<service>)")
    group.add_argument("--min-pods", type=arg_type(pod_count, "count"), default=1,
                       help="minReplicas: pods kept running (default 1; 0 lets Knative scale to zero)")
    group.add_argument("--max-pods", type=arg_type(positive_int, "count"), default=1,
                       help="maxReplicas: the autoscaler's ceiling (default 1)")
    group.add_argument("--pod-memory", type=arg_type(lambda t: parse_bytes(t) and t, "size"),
                       help="the pod's memory limit (default: CPU pods the memory planned for, GPU pods a host "
                            "allowance per worker)")


def write_into(plan: dict, stage: Path, name: str, settings: Mapping[str, Any], *, pretrained: bool = False,
               weights: str | None = None, allow_pickle: bool = False, storage_uri: str | None = None,
               min_pods: int = 1, max_pods: int = 1, pod_memory: str | None = None, quiet: bool = False) -> None:
    """Both flavours for the plan's recommendation into ``stage`` (an empty folder the caller publishes)."""
    from splitpack.serving.config import deploy_settings
    from splitpack.serving.deploy import planned_settings
    from splitpack.serving.kserve.plan import from_capacity
    from splitpack.serving.kserve.storage import write_kserve_into

    unsupported = [k for k in UNSUPPORTED if settings.get(k) is not None]
    if unsupported:
        raise ValueError(f"--write-kserve: --{unsupported[0].replace('_', '-')} is not a setting of the stock-runtime "
                         "deployment (it runs one input size's recorded program)")
    config, deploy = planned_settings(plan, settings, "torchserve")
    kplan = from_capacity(plan, deploy_settings("torchserve", deploy), min_pods=min_pods, max_pods=max_pods,
                          pod_memory_bytes=parse_bytes(pod_memory) if pod_memory else None)
    command = (f"splitpack capacity --model {plan['model']} --size {plan['size']} --batch-size {plan['batch_size']} "
               f"... --write-kserve DIR (plan: {kplan.plan_text}, {kplan.workers} workers per pod)")
    write_kserve_into(kplan, stage, config=config, storage_uri=storage_uri, pretrained=pretrained, weights=weights,
                      allow_pickle=allow_pickle, command=command,
                      log=(lambda message: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True)))
