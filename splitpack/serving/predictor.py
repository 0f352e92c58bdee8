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
from typing import Sequence

import torch
from PIL import Image

from splitpack.models import build_model, head_classes, model_labels
from splitpack.serving.config import PRETRAINED, ServingConfig  # noqa: F401 (Predictor(weights=PRETRAINED))
from splitpack.serving.decode import BadRequest, TooLarge, decode_image  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

# A real cat photo shipped with the package (CC0, see assets/SOURCES.md).
SAMPLE_IMAGE = Path(__file__).resolve().parents[1] / "assets" / "chelsea.jpg"


class InferenceFailed(RuntimeError):
    """The server could not run a request (not the caller's fault); its message is shown to the caller
    with a 5xx status (HTTP 500 on TorchServe, INTERNAL on Triton)."""

    status = 500


ServeError = (BadRequest, InferenceFailed)


def _request_result(rows: list) -> torch.Tensor | BadRequest | InferenceFailed:
    """One request's rows -> its probabilities, or its first error (naming the image when there are several)."""
    for i, row in enumerate(rows):
        if isinstance(row, ServeError):
            return type(row)(f"image {i}: {row}") if len(rows) > 1 else row
    return torch.stack(rows)


def _stack_owned(images: list[torch.Tensor], indices: list[int]) -> torch.Tensor:
    """``torch.stack`` of ``images[indices]`` that holds each image's pixels once: the list holds the only
    references to its tensors, and each is replaced by its row of the batch as soon as it is copied there.
    Stacking first would hold every image twice while the model runs (12 MiB per image in flight at 1024
    pixels, which the capacity formula counts once: the input batch)."""
    first = images[indices[0]]
    batch = torch.empty((len(indices), *first.shape), dtype=first.dtype, device=first.device)
    del first
    for row, i in enumerate(indices):
        batch[row].copy_(images[i])
        images[i] = batch[row]
    return batch


