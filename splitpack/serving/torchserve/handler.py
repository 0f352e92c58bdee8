"""TorchServe handler that runs split-pack inference inside the worker.

Thin glue over :mod:`splitpack.serving.predictor`: the split-pack settings come from the
``handler:`` section of the archive's model-config.yaml (written by
``splitpack archive``), the weights from the archive's serialized state dict.

Per-request errors (not an image, truncated, too large, empty) get HTTP 400 with
a JSON message for that request only; the rest of the batch is served.
"""
from __future__ import annotations

import json
import logging
import os

import torch
from ts.torch_handler.base_handler import BaseHandler

from splitpack.measure.meter import peak_meter
from splitpack.serving.config import ServingConfig
from splitpack.serving.metrics import device_memory_metrics, report_to_torchserve
from splitpack.serving.predictor import BadRequest, Predictor

logger = logging.getLogger(__name__)

# handler-section keys that describe the archive, not the serving behaviour
ARCHIVE_KEYS = ("weights_source",)


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
        # Not BaseHandler.initialize: it would try to load our state dict as TorchScript.
        self.context = context
        self.manifest = context.manifest
        properties = context.system_properties
        gpu_id = properties.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None:
            self.device = torch.device(f"cuda:{gpu_id}")
        else:
            self.device = torch.device("cpu")

        section = dict((getattr(context, "model_yaml_config", None) or {}).get("handler") or {})
        source = section.get("weights_source", "file")
        config = ServingConfig.from_mapping({k: v for k, v in section.items() if k not in ARCHIVE_KEYS})
        serialized = self.manifest["model"].get("serializedFile")
        weights = os.path.join(properties.get("model_dir"), serialized) if serialized else None

        self.predictor = Predictor(config, weights=weights, device=self.device)
        self.predictor.warmup()
        self.model = self.predictor.model
        settings = self.predictor.describe() | {"weights": serialized or "random", "weights_source": source,
                                                "batch_size": properties.get("batch_size")}
        logger.info("splitpack handler ready: %s", json.dumps(settings))
        self.initialized = True

    def preprocess(self, data):
        """Rows -> CHW tensors; a bad row becomes its BadRequest (served as a 400)."""
        items = []
        for row in data:
            try:
                items.append(self.predictor.decode(request_bytes(row)))
            except BadRequest as e:
                items.append(e)
        return items

    def inference(self, data, *args, **kwargs):
        """Probabilities for the good rows (same-size images batched together); a row the
        model cannot run becomes its BadRequest, the others are still served."""
        good = [i for i, item in enumerate(data) if not isinstance(item, BadRequest)]
        out = list(data)
        # CUDA: the allocator's per-batch peak is free to read; the CPU tracker would slow every batch
        with peak_meter(self.device, enabled=self.device.type == "cuda") as meter:
            rows = self.predictor.predict_isolated([data[i] for i in good])
        for i, row in zip(good, rows):
            out[i] = row
        self._report_memory(meter.peak)
        return out

    def _report_memory(self, peak_bytes) -> None:
        try:
            report_to_torchserve(self.context.metrics, device_memory_metrics(self.device, peak_bytes),
                                 self.context.model_name)
        except Exception:  # metrics must never fail a prediction
            logger.warning("splitpack memory metrics not reported", exc_info=True)

    def postprocess(self, data):
        responses = []
        for idx, item in enumerate(data):
            if isinstance(item, BadRequest):
                self.context.set_response_status(item.status, str(item), idx)
                responses.append({"code": item.status, "type": type(item).__name__, "message": str(item)})
            else:
                responses.append({"predictions": self.predictor.top_k(item)})
        for idx in range(len(data)):
            self.context.set_response_header(idx, "x-splitpack-batch-size", str(len(data)))
        return responses
