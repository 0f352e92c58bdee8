"""One schema for the serving parameters of a deployed model: :data:`PARAMS`.

Each parameter is declared once, here, with its parser, default, help text and
the servers that use it. Everything else is derived from the declarations:

* :class:`ServingConfig` (the predictor's settings, section ``model``): the
  ``handler:`` section of a TorchServe model-config.yaml and the ``parameters``
  of a Triton config.pbtxt, where every value is text;
* the deployment settings (section ``deploy``: replicas, batching, device kind),
  written into each server's own config keys (:attr:`Param.native`);
* the CLI flags of ``splitpack archive``, ``splitpack triton-repo`` and
  ``splitpack capacity --write-*`` (:func:`splitpack.cli.params.add_flags`);
* the parameter table in docs/parameters.md (:func:`markdown_table`; a test
  checks the file against it).

Adding a parameter = one :class:`Param` entry in :data:`PARAMS` (plus its test);
the predictor or the servers then read ``config.<name>``.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from splitpack.core.compile.modes import MODES as COMPILE_MODES, compile_mode
from splitpack.core.plan.spec import UNSPLIT_WORDS, AutoPlan, Plan, grid_text, parse_grid, parse_plan
from splitpack.measure.heap import HEAP_MODES
from splitpack.measure.units import parse_bytes

if TYPE_CHECKING:
    from splitpack.models.spec import ModelSpec

SERVERS = ("torchserve", "triton")
MODEL = "model"    # the predictor's settings: handler: section / config.pbtxt parameters
DEPLOY = "deploy"  # the server's own settings: workers/instances, batching, device kind
MODES = ("exact", "seed")
UNSPLIT = "none"   # how an unsplit model's merge_layer is written ("" is read the same)
AUTO = "auto"
PRETRAINED = "pretrained"  # weights: splitpack's offline ImageNet weights (splitpack.models.pretrained)
INSTANCE_KINDS = ("auto", "cpu", "gpu")
# timm data-config keys a deployment may pin (they describe how the weights were trained).
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
# keys the archive/repo generators add next to the parameters, describing where the weights came from
ARTIFACT_KEYS = {"torchserve": ("weights_source",), "triton": ("weights",)}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


# --- value parsers: raw value (text from YAML, pbtxt or the CLI, or a typed value) -> value ------------

def text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty name, got {value!r}")
    return value.strip()


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"expected a boolean (true/false), got {value!r}")


def integer(minimum: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        try:
            number = int(value.strip()) if isinstance(value, str) else int(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected an integer, got {value!r}") from None
        if isinstance(value, float) and value != number:
            raise ValueError(f"expected an integer, got {value!r}")
        if number < minimum:
            raise ValueError(f"must be >= {minimum}, got {number}")
        return number
    parse.__name__ = f"integer >= {minimum}"
    return parse


def choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        word = str(value).strip().lower()
        if word not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")
        return word
    parse.__name__ = "one of " + ", ".join(options)
    return parse


def auto_or_count(value: Any) -> int | str:
    """``auto`` (or empty) = derived where it is used (threads: the server's share of the cores,
    splitpack.serving.threads; startup_timeout_s: :func:`startup_timeout_s`); else an integer >= 1."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        return AUTO
    return integer(1)(value)


auto_or_count.__name__ = "auto or an integer >= 1"

# Seconds TorchServe waits for a worker to load its model (model-config.yaml startupTimeout; 120 in
# TorchServe 0.12). Load runs the warm-up, which with compile: inductor compiles the program for batch 1
# and 2: about 2 minutes each for MobileNetV2 4x4 on a CPU (BENCHMARKS.md), more for larger programs.
STARTUP_TIMEOUT_S = {"off": 120, "program": 120, "inductor": 900}


def startup_timeout_s(value: int | str, compile: Any) -> int:
    """The worker start-up timeout to deploy: ``value``, or for ``auto`` the one the compile mode needs."""
    return STARTUP_TIMEOUT_S[compile_mode(compile)] if value == AUTO else value


