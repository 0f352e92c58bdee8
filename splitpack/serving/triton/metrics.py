"""splitpack's gauges (:mod:`splitpack.serving.metrics`) as Triton python-backend metric families."""
from __future__ import annotations

from typing import Any

from splitpack.serving.metrics import METRICS, PLAN_METRICS, plan_series


class TritonMemoryMetrics:
    """Triton python-backend gauges for :data:`METRICS`, created once per model instance.

    ``pb_utils`` is the ``triton_python_backend_utils`` module (only importable
    inside the stub, hence passed in). Families are kept alive here: Triton
    requires a family to outlive its metrics.
    """

    def __init__(self, pb_utils: Any, labels: dict[str, str]):
        self._families = {
            name: pb_utils.MetricFamily(name=name, description=help_text, kind=pb_utils.MetricFamily.GAUGE)
            for name, (_, help_text) in METRICS.items()
        }
        self._metrics = {name: fam.Metric(labels=labels) for name, fam in self._families.items()}

    def update(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            self._metrics[name].set(float(value))


class TritonPlanMetrics:
    """Triton python-backend gauges for :data:`PLAN_METRICS`: one series per resolved plan."""

    def __init__(self, pb_utils: Any, labels: dict[str, str]):
        self._labels = labels
        self._families = {
            name: pb_utils.MetricFamily(name=name, description=help_text, kind=pb_utils.MetricFamily.GAUGE)
            for name, (_, help_text) in PLAN_METRICS.items()
        }
        self._metrics: dict[tuple, Any] = {}

    def update(self, plans: list[dict]) -> None:
        for labels, values in plan_series(plans):
            for name, value in values.items():
                key = (name, labels["plan"], labels["input_size"])
                if key not in self._metrics:
                    self._metrics[key] = self._families[name].Metric(labels=self._labels | labels)
                self._metrics[key].set(float(value))


class TritonGauges:
    """Both gauge families of one model instance, as the replica pushes them (:class:`splitpack.serving.replica.Gauges`)."""

    def __init__(self, pb_utils: Any, labels: dict[str, str]):
        self.plan_metrics = TritonPlanMetrics(pb_utils, labels)
        self.memory_metrics = TritonMemoryMetrics(pb_utils, labels)

    def memory(self, values: dict[str, float]) -> None:
        self.memory_metrics.update(values)

    def plans(self, plans: list[dict]) -> None:
        self.plan_metrics.update(plans)
