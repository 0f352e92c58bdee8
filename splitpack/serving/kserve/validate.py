"""Check an InferenceService the way a cluster would, without a cluster.

Two layers, both applied to every manifest splitpack writes:

* :func:`schema_errors`: the ``openAPIV3Schema`` of KServe's own CRD (vendored in ``crd/``, see its
  README for the release), checked with the ``jsonschema`` package (the ``dev`` extra). Fields the
  schema does not declare are errors too: ``kubectl apply`` asks the API server for strict field
  validation, so a misspelt ``scaleMetrics`` is refused there, not silently dropped.
* :func:`kserve_rule_errors`: what KServe's admission webhook adds on top of the schema
  (pkg/apis/serving/v1beta1 of the same release): the name's format, 0 <= minReplicas <= maxReplicas
  (maxReplicas 0 = no bound), containerConcurrency >= 0, the Knative autoscaler's metrics
  (concurrency, rps; an rps target of at least 1), exactly one predictor implementation.
"""
from __future__ import annotations

import copy
import functools
import gzip
import importlib.util
import re
from pathlib import Path
from typing import Any, Mapping

CRD_FILE = Path(__file__).resolve().parent / "crd" / "serving.kserve.io_inferenceservices.yaml.gz"
CRD_VERSION = "v1beta1"
NAME_FORMAT = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # IsvcNameFmt
KNATIVE_METRICS = ("concurrency", "rps")  # AutoscalerAllowedKPAMetricsList
COMPONENTS = ("predictor", "transformer", "explainer")
# the predictor's implementations: exactly one may be set (validateExactlyOneImplementation)
IMPLEMENTATIONS = ("model", "sklearn", "xgboost", "tensorflow", "pytorch", "triton", "onnx", "huggingface", "pmml",
                   "lightgbm", "paddle")


class InvalidManifest(ValueError):
    """A manifest the cluster would refuse; the message lists every reason."""


@functools.lru_cache(maxsize=1)
def isvc_schema() -> dict:
    """The vendored CRD's ``openAPIV3Schema`` for :data:`CRD_VERSION`, with unknown fields made errors."""
    import yaml

    crd = yaml.load(gzip.decompress(CRD_FILE.read_bytes()), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == CRD_VERSION)
    return _closed(copy.deepcopy(version["schema"]["openAPIV3Schema"]))


def _closed(schema: Any) -> Any:
    """Every object schema that lists its properties refuses others (what strict field validation does),
    unless it keeps unknown fields on purpose (``x-kubernetes-preserve-unknown-fields``)."""
    if isinstance(schema, dict):
        for value in schema.values():
            _closed(value)
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        for value in schema:
            _closed(value)
    return schema


def schema_errors(manifest: Mapping[str, Any]) -> list[str]:
    """``path: message`` for each place ``manifest`` breaks the CRD's schema (empty: valid)."""
    try:
        import jsonschema
    except ImportError:
        raise RuntimeError("checking a manifest against the CRD needs the jsonschema package "
                           "(pip install 'splitpack[dev]')") from None
    validator = jsonschema.Draft7Validator(isvc_schema())
    return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in sorted(validator.iter_errors(dict(manifest)), key=lambda e: list(map(str, e.absolute_path)))]


def kserve_rule_errors(manifest: Mapping[str, Any]) -> list[str]:
    """What KServe's webhook refuses beyond the schema (see the module docstring)."""
    errors = []
    name = (manifest.get("metadata") or {}).get("name", "")
    if not NAME_FORMAT.fullmatch(str(name)):
        errors.append(f"metadata.name: {name!r} must match {NAME_FORMAT.pattern} (lower case, digits, '-')")
    spec = manifest.get("spec") or {}
    for component in COMPONENTS:
        if spec.get(component) is not None:
            errors += [f"spec.{component}.{e}" for e in _component_errors(spec[component])]
    implementations = [k for k in IMPLEMENTATIONS if (spec.get("predictor") or {}).get(k) is not None]
    if len(implementations) + bool((spec.get("predictor") or {}).get("containers")) != 1:
        errors.append(f"spec.predictor: exactly one of {', '.join(IMPLEMENTATIONS)} or containers must be set")
    return errors


def _component_errors(component: Mapping[str, Any]) -> list[str]:
    errors = []
    low, high = component.get("minReplicas", 1), component.get("maxReplicas", 0)
    if low < 0:
        errors.append(f"minReplicas: {low} must be >= 0")
    if high < 0:
        errors.append(f"maxReplicas: {high} must be >= 0")
    if high != 0 and low > high:
        errors.append(f"minReplicas: {low} must be <= maxReplicas ({high})")
    if component.get("containerConcurrency", 0) < 0:
        errors.append(f"containerConcurrency: {component['containerConcurrency']} must be >= 0")
    metric = component.get("scaleMetric", "concurrency")
    if metric not in KNATIVE_METRICS:
        errors.append(f"scaleMetric: {metric!r} is not a Knative autoscaler metric ({', '.join(KNATIVE_METRICS)})")
    if metric == "rps" and component.get("scaleTarget", 1) < 1:
        errors.append("scaleTarget: the target for rps must be at least 1")
    return errors


def check_manifest(manifest: Mapping[str, Any], schema: bool | None = True) -> None:
    """Raise :class:`InvalidManifest` listing every problem: the CRD's (with ``schema``; None: when the
    jsonschema package is installed), then, on a manifest of the right shape, KServe's rules (which assume
    the schema's types, as the webhook does)."""
    if schema is None:
        schema = importlib.util.find_spec("jsonschema") is not None
    errors = schema_errors(manifest) if schema else []
    errors = errors or kserve_rule_errors(manifest)
    if errors:
        name = (manifest.get("metadata") or {}).get("name", "?")
        raise InvalidManifest(f"InferenceService {name!r} would be refused: " + "; ".join(errors))