def memory_budget(value: Any) -> int | None:
    """Peak activation bytes per image for ``merge_layer: auto``: ``512MiB``, ``2GB``, a number of bytes;
    ""/none = no budget (the smallest peak within max_overhead)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in UNSPLIT_WORDS):
        return None
    nbytes = parse_bytes(value)
    if nbytes <= 0:
        raise ValueError(f"must be a positive size, got {value!r}")
    return nbytes


def _ratio(value: Any, example: str, valid: Callable[[float], bool], requirement: str) -> float | None:
    """A ratio to the unsplit model (``1.25``, ``"1.25x"``); ""/none = None."""
    if value is None or (isinstance(value, str) and value.strip().lower() in UNSPLIT_WORDS):
        return None
    try:
        ratio = float(value.strip().rstrip("xX")) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected {example}, got {value!r}") from None
    if not valid(ratio):
        raise ValueError(f"must be {requirement}, got {value!r}")
    return ratio


def latency_ratio(value: Any) -> float | None:
    """Latency allowed for ``merge_layer: auto``, as a ratio to the unsplit model's predicted time on the
    serving device (> 0); ""/none = no latency objective."""
    return _ratio(value, "a latency ratio such as 1.1", lambda r: r > 0 and math.isfinite(r),
                  "a ratio > 0 (split / unsplit latency)")


def overhead_ratio(value: Any) -> float | None:
    """MACs allowed for ``merge_layer: auto``, as a ratio to the unsplit model (>= 1); ""/none = the default."""
    return _ratio(value, "a MACs ratio such as 1.25", lambda r: r >= 1, ">= 1 (a ratio to the unsplit model's MACs)")


def merge_layer_text(value: Any) -> str:
    """``layer2``, ``layer2,global_pool``, a list of names, ``auto``; ``""``/``none``/None = unsplit."""
    plan = parse_plan(value, (1, 1))
    if plan is None:
        return UNSPLIT
    return str(plan) if isinstance(plan, AutoPlan) else plan.merge_layer_text


def grid_list_text(value: Any) -> str:
    """``2x2``, ``2``, ``(2, 3)`` for one grid; ``4x4,2x2`` (or a list) for one grid per stage."""
    if isinstance(value, str):
        items: list[Any] = value.split(",")
    elif isinstance(value, list) and value and all(isinstance(g, (str, list, tuple)) for g in value):
        items = list(value)
    else:
        items = [value]
    return ",".join(grid_text(parse_grid(g)) for g in items)


def json_object(value: Any) -> dict | None:
    """A mapping or its JSON text; None/""/{} = none."""
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"expected a mapping or a JSON object, got {value!r} ({e})") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a mapping, got {value!r}")
    return dict(value)


json_object.__name__ = "a JSON object"


def data_config(value: Any) -> dict | None:
    """timm data-config overrides: a mapping or its JSON text; None/"" = the model's own."""
    value = json_object(value)
    if value is None:
        return None
    unknown = sorted(set(value) - set(DATA_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)}; known: {', '.join(DATA_CONFIG_KEYS)}")
    out = dict(value)
    for key in ("input_size", "mean", "std"):
        if key in out:
            out[key] = tuple(float(v) if key != "input_size" else int(v) for v in out[key])
    if "crop_pct" in out:
        out["crop_pct"] = float(out["crop_pct"])
    return out


