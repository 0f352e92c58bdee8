"""The settings of one deployed model, as both servers and the CLI read them.

A :class:`ServingConfig` comes from the ``handler:`` section of a TorchServe
model-config.yaml or the ``parameters`` of a Triton config.pbtxt, so values may
arrive as strings; every field is parsed and checked here.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Mapping

from splitpack.core.plan import parse_grid

MODES = ("exact", "seed")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
# timm data-config keys a deployment may pin (they describe how the weights were trained).
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


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