class Predictor:
    """Image bytes -> probabilities -> labelled top-k, for one ServingConfig."""

    def __init__(self, config: ServingConfig, weights: str | None = None, device: str | torch.device = "cpu",
                 base_dir: str | Path | None = None, batch_size: int | None = None):
        """``weights``: a state-dict (or checkpoint) file, ``"pretrained"`` for splitpack's offline
        ImageNet weights, or None for random weights (with a warning). ``base_dir``: where the config's
        relative model and labels files are (the unpacked archive, the Triton version directory).
        ``batch_size``: the largest batch the server forms (model-config.yaml batchSize, config.pbtxt
        max_batch_size); CUDA graphs are captured for batch buckets up to it."""
        from timm.data import create_transform, resolve_data_config

        self.config = config
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.last_peak_bytes: int | None = None  # of the last served batch, on CUDA
        spec = config.model_spec(weights, base_dir)
        if weights is None:
            warnings.warn(f"{spec.title}: no weights given, serving random weights", stacklevel=2)
        base = build_model(spec)
        self.num_classes = head_classes(base)
        self._labels = model_labels(base, self.num_classes, spec.labels)
        self.model = self._wrap(base) if config.split else base
        self.model = self.model.to(self.device).eval()

        # The config's overrides win over the model's own pretrained_cfg.
        self.data_config = resolve_data_config(args=dict(config.data_config or {}), model=base)
        self._eval_transform = create_transform(**self.data_config)
        self.compile_report = self.warm_compiled()  # compile / cuda_graphs: at load, not on the first request

    def _wrap(self, base: torch.nn.Module) -> torch.nn.Module:
        """The split-pack module for the config's plan; the engine checks the merge layers against the model
        (an unknown one is a ValueError listing the valid ones, one exact mode cannot split a SplitError)."""
        import splitpack

        cfg = self.config  # (memory_budget and max_overhead with named merge layers: wrap's ValueError)
        batch = {"max_batch": self.batch_size} if self.batch_size else {}
        return splitpack.wrap(base, merge_layer=cfg.merge_layer, grid=cfg.grid, mode=cfg.mode, compile=cfg.compile,
                              cuda_graphs=cfg.cuda_graphs, memory_budget=cfg.memory_budget,
                              max_overhead=cfg.max_overhead, max_latency=cfg.max_latency,
                              measure_latency=cfg.measure_latency, **batch)

    def plans(self) -> list[dict]:
        """merge_layer auto: the plan chosen for each input size so far (empty otherwise)."""
        choices = getattr(self.model, "choices", None) or {}
        return [{"input_size": "x".join(map(str, size)), "plan": str(c.plan),
                 "predicted_peak_bytes": c.predicted_peak_bytes,
                 "predicted_macs_ratio": round(c.predicted_macs_ratio, 4),
                 "predicted_latency_ratio": None if c.predicted_latency_ratio is None
                 else round(c.predicted_latency_ratio, 4),
                 "measured_latency_ratio": None if c.measured_latency_ratio is None
                 else round(c.measured_latency_ratio, 4)} for (size, *_), c in choices.items()]

    def warmup(self) -> None:
        """One forward at the model's input size, so the first request does not pay for
        split-pack's per-size planning (and a model that cannot run fails at load time)."""
        self.predict([torch.zeros(self.data_config["input_size"])])

    def warm_compiled(self) -> list[dict]:
        """Record (and compile, capture) the split-pack program for the model's input size at load time:
        batch 1 and 2 (torch.compile specialises batch 1 and makes the batch size dynamic from the second
        size it sees), every CUDA-graph bucket. Returns what it cost (logged): record and first-call seconds."""
        if not self.config.split or (self.config.compile == "off" and not self.config.cuda_graphs):
            return []
        image = torch.zeros(self.data_config["input_size"])
        compiled = self.compiled_for(image)
        if compiled is None:
            return []
        self.predict([image])
        self.predict([image, image])
        if hasattr(compiled, "warm_up"):  # CUDA graphs: every batch bucket
            with torch.inference_mode():
                compiled.warm_up(image.unsqueeze(0).to(self.device))
        report = compiled.report()
        log.info("split-pack compiled for %s: %s", self.config.model_spec().title, report)
        return report

    def compiled_for(self, image: torch.Tensor):
        """What runs ``image``'s size compiled (None: the interpreter): the split model's programs, or with
        merge_layer auto those of the plan for that size (planned here on first use)."""
        model = self.model
        if hasattr(model, "for_input"):  # merge_layer auto: one SplitPack per input size
            model = model.for_input((1, *image.shape), image.dtype, self.device)
        return getattr(model, "compiled", None)

    # -- requests -----------------------------------------------------------------

    def decode(self, data: bytes) -> torch.Tensor:
        """Encoded image bytes -> normalized CHW float tensor. Raises BadRequest
        (splitpack.serving.decode: limits first, then 16-bit, palette, CMYK, alpha, EXIF, first frame)."""
        image = decode_image(data, max_pixels=self.config.max_pixels, max_bytes=self.config.max_image_bytes)
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
    def predict(self, images: list[torch.Tensor], *, owned: bool = False) -> torch.Tensor:
        """CHW tensors -> N x num_classes softmax probabilities (input order kept).

        Images of the same size run as one batch; different sizes (native
        resolution) run as separate batches. ``owned``: the list holds the only references to its
        tensors (:func:`_stack_owned`).
        """
        if not images:
            return torch.empty(0, self.num_classes)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, shape in enumerate(image.shape for image in images):  # (a loop variable would keep an image)
            if len(shape) != 3:
                raise ValueError(f"image {i}: expected a CHW tensor, got shape {tuple(shape)}")
            groups.setdefault(tuple(shape), []).append(i)
        out = torch.empty(len(images), self.num_classes)
        for indices in groups.values():
            batch = _stack_owned(images, indices) if owned else torch.stack([images[i] for i in indices])
            batch = batch.to(self.device)
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

    def predict_isolated(self, images: list[torch.Tensor], *, owned: bool = False
                         ) -> list[torch.Tensor | BadRequest | InferenceFailed]:
        """Like :meth:`predict`, one probability row per image, but one image cannot sink the rest:
        if the batched forward fails, the images are retried one by one. An image split-pack cannot
        run (a SplitError for its size, e.g. smaller than the grid) becomes a BadRequest; any other
        error of a single image an InferenceFailed (a server-side problem, not the caller's)."""
        try:
            return list(self.predict(images, owned=owned))
        except Exception:  # noqa: BLE001 -- whatever it was, find out image by image
            if len(images) > 1:
                log.warning("batched forward of %d images failed; retrying them one by one", len(images),
                            exc_info=True)
        return [self._predict_one(image) for image in images]

    def _predict_one(self, image: torch.Tensor) -> torch.Tensor | BadRequest | InferenceFailed:
        from splitpack.errors import SplitError

        try:
            return self.predict([image])[0]
        except SplitError as e:
            h, w = image.shape[-2:]
            return BadRequest(f"image of {w}x{h} pixels cannot be served with split-pack "
                              f"{self.config.grid} at {self.config.merge_layer}: {e}")
        except Exception as e:  # noqa: BLE001 -- reported to the caller as a server error, logged here
            log.error("inference failed for one image of shape %s", tuple(image.shape), exc_info=True)
            return InferenceFailed(f"inference failed: {type(e).__name__}: {e}")

    def serve(self, requests: Sequence[Sequence[bytes] | bytes | BadRequest]
              ) -> list[torch.Tensor | BadRequest | InferenceFailed]:
        """The one per-request policy both servers run: encoded images in, per request out.

        ``requests[i]`` is one request's encoded images (a list, or one bytes object), or the
        BadRequest its server glue already found. Each result is an ``n x classes`` tensor of
        probabilities (n = the request's images), or the request's error: a BadRequest (a bad
        image, naming it when the request carries several: HTTP 400 / INVALID_ARGUMENT) or an
        InferenceFailed (a server-side failure: HTTP 500 / INTERNAL). One request's error never
        fails another. Same-size images of all requests run batched; on CUDA the batch's peak
        activation bytes are left in :attr:`last_peak_bytes` for the memory gauges.
        """
        decoded = [self._decode_request(r) for r in requests]
        counts = [d if isinstance(d, ServeError) else len(d) for d in decoded]
        images = [t for d in decoded if not isinstance(d, ServeError) for t in d]
        del decoded  # ``images`` holds the only references: the batch replaces them (predict's ``owned``)
        rows = iter(self._forward(images))
        return [n if isinstance(n, ServeError) else _request_result([next(rows) for _ in range(n)]) for n in counts]

    def _decode_request(self, request) -> list[torch.Tensor] | BadRequest:
        if isinstance(request, BadRequest):
            return request
        payloads = list(request) if isinstance(request, (list, tuple)) else [request]
        if not payloads:
            return BadRequest("the request carries no image")
        images = []
        for i, payload in enumerate(payloads):
            try:
                images.append(self.decode(payload))
            except BadRequest as err:
                return type(err)(f"image {i}: {err}") if len(payloads) > 1 else err  # keeps TooLarge's 413
        return images

    def _forward(self, images: list[torch.Tensor]) -> list[torch.Tensor | BadRequest | InferenceFailed]:
        """``images``: the only references to the decoded tensors (:meth:`predict`'s ``owned``)."""
        if not images:
            return []
        from splitpack.measure.meter import peak_meter

        # CUDA: the allocator's peak is free to read; the CPU tracker would slow every batch
        with torch.inference_mode(), peak_meter(self.device, enabled=self.device.type == "cuda") as meter:
            rows = self.predict_isolated(images, owned=True)
        self.last_peak_bytes = meter.peak
        return rows

    def describe(self) -> dict:
        """Effective settings, for logs: the serving parameters (but the transform) and the model's facts."""
        settings = {k: v for k, v in self.config.to_mapping().items() if k != "data_config"}
        compiled = {"compiled": self.compile_report} if self.compile_report else {}
        if self.config.cuda_graphs and self.config.split:
            runner = self.compiled_for(torch.zeros(self.data_config["input_size"]))
            compiled["cuda_graph_buckets"] = list(getattr(runner, "buckets", ()))
        auto = {"auto_plans": self.plans()} if self.plans() else {}
        return settings | compiled | {"split": self.config.split, "plan": str(self.config.plan or "unsplit"),
                                      "input_size": list(self.data_config["input_size"]),
                                      "num_classes": self.num_classes, "device": str(self.device)} | auto