# --- the schema ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    """One serving parameter, declared once."""

    name: str                          # key in the handler: section / config.pbtxt parameters
    parse: Callable[[Any], Any]        # raw value -> value; raises ValueError
    default: Any
    help: str
    section: str = MODEL
    servers: tuple[str, ...] = SERVERS
    flag: str | None = None            # CLI flag; default --name-with-dashes
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    server_defaults: Mapping[str, Any] = field(default_factory=dict)  # where a server's default differs
    native: Mapping[str, str] = field(default_factory=dict)  # section deploy: each server's own config key
    plan_arg: bool = False             # passed to splitpack.core.plan.spec.parse_plan as the keyword of this name
    model_arg: bool = False            # describes the model itself (splitpack.models.ModelSpec): every --model command

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def read(self, value: Any) -> Any:
        """The parsed value; a ValueError names the parameter."""
        try:
            return self.parse(value)
        except ValueError as err:
            message = str(err)
            raise ValueError(message if message.startswith(f"{self.name}:") else f"{self.name}: {message}") from None

    def default_for(self, server: str | None = None) -> Any:
        return self.server_defaults.get(server, self.default)

    def text(self, value: Any) -> str:
        """The value as config.pbtxt and the docs write it."""
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, Mapping):
            return json.dumps(_plain(value), sort_keys=True)
        return "" if value is None else str(value)


