"""splitpack's gauges (:mod:`splitpack.serving.metrics`) as TorchServe metrics: emitted through a handler's
``context.metrics`` and declared in the metrics config prometheus mode needs."""
from __future__ import annotations

from typing import Any

from splitpack.serving.metrics import METRICS, PLAN_METRICS, plan_series


def report_to_torchserve(metrics_cache: Any, values: dict[str, float], model_name: str) -> None:
    """Emit ``values`` as TorchServe gauges (``context.metrics`` of a handler).

    Dimensions are fixed (ModelName, Level=Model) so every emission matches the
    declaration in :func:`torchserve_metrics_yaml`.
    """
    from ts.metrics.dimension import Dimension
    from ts.metrics.metric_type_enum import MetricTypes

    for name, value in values.items():
        dims = [Dimension("ModelName", model_name), Dimension("Level", "Model")]
        metrics_cache.add_metric(name, value, METRICS[name][0], dimensions=dims,
                                 metric_type=MetricTypes.GAUGE)


def report_plans_to_torchserve(metrics_cache: Any, plans: list[dict], model_name: str) -> None:
    """Emit the resolved plans' gauges (dimensions ModelName, Level, Plan, InputSize)."""
    from ts.metrics.dimension import Dimension
    from ts.metrics.metric_type_enum import MetricTypes

    for labels, values in plan_series(plans):
        dims = [Dimension("ModelName", model_name), Dimension("Level", "Model"), Dimension("Plan", labels["plan"]),
                Dimension("InputSize", labels["input_size"])]
        for name, value in values.items():
            metrics_cache.add_metric(name, value, PLAN_METRICS[name][0], dimensions=dims,
                                     metric_type=MetricTypes.GAUGE)


def torchserve_metrics_yaml() -> str:
    """TorchServe's default metrics config with the splitpack gauges declared.

    Prometheus mode only exports model metrics declared in the config (unless
    ``model_metrics_auto_detect=true``): point ``metrics_config`` in
    config.properties at a file with this text.
    """
    import importlib.resources

    import yaml

    base = yaml.safe_load(importlib.resources.files("ts").joinpath("configs/metrics.yaml").read_text())
    gauges = base.setdefault("model_metrics", {}).setdefault("gauge", [])
    known = {g["name"] for g in gauges}
    for name, (unit, _) in METRICS.items():
        if name not in known:
            gauges.append({"name": name, "unit": unit, "dimensions": ["ModelName", "Level"]})
    for name, (unit, _) in PLAN_METRICS.items():
        if name not in known:
            gauges.append({"name": name, "unit": unit, "dimensions": ["ModelName", "Level", "Plan", "InputSize"]})
    return yaml.safe_dump(base, sort_keys=False)


class TorchServeGauges:
    """splitpack's gauges through the handler's ``context.metrics`` (read at each update: TorchServe owns it)."""

    def __init__(self, context):
        self.context = context

    def memory(self, values: dict[str, float]) -> None:
        report_to_torchserve(self.context.metrics, values, self.context.model_name)

    def plans(self, plans: list[dict]) -> None:
        report_plans_to_torchserve(self.context.metrics, plans, self.context.model_name)
