"""TorchServe handler for KServe's stock TorchServe image: no splitpack, no timm inside the pod.

This file is copied into the .mar that ``splitpack capacity --write-kserve`` writes, next to:

* the serialized file: the split-pack program at one input size as TorchScript (``splitpack export
  --format torchscript``): plain aten calls with the weights as constants, loaded with
  ``torch.jit.load``;
* ``splitpack_decode.py``: splitpack's image decoder (``splitpack/serving/decode.py``, which needs
  only PIL and numpy), so size limits, 16-bit, palette, CMYK, alpha, EXIF orientation and the first
  frame of an animation are handled as the plugin handles them;
* ``splitpack_model.json``: the eval transform the weights expect (resize, crop, mean, std at the
  artifact's input size), the labels, top-k and the decoding limits.

It imports only what the stock image has: torch, torchvision, PIL, numpy and TorchServe's ``ts``.
Answers keep the plugin's shape: ``{"predictions": [{"index", "label", "probability"}, ...]}`` per
image; a bad image gets 400 (413 over a size limit) for that request only.
"""
from __future__ import annotations

import base64
import json
import logging
import os

import torch
from torchvision import transforms
from ts.torch_handler.base_handler import BaseHandler

import splitpack_decode as decode  # shipped in the archive (see above)

logger = logging.getLogger(__name__)

META_FILE = "splitpack_model.json"
IMAGE_FIELDS = ("data", "body", "file", "image")


def eval_transform(meta: dict) -> transforms.Compose:
    """timm's eval transform (transforms_imagenet_eval) for the meta's crop mode, at the artifact's size."""
    size, scale = meta["input_size"], meta["scale_size"]
    interpolation = transforms.InterpolationMode(meta["interpolation"])
    resize = transforms.Resize(scale if meta["crop_mode"] == "center" else (scale, scale), interpolation=interpolation)
    return transforms.Compose([resize, transforms.CenterCrop(size), transforms.ToTensor(),
                               transforms.Normalize(mean=torch.tensor(meta["mean"]), std=torch.tensor(meta["std"]))])


def image_bytes(row) -> bytes:
    """One request row's encoded image: the raw body, or a base64 string (KServe's v1 ``instances``)."""
    value = row
    if isinstance(row, dict):
        value = next((row[k] for k in IMAGE_FIELDS if row.get(k) is not None), None)
        if value is None:
            raise decode.BadRequest(f"no image found: send it as the body or in a field named {', '.join(IMAGE_FIELDS)}")
    if isinstance(value, dict) and "b64" in value:
        value = value["b64"]
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            raise decode.BadRequest("the image field is text but not base64") from None
    return value


class StockHandler(BaseHandler):
    def initialize(self, context):
        # Not BaseHandler.initialize: it would look for a model file or an eager model class.
        properties = context.system_properties
        model_dir = properties["model_dir"]
        with open(os.path.join(model_dir, META_FILE)) as f:
            self.meta = json.load(f)
        gpu_id = properties.get("gpu_id")
        cuda = torch.cuda.is_available() and gpu_id is not None
        self.device = torch.device(f"cuda:{gpu_id}" if cuda else "cpu")
        if not cuda:
            torch.set_num_threads(self.meta["threads"])
        serialized = os.path.join(model_dir, context.manifest["model"]["serializedFile"])
        self.model = torch.jit.load(serialized, map_location=self.device).eval()
        self.transform = eval_transform(self.meta)
        self.context = context
        self.initialized = True
        logger.info("splitpack stock handler ready: %s @%s, plan %s on %s", self.meta["model"],
                    self.meta["input_size"], self.meta["plan"], self.device)

    def preprocess(self, data):
        """Rows -> normalized CHW tensors, or the BadRequest of that row."""
        images = []
        for row in data:
            try:
                image = decode.decode_image(image_bytes(row), max_pixels=self.meta["max_pixels"],
                                            max_bytes=self.meta["max_image_bytes"])
                images.append(self.transform(image))
            except decode.BadRequest as e:
                images.append(e)
        return images

    @torch.inference_mode()
    def inference(self, data, *args, **kwargs):
        good = [i for i, x in enumerate(data) if isinstance(x, torch.Tensor)]
        outputs = list(data)
        if good:
            batch = torch.stack([data[i] for i in good]).to(self.device)
            probabilities = torch.softmax(self.model(batch).float(), dim=-1).cpu()
            for row, i in enumerate(good):
                outputs[i] = probabilities[row]
        return outputs

    def postprocess(self, data):
        responses = []
        for idx, item in enumerate(data):
            if isinstance(item, decode.BadRequest):
                # KServe's v1 envelope turns one request's instances into rows: only requests have a status
                if idx < len(self.context.request_processor or ()):
                    self.context.set_response_status(item.status, str(item), idx)
                responses.append({"code": item.status, "type": type(item).__name__, "message": str(item)})
                continue
            values, indices = item.topk(min(self.meta["topk"], item.numel()))
            labels = self.meta["labels"]
            responses.append({"predictions": [
                {"index": int(i), "label": labels[i] if labels else str(i), "probability": float(p)}
                for p, i in zip(values.tolist(), indices.tolist())]})
        return responses