def _plain(value: Any) -> Any:
    """YAML/JSON-friendly: tuples become lists, mappings plain dicts."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


PARAMS: tuple[Param, ...] = (
    # -- model: what the predictor reads (handler: section / config.pbtxt parameters) ------------------
    Param("model_name", text, None, "timm model name, or tv:NAME for torchvision (required unless model_class)",
          flag="--model", metavar="NAME", model_arg=True),
    Param("merge_layer", merge_layer_text, UNSPLIT,
          "module name(s) to merge the packs at: a name, a comma list (one per stage) or auto; a cut joins names "
          "with + (a+b: outputs that together are all the rest needs); none = unsplit",
          metavar="LAYER"),
    Param("grid", grid_list_text, "2x2", "packs as RxC, or one grid per stage (4x4,2x2)", metavar="RxC"),
    Param("mode", choice(MODES), "exact", "exact (halo: output equals the unsplit model) or seed (no halo)",
          choices=MODES),
    Param("topk", integer(1), 5, "labelled predictions per image", metavar="K"),
    Param("native_resolution", boolean, False,
          "serve at the image's own size (longest side capped at max_side) instead of the eval resize/crop"),
    Param("max_side", integer(1), 1024, "native resolution: longest side after downscaling", metavar="PIXELS"),
    Param("max_pixels", integer(1), 50_000_000,
          "reject images declaring more pixels (checked before decoding)", metavar="PIXELS"),
    Param("min_side", integer(1), 16, "native resolution: reject images with a shorter side", metavar="PIXELS"),
    Param("max_image_bytes", integer(1), 32 << 20,
          "reject an encoded image larger than this before decoding it (HTTP 413 / INVALID_ARGUMENT)",
          metavar="BYTES"),
    Param("threads", auto_or_count, AUTO,
          "torch threads per replica (its own process); auto = the cores / every replica of the server",
          metavar="N|auto"),
    Param("data_config", data_config, None,
          "timm data-config overrides (JSON: mean, std, crop_pct, interpolation, input_size, crop_mode); "
          "archive and triton-repo pin the weights' own", metavar="JSON"),
    Param("compile", compile_mode, "off",
          "exact mode: off interprets the plan op by op; program runs each input size's plan recorded as one "
          "straight-line program; inductor runs that program through torch.compile (recorded and compiled at "
          "model load for the model's input size)", choices=COMPILE_MODES),
    Param("cuda_graphs", boolean, False,
          "GPU replicas, exact mode: replay each input size and batch bucket (1, 2, 4, ... up to batch_size) "
          "from a CUDA graph captured at model load; CPU replicas run without"),
    Param("memory_budget", memory_budget, None,
          "merge_layer auto: peak activation memory allowed per image (512MiB); the planner picks the plan "
          "with the fewest MACs within it", metavar="BYTES", plan_arg=True),
    Param("max_overhead", overhead_ratio, None,
          "merge_layer auto: MACs allowed, as a ratio to the unsplit model (1.25 when no memory_budget "
          "is given); the planner picks the smallest peak within it", metavar="RATIO", plan_arg=True),
    # the model itself, besides model_name (after the others: positional ServingConfig(...) calls stay valid)
    Param("model_file", text, None,
          "your own model: the Python file defining model_class (archive and triton-repo ship a copy)",
          metavar="FILE.py", model_arg=True),
    Param("model_class", text, None, "your own model: the class or factory function in model_file that builds it",
          metavar="NAME", model_arg=True),
    Param("model_kwargs", json_object, None, "keyword arguments for model_class, or for the timm/torchvision model",
          metavar="JSON", model_arg=True),
    Param("num_classes", integer(1), None,
          "classes of the model's head: a new head for a timm/torchvision model, num_classes=N for model_class",
          metavar="N", model_arg=True),
    Param("labels", text, None,
          "class names for the answers: index_to_name.json or one label per line (archive and triton-repo "
          "ship a copy); default: ImageNet's for 1000-class heads, else class indices", metavar="FILE",
          model_arg=True),
    # (added later than the model's own: positional ServingConfig(...) calls stay valid)
    Param("max_latency", latency_ratio, None,
          "merge_layer auto: latency allowed, as a ratio to the unsplit model's time on the serving device "
          "(predicted by the device's time model, calibrated at first load and cached); the planner picks the "
          "smallest peak within it, or with memory_budget the fewest predicted seconds within the budget",
          metavar="RATIO", plan_arg=True),
    Param("measure_latency", boolean, False,
          "merge_layer auto with max_latency: also time a few candidate plans on the serving device at load "
          "(each against the unsplit model) and keep the smallest peak measured within max_latency / 1.1 (a "
          "margin for timing noise), so the pick does not hang on the time model's error or one lucky timing "
          "(seconds to a minute more at load)", plan_arg=True),
    Param("heap", choice(HEAP_MODES), "default",
          "the worker's C heap (glibc): kept fixes malloc's mmap and trim thresholds, so freed activations are "
          "reused instead of mapped afresh with a page fault per page on every call (CPU replicas: the unsplit "
          "ResNet-50 at 1024 px ran 1.8x faster on 2 cores; the worker keeps its high-water mark of memory); "
          "default leaves glibc's adaptive thresholds", choices=HEAP_MODES),
    # -- deploy: the servers' own settings -------------------------------------------------------------
    Param("replicas", integer(1), 1, "model replicas (processes) per server", section=DEPLOY,
          native={"torchserve": "minWorkers, maxWorkers", "triton": "instance_group.count"}, metavar="N"),
    Param("instance_kind", choice(INSTANCE_KINDS), "auto", "where replicas run: cpu, gpu or auto (GPU if any)",
          section=DEPLOY, choices=INSTANCE_KINDS, server_defaults={"triton": "cpu"},
          native={"torchserve": "deviceType (omitted for auto)", "triton": "instance_group.kind"}),
    Param("batch_size", integer(1), 1, "largest batch the server forms from concurrent requests", section=DEPLOY,
          server_defaults={"triton": 8}, native={"torchserve": "batchSize", "triton": "max_batch_size"}, metavar="N"),
    Param("max_batch_delay_ms", integer(0), 50, "how long a request may wait for others to batch with",
          section=DEPLOY, server_defaults={"triton": 2}, metavar="MS",
          native={"torchserve": "maxBatchDelay", "triton": "dynamic_batching.max_queue_delay_microseconds"}),
    Param("response_timeout_s", integer(1), 120, "seconds before TorchServe gives up on a worker", section=DEPLOY,
          servers=("torchserve",), native={"torchserve": "responseTimeout"}, metavar="S"),
    Param("startup_timeout_s", auto_or_count, AUTO,
          "seconds TorchServe waits for a worker to load the model (the warm-up included); auto = "
          f"{STARTUP_TIMEOUT_S['inductor']} with compile: inductor, else {STARTUP_TIMEOUT_S['off']} "
          "(TorchServe's default)", section=DEPLOY,
          servers=("torchserve",), native={"torchserve": "startupTimeout"}, metavar="S|auto"),
)
BY_NAME = {p.name: p for p in PARAMS}
MODEL_PARAMS = tuple(p for p in PARAMS if p.section == MODEL)
MODEL_ARG_PARAMS = tuple(p for p in PARAMS if p.model_arg)  # the model itself: what every --model command takes
DEPLOY_PARAMS = tuple(p for p in PARAMS if p.section == DEPLOY)


def params_for(server: str | None, section: str | None = None, params: tuple[Param, ...] = PARAMS) -> list[Param]:
    """The parameters ``server`` uses (None: any server), optionally of one section."""
    return [p for p in params if (server is None or server in p.servers) and (section is None or p.section == section)]


# --- the predictor's settings --------------------------------------------------------------------

class _ServingConfigMethods:
    """Methods of a config class made by :func:`config_class` (fields: the ``_params`` it was made from)."""

    _params: tuple[Param, ...] = ()

    def __post_init__(self):
        for p in self._params:
            value = getattr(self, p.name)
            value = p.default if value is None else value  # None = the default (merge_layer None = unsplit)
            setattr(self, p.name, p.read(value) if value is not None else None)
        self.plan  # merge layers and grids must agree (one grid, or one per stage)
        self.model_spec()  # a model name, or a model file and class

    def model_spec(self, weights: str | Path | None = None, base_dir: str | Path | None = None,
                   allow_pickle: bool = False) -> ModelSpec:
        """The model these settings serve, with ``weights`` (a file, ``"pretrained"`` or None for random);
        the model and labels files, where relative, are in ``base_dir`` (where the server unpacked them)."""
        def path(name: str) -> Path | None:
            value = getattr(self, name, None)
            return None if value is None else Path(base_dir or ".") / value

        from splitpack.models.spec import ModelSpec  # imports torch: not needed to read settings

        pretrained = weights == PRETRAINED
        return ModelSpec(name=self.model_name, model_file=path("model_file"),
                         model_class=getattr(self, "model_class", None),
                         model_kwargs=dict(getattr(self, "model_kwargs", None) or {}),
                         num_classes=getattr(self, "num_classes", None), labels=path("labels"),
                         weights=None if pretrained or weights is None else Path(weights), pretrained=pretrained,
                         allow_pickle=allow_pickle)

    @property
    def plan(self) -> Plan | AutoPlan | None:
        """The split-pack plan these settings describe (None: unsplit)."""
        kwargs = {p.name: getattr(self, p.name) for p in self._params if p.plan_arg}
        return parse_plan(self.merge_layer, self.grid, **kwargs)

    @property
    def split(self) -> bool:
        return self.plan is not None

    @classmethod
    def field_names(cls) -> list[str]:
        return [p.name for p in cls._params]

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any], *, ignore_unknown: bool = False) -> "ServingConfig":
        """Build from a YAML/pbtxt mapping whose values may all be strings.

        Keys may use ``-`` or ``_`` (``merge-layer`` == ``merge_layer``); ``model``
        is accepted for ``model_name``. Unknown keys raise ValueError (they are
        usually typos) unless ``ignore_unknown``.
        """
        if not isinstance(m, Mapping):
            raise ValueError(f"serving config: expected a mapping, got {type(m).__name__}")
        known = set(cls.field_names())
        values: dict[str, Any] = {}
        unknown = []
        for key, value in m.items():
            name = str(key).strip().replace("-", "_")
            name = "model_name" if name == "model" else name
            if name in known:
                values[name] = value
            else:
                unknown.append(str(key))
        if unknown and not ignore_unknown:
            raise ValueError(f"serving config: unknown key(s) {', '.join(sorted(unknown))}; "
                             f"known keys: {', '.join(sorted(known))}")
        return cls(**values)

    @classmethod
    def from_section(cls, section: Mapping[str, Any], server: str) -> tuple["ServingConfig", dict[str, Any]]:
        """A server's stored settings (handler: section, pbtxt parameters) -> (config, artifact keys)."""
        artifacts = {k: section[k] for k in ARTIFACT_KEYS[server] if k in section}
        return cls.from_mapping({k: v for k, v in section.items() if k not in artifacts}), artifacts

    def to_mapping(self) -> dict[str, Any]:
        """Plain values (text grids and merge layers, lists not tuples) that :meth:`from_mapping` reads back."""
        return {p.name: _plain(getattr(self, p.name)) for p in self._params if getattr(self, p.name) is not None}

    def to_text(self) -> dict[str, str]:
        """Every value as text: config.pbtxt ``parameters``."""
        return {p.name: p.text(getattr(self, p.name)) for p in self._params if getattr(self, p.name) is not None}


