"""Serving core shared by the TorchServe handler and the Triton Python-backend model.

One deployed model = one :class:`ServingConfig` (read from model-config.yaml or
config.pbtxt, so values may arrive as strings) and one :class:`Predictor` that
decodes image bytes, runs the split-pack model and turns probabilities into
labelled top-k predictions. Server glue stays thin: everything that decides
what a request means lives here and is unit-tested without a server.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from PIL import Image

from splitpack.serving.decode import BadRequest, TooLarge, decode_image  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

MODES = ("exact", "seed")
# A real cat photo shipped with the package (CC0, see assets/SOURCES.md).
SAMPLE_IMAGE = Path(__file__).resolve().parents[1] / "assets" / "chelsea.jpg"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
# timm data-config keys a deployment may pin (they describe how the weights were trained).
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
# Predictor(weights=PRETRAINED) loads splitpack's offline ImageNet weights (splitpack.models.pretrained).
PRETRAINED = "pretrained"


def _parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{name}: expected a boolean (true/false), got {value!r}")


def _parse_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    try:
        number = int(value.strip()) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected an integer, got {value!r}") from None
    if isinstance(value, float) and value != number:
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    if number < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {number}")
    return number


def _parse_data_config(value: Any) -> dict | None:
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"data_config: expected a mapping or a JSON object, got {value!r} ({e})") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"data_config: expected a mapping, got {value!r}")
    unknown = sorted(set(value) - set(DATA_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"data_config: unknown key(s) {', '.join(unknown)}; known: {', '.join(DATA_CONFIG_KEYS)}")
    out = dict(value)
    for key in ("input_size", "mean", "std"):
        if key in out:
            out[key] = tuple(float(v) if key != "input_size" else int(v) for v in out[key])
    if "crop_pct" in out:
        out["crop_pct"] = float(out["crop_pct"])
    return out


def parse_grid(value: Any) -> tuple[int, int]:
    """``"2x2"``, ``"2"``, ``2``, ``(2, 3)``, ``[2, 3]``, ``"2,3"`` -> ``(rows, cols)``."""
    if isinstance(value, str):
        parts = [p for p in value.lower().replace(",", "x").replace("*", "x").split("x")]
        parts = [p.strip() for p in parts]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        parts = [value]
    elif isinstance(value, Sequence):
        parts = list(value)
    else:
        raise ValueError(f"grid: expected 'RxC' (e.g. '2x2') or a pair of integers, got {value!r}")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise ValueError(f"grid: expected 'RxC' (e.g. '2x2') or a pair of integers, got {value!r}")
    try:
        rows, cols = (_parse_int("grid", p) for p in parts)
    except ValueError:
        raise ValueError(f"grid: expected 'RxC' with positive integers (e.g. '2x2'), got {value!r}") from None
    return rows, cols


@dataclass
class ServingConfig:
    """The split-pack and serving settings of one deployed model."""

    model_name: str  # timm name, or tv:NAME for torchvision
    merge_layer: str | None = None  # None / "" = serve the model unsplit
    grid: tuple[int, int] = (2, 2)
    mode: str = "exact"  # "exact" (halo, output == unsplit) | "seed" (the poster's no-halo split)
    topk: int = 5
    # Serve at the image's own size (longest side capped at max_side) instead of
    # timm's eval resize/crop: large inputs are where split-pack saves memory.
    native_resolution: bool = False
    max_side: int = 1024
    # Decompression-bomb limit, checked on the encoded image's declared size
    # before any pixel is decoded.
    max_pixels: int = 50_000_000
    # Native-resolution images smaller than this (either side) are rejected:
    # they cannot be split into a grid of packs usefully.
    min_side: int = 16
    # timm data-config overrides (mean, std, crop_pct, interpolation, input_size,
    # crop_mode) for weights trained with another transform than the timm
    # default; `splitpack archive` records them from the weights it packs.
    data_config: dict | None = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name.strip():
            raise ValueError("model_name: a timm model name (or tv:NAME) is required")
        self.model_name = self.model_name.strip()
        if self.merge_layer is not None:
            if not isinstance(self.merge_layer, str):
                raise ValueError(f"merge_layer: expected a module name, got {self.merge_layer!r}")
            self.merge_layer = self.merge_layer.strip() or None
            if self.merge_layer and self.merge_layer.lower() in ("none", "null", "unsplit"):
                self.merge_layer = None
        self.grid = parse_grid(self.grid)
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        self.topk = _parse_int("topk", self.topk)
        self.native_resolution = _parse_bool("native_resolution", self.native_resolution)
        self.max_side = _parse_int("max_side", self.max_side)
        self.max_pixels = _parse_int("max_pixels", self.max_pixels)
        self.min_side = _parse_int("min_side", self.min_side)
        self.data_config = _parse_data_config(self.data_config)

    @property
    def split(self) -> bool:
        return bool(self.merge_layer)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any], *, ignore_unknown: bool = False) -> "ServingConfig":
        """Build from a YAML/pbtxt mapping whose values may all be strings.

        Keys may use ``-`` or ``_`` (``merge-layer`` == ``merge_layer``);
        ``model`` is accepted for ``model_name``. Unknown keys raise ValueError
        (they are usually typos) unless ``ignore_unknown``.
        """
        if not isinstance(m, Mapping):
            raise ValueError(f"serving config: expected a mapping, got {type(m).__name__}")
        known = set(cls.field_names())
        values: dict[str, Any] = {}
        unknown = []
        for key, value in m.items():
            name = str(key).strip().replace("-", "_")
            name = "model_name" if name == "model" else name
            if name not in known:
                unknown.append(str(key))
                continue
            values[name] = value.strip() if isinstance(value, str) else value
        if unknown and not ignore_unknown:
            raise ValueError(
                f"serving config: unknown key(s) {', '.join(sorted(unknown))}; known keys: {', '.join(sorted(known))}"
            )
        if "model_name" not in values:
            raise ValueError("serving config: model_name is required")
        if values.get("mode") is not None:
            values["mode"] = str(values["mode"]).lower()
        return cls(**values)

    def to_mapping(self) -> dict[str, Any]:
        """Plain values (grid as ``"RxC"``) that :meth:`from_mapping` reads back."""
        d = dataclasses.asdict(self)
        d["grid"] = f"{self.grid[0]}x{self.grid[1]}"
        d["merge_layer"] = self.merge_layer or ""
        if self.data_config is None:
            del d["data_config"]
        else:
            d["data_config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()}
        return d


def weights_data_config(model) -> dict:
    """The eval transform ``model``'s weights expect (timm data config from its pretrained_cfg),
    to pin into a deployment's config (e.g. TF-Lite mean/std for the pretrained lite models)."""
    from timm.data import resolve_data_config

    data_config = resolve_data_config(model=model)
    return {k: data_config[k] for k in DATA_CONFIG_KEYS if k in data_config}


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
