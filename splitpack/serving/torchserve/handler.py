"""TorchServe handler that runs split-pack inference inside the worker.

Thin glue over :class:`splitpack.serving.replica.Replica` (loading, serving, gauges, error mapping,
shared with the Triton model): the split-pack settings come from the ``handler:`` section of the
archive's model-config.yaml (written by ``splitpack archive``), the weights from the archive's
serialized state dict. What is TorchServe's here: request rows in, JSON and HTTP statuses out.

Each request is isolated by the replica: a bad image (not an image, truncated, too large, empty, too small for the
grid) gets HTTP 400 (413 when over a size limit) with a JSON message, a server-side
failure HTTP 500, for that request only; the rest of the batch is served.
"""
from __future__ import annotations

import json
import logging
import os

import torch
from ts.torch_handler.base_handler import BaseHandler

from splitpack.serving.predictor import BadRequest
from splitpack.serving.replica import Replica, answer
from splitpack.serving.torchserve.metrics import TorchServeGauges

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


# TorchServe loads a handler file with exactly one class: helpers live in other modules.
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
        serialized = self.manifest["model"].get("serializedFile")
        weights = os.path.join(properties.get("model_dir"), serialized) if serialized else None
        self.replica = Replica(model_yaml.get("handler") or {}, "torchserve", replicas=int(model_yaml.get("minWorkers") or 1),
                               weights=lambda artifacts: weights, device=self.device, base_dir=properties.get("model_dir"),
                               warn=logger.warning, batch_size=int(properties.get("batch_size") or 1))
        self.replica.gauges = TorchServeGauges(context)
        self.predictor = self.replica.predictor
        self.model = self.predictor.model
        settings = self.replica.describe() | {
            "weights": serialized or "random", "weights_source": self.replica.artifacts.get("weights_source", "file"),
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
        """Per request: probabilities, or its BadRequest / InferenceFailed (the replica's policy)."""
        return self.replica.serve(data)

    def postprocess(self, data):
        def refuse(error, idx: int) -> dict:
            self.context.set_response_status(error.status, str(error), idx)
            return {"code": error.status, "type": type(error).__name__, "message": str(error)}

        responses = [answer(item, lambda probs: {"predictions": self.predictor.top_k(probs[0])},
                            lambda error, idx=idx: refuse(error, idx)) for idx, item in enumerate(data)]
        for idx in range(len(data)):
            self.context.set_response_header(idx, "x-splitpack-batch-size", str(len(data)))
        return responses

