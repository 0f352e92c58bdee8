"""TorchServe handler that runs split-pack inference inside the worker.

Thin glue over :mod:`splitpack.serving.predictor`: the split-pack settings come from the
``handler:`` section of the archive's model-config.yaml (written by
``splitpack archive``), the weights from the archive's serialized state dict.

Each request is isolated by :meth:`Predictor.serve`, the policy the Triton model
runs too: a bad image (not an image, truncated, too large, empty, too small for the
grid) gets HTTP 400 (413 when over a size limit) with a JSON message, a server-side
failure HTTP 500, for that request only; the rest of the batch is served.
"""
from __future__ import annotations

import json
import logging
import os

import torch
from ts.torch_handler.base_handler import BaseHandler

from splitpack.serving.config import ServingConfig
from splitpack.serving.metrics import update_memory_gauges, update_plan_gauges
from splitpack.serving.torchserve.metrics import report_plans_to_torchserve, report_to_torchserve
from splitpack.serving.predictor import BadRequest, InferenceFailed, Predictor
from splitpack.serving.threads import configure_threads

logger = logging.getLogger(__name__)

IMAGE_FIELDS = ("data", "body", "file", "image")


def request_bytes(row) -> bytes | object:
    """The raw image of one request row: the POST body, or a form field named data/file/image."""
    if not isinstance(row, dict):
        return row
    for key in IMAGE_FIELDS:
        if row.get(key) is not None:
            return row[key]
    if len(row) == 1:
        return next(iter(row.values()))
    raise BadRequest(f"no image found: send it as the request body or in a form field named "
                     f"{', '.join(IMAGE_FIELDS)} (got fields {', '.join(sorted(map(str, row)))})")


class SplitPackHandler(BaseHandler):
    """Image classification with split-pack; settings from model-config.yaml ``handler:``."""

    def initialize(self, context):
        """Load the model; if that fails, stay up answering every request at once with HTTP 503 and
        the reason (TorchServe would restart a crashing worker forever while its requests wait)."""
        # Not BaseHandler.initialize: it would try to load our state dict as TorchScript.
        self.context = context
        self.manifest = context.manifest
        self.load_error: str | None = None
        try:
            self._load(context)
        except Exception as err:  # noqa: BLE001 -- reported to every caller and in the model log
            self.load_error = f"model {context.model_name!r} failed to load: {type(err).__name__}: {err}"
            logger.error("splitpack handler: %s; every request is answered 503", self.load_error, exc_info=True)
        self.initialized = True

    def _load(self, context) -> None:
        properties = context.system_properties
        gpu_id = properties.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None:
            self.device = torch.device(f"cuda:{gpu_id}")
        else:
            self.device = torch.device("cpu")

        model_yaml = getattr(context, "model_yaml_config", None) or {}
        config, artifacts = ServingConfig.from_section(dict(model_yaml.get("handler") or {}), "torchserve")
        threads = configure_threads(config.threads, int(model_yaml.get("minWorkers") or 1))
        serialized = self.manifest["model"].get("serializedFile")
        weights = os.path.join(properties.get("model_dir"), serialized) if serialized else None

        self.predictor = Predictor(config, weights=weights, device=self.device, base_dir=properties.get("model_dir"))
        self.predictor.warmup()
        self.model = self.predictor.model
        settings = self.predictor.describe() | threads | {
            "weights": serialized or "random", "weights_source": artifacts.get("weights_source", "file"),
            "batch_size": properties.get("batch_size")}
        logger.info("splitpack handler ready: %s", json.dumps(settings))

    def handle(self, data, context):
        if self.load_error is None:
            return super().handle(data, context)
        for idx in range(len(data)):
            context.set_response_status(503, self.load_error, idx)
        return [{"code": 503, "type": "ModelLoadFailed", "message": self.load_error} for _ in data]

    def preprocess(self, data):
        """Rows -> each request's encoded image, or the BadRequest of a row without one."""
        payloads = []
        for row in data:
            try:
                payloads.append(request_bytes(row))
            except BadRequest as e:
                payloads.append(e)
        return payloads

    def inference(self, data, *args, **kwargs):
        """Per request: probabilities, or its BadRequest / InferenceFailed (Predictor.serve)."""
        outcomes = self.predictor.serve(data)
        metrics, name = self.context.metrics, self.context.model_name
        errors = (update_memory_gauges(lambda values: report_to_torchserve(metrics, values, name), self.device,
                                       self.predictor.last_peak_bytes),
                  update_plan_gauges(lambda plans: report_plans_to_torchserve(metrics, plans, name),
                                     self.predictor.plans()))
        for error in filter(None, errors):  # metrics must never fail a prediction
            logger.warning("splitpack metrics not reported: %r", error)
        return outcomes

    def postprocess(self, data):
        responses = []
        for idx, item in enumerate(data):
            if isinstance(item, (BadRequest, InferenceFailed)):
                self.context.set_response_status(item.status, str(item), idx)
                responses.append({"code": item.status, "type": type(item).__name__, "message": str(item)})
            else:
                responses.append({"predictions": self.predictor.top_k(item[0])})
        for idx in range(len(data)):
            self.context.set_response_header(idx, "x-splitpack-batch-size", str(len(data)))
        return responses