def config_class(params: tuple[Param, ...] = MODEL_PARAMS, name: str = "ServingConfig") -> type:
    """A dataclass with one field per parameter (``model_name`` first) and the methods above."""
    assert params[0].name == "model_name", "model_name must be the first parameter"
    fields = [(p.name, Any, dataclasses.field(default=p.default)) for p in params]
    return dataclasses.make_dataclass(name, fields, bases=(_ServingConfigMethods,), namespace={
        "_params": params, "__module__": __name__,
        "__doc__": "The settings of one deployed model: one field per model-section parameter of the schema."})


ServingConfig = config_class()


# --- the server's own settings -------------------------------------------------------------------

def check_deploy(server: str, values: Mapping[str, Any] | None) -> dict[str, Any]:
    """Deploy-section ``values`` for ``server``, parsed (None values dropped); unknown names are a ValueError."""
    values = {k: v for k, v in (values or {}).items() if v is not None}
    unknown = sorted(set(values) - {p.name for p in params_for(server, DEPLOY)})
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not a setting of {server}")
    return {name: BY_NAME[name].read(value) for name, value in values.items()}


def deploy_settings(server: str, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every deploy-section value for ``server``: its defaults, overridden by ``values`` (checked)."""
    return {p.name: p.default_for(server) for p in params_for(server, DEPLOY)} | check_deploy(server, values)


def weights_data_config(model) -> dict:
    """The eval transform ``model``'s weights expect (timm data config from its pretrained_cfg),
    to pin into a deployment's config (e.g. TF-Lite mean/std for the pretrained lite models)."""
    from timm.data import resolve_data_config

    resolved = resolve_data_config(model=model)
    return {k: resolved[k] for k in DATA_CONFIG_KEYS if k in resolved}


# --- docs ----------------------------------------------------------------------------

def markdown_table(params: tuple[Param, ...] = PARAMS) -> str:
    """The parameter table of docs/parameters.md."""
    rows = ["| parameter | CLI flag | default | TorchServe | Triton | meaning |", "|---|---|---|---|---|---|"]
    for p in params:
        defaults = {s: p.text(p.default_for(s)) for s in p.servers}
        default = next(iter(defaults.values())) if len(set(defaults.values())) == 1 else \
            ", ".join(f"{v} ({s})" for s, v in defaults.items())
        where = {s: ("-" if s not in p.servers else
                     f"`handler: {p.name}`" if (p.section == MODEL and s == "torchserve") else
                     f"`parameters {p.name}`" if p.section == MODEL else f"`{p.native[s]}`") for s in SERVERS}
        default = "required" if p.name == "model_name" else f"`{default or 'none'}`"
        rows.append(f"| `{p.name}` | `{p.cli_flag}` | {default} | {where['torchserve']} | "
                    f"{where['triton']} | {p.help} |")
    return "\n".join(rows) + "\n"
