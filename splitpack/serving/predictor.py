"""Serving core shared by the TorchServe handler and the Triton Python-backend model.

One deployed model = one :class:`ServingConfig` (read from model-config.yaml or
config.pbtxt, so values may arrive as strings) and one :class:`Predictor` that
decodes image bytes, runs the split-pack model and turns probabilities into
labelled top-k predictions. Server glue stays thin: everything that decides
what a request means lives here and is unit-tested without a server.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from splitpack.serving.config import ServingConfig
from splitpack.serving.decode import BadRequest, TooLarge, decode_image  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

# A real cat photo shipped with the package (CC0, see assets/SOURCES.md).
SAMPLE_IMAGE = Path(__file__).resolve().parents[1] / "assets" / "chelsea.jpg"
# Predictor(weights=PRETRAINED) loads splitpack's offline ImageNet weights (splitpack.models.pretrained).
PRETRAINED = "pretrained"


class Predictor:
    """Image bytes -> probabilities -> labelled top-k, for one ServingConfig."""

    def __init__(self, config: ServingConfig, weights: str | None = None, device: str | torch.device = "cpu"):
        """``weights``: a state-dict file, ``"pretrained"`` for splitpack's offline
        ImageNet weights, or None for random weights (with a warning)."""
        import splitpack
        from timm.data import create_transform, resolve_data_config

        self.config = config
        self.device = torch.device(device)
        if weights is None:
            warnings.warn(f"{config.model_name}: no weights given, serving random weights", stacklevel=2)
        if weights == PRETRAINED:
            base = splitpack.create_model(config.model_name, pretrained=True)
        else:
            base = splitpack.create_model(config.model_name, weights=weights)
        self.num_classes = _num_classes(base)
        self.model = self._wrap(base) if config.split else base
        self.model = self.model.to(self.device).eval()

        # The config's overrides win over the model's own pretrained_cfg.
        self.data_config = resolve_data_config(args=dict(config.data_config or {}), model=base)
        self._eval_transform = create_transform(**self.data_config)
        self._labels = _label_names(base, self.num_classes)

    def _wrap(self, base: torch.nn.Module) -> torch.nn.Module:
        import splitpack

        cfg = self.config
        valid = splitpack.merge_layers(base, mode="exact") if cfg.mode == "exact" else splitpack.merge_layers(base)
        if cfg.merge_layer not in valid:
            every = splitpack.merge_layers(base)
            if cfg.mode == "exact" and cfg.merge_layer in every:
                why = f"merge layer {cfg.merge_layer!r} of {cfg.model_name} cannot be used in exact mode"
            else:
                why = f"unknown merge layer {cfg.merge_layer!r} for {cfg.model_name}"
            raise ValueError(f"{why}; valid merge layers for mode={cfg.mode}: {', '.join(valid)}")
        return splitpack.wrap(base, merge_layer=cfg.merge_layer, grid=cfg.grid, mode=cfg.mode)

    def warmup(self) -> None:
        """One forward at the model's input size, so the first request does not pay for
        split-pack's per-size planning (and a model that cannot run fails at load time)."""
        self.predict([torch.zeros(self.data_config["input_size"])])

    # -- requests -----------------------------------------------------------------

    def decode(self, data: bytes) -> torch.Tensor:
        """Encoded image bytes -> normalized CHW float tensor. Raises BadRequest
        (splitpack.serving.decode: limits first, then 16-bit, palette, CMYK, alpha, EXIF, first frame)."""
        image = decode_image(data, max_pixels=self.config.max_pixels)
        if self.config.native_resolution:
            return self._native_transform(image)
        return self._eval_transform(image)

    def _native_transform(self, image: Image.Image) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        width, height = image.size
        scale = min(1.0, self.config.max_side / max(width, height))
        if scale < 1.0:
            size = [max(1, round(height * scale)), max(1, round(width * scale))]
            interpolation = InterpolationMode(self.data_config.get("interpolation", "bilinear"))
            image = F.resize(image, size, interpolation=interpolation, antialias=True)
        if min(image.size) < self.config.min_side:
            raise BadRequest(
                f"image too small: {image.size[0]}x{image.size[1]}, each side must be >= {self.config.min_side}"
            )
        tensor = F.to_tensor(image)
        return F.normalize(tensor, self.data_config["mean"], self.data_config["std"])

    @torch.inference_mode()
    def predict(self, images: list[torch.Tensor]) -> torch.Tensor:
        """CHW tensors -> N x num_classes softmax probabilities (input order kept).

        Images of the same size run as one batch; different sizes (native
        resolution) run as separate batches.
        """
        if not images:
            return torch.empty(0, self.num_classes)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            if image.dim() != 3:
                raise ValueError(f"image {i}: expected a CHW tensor, got shape {tuple(image.shape)}")
            groups.setdefault(tuple(image.shape), []).append(i)
        out = torch.empty(len(images), self.num_classes)
        for indices in groups.values():
            batch = torch.stack([images[i] for i in indices]).to(self.device)
            logits = self.model(batch)
            out[indices] = torch.softmax(logits.float(), dim=-1).cpu()
        return out

    def top_k(self, probs: torch.Tensor) -> list[dict]:
        """One row of probabilities -> ``[{"index", "label", "probability"}, ...]``, best first."""
        if probs.dim() == 2 and probs.shape[0] == 1:
            probs = probs[0]
        if probs.dim() != 1:
            raise ValueError(f"top_k takes one row of probabilities, got shape {tuple(probs.shape)}")
        k = min(self.config.topk, probs.numel())
        values, indices = probs.topk(k)
        return [
            {"index": int(i), "label": self.label(int(i)), "probability": float(p)}
            for p, i in zip(values.tolist(), indices.tolist())
        ]

    def label(self, index: int) -> str:
        return self._labels[index] if self._labels is not None else str(index)

    def predict_isolated(self, images: list[torch.Tensor]) -> list[torch.Tensor | BadRequest]:
        """Like :meth:`predict`, one probability row per image, but one image cannot sink the
        rest: if the batched forward fails, the images are retried one by one. An image that
        split-pack cannot run (a SplitError for its size, e.g. smaller than the grid) becomes
        a BadRequest; any other error for a single image propagates (a server problem)."""
        from splitpack.errors import SplitError

        try:
            return list(self.predict(images))
        except SplitError as e:
            if len(images) == 1:
                return [self._unsplittable(images[0], e)]
        except Exception:
            if len(images) == 1:
                raise
        log.warning("batched forward of %d images failed; retrying them one by one", len(images), exc_info=True)
        rows: list[torch.Tensor | BadRequest] = []
        for image in images:
            try:
                rows.append(self.predict([image])[0])
            except SplitError as e:
                rows.append(self._unsplittable(image, e))
        return rows

    def _unsplittable(self, image: torch.Tensor, error: Exception) -> BadRequest:
        h, w = image.shape[-2:]
        return BadRequest(f"image of {w}x{h} pixels cannot be served with split-pack "
                          f"{self.config.grid[0]}x{self.config.grid[1]} at {self.config.merge_layer}: {error}")

    def infer(self, payloads: list[bytes]) -> list[list[dict] | BadRequest]:
        """Whole pipeline for a batch of requests, one result per request: predictions, or
        the request's BadRequest (the others in the batch are still served)."""
        results: list[Any] = [None] * len(payloads)
        good: list[int] = []
        tensors: list[torch.Tensor] = []
        for i, data in enumerate(payloads):
            try:
                tensors.append(self.decode(data))
                good.append(i)
            except BadRequest as e:
                results[i] = e
        if good:
            for i, row in zip(good, self.predict_isolated(tensors)):
                results[i] = row if isinstance(row, BadRequest) else self.top_k(row)
        return results

    def describe(self) -> dict:
        """Effective settings, for logs."""
        cfg = self.config
        return {
            "model_name": cfg.model_name,
            "split": cfg.split,
            "merge_layer": cfg.merge_layer or "",
            "grid": f"{cfg.grid[0]}x{cfg.grid[1]}",
            "mode": cfg.mode,
            "topk": cfg.topk,
            "native_resolution": cfg.native_resolution,
            "max_side": cfg.max_side,
            "max_pixels": cfg.max_pixels,
            "input_size": list(self.data_config["input_size"]),
            "num_classes": self.num_classes,
            "device": str(self.device),
        }


def _num_classes(model: torch.nn.Module) -> int:
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    with torch.inference_mode():
        return int(model(torch.zeros(1, 3, 64, 64)).shape[-1])


def _label_names(model: torch.nn.Module, num_classes: int) -> list[str] | None:
    """Class names from timm's ImageNet info; None (indices only) for non-ImageNet heads."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(model) or ("imagenet-1k" if num_classes == 1000 else None)
    if subset is None:
        return None
    info = ImageNetInfo(subset)
    if info.num_classes() != num_classes:
        return None
    return [info.index_to_description(i) for i in range(num_classes)]
