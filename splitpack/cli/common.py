"""Arguments several commands share, spelled the same everywhere."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Mapping

from splitpack.argtypes import arg_type, positive_int  # noqa: F401 (positive_int: re-exported)
from splitpack.cli.params import add_param
from splitpack.serving.config import BY_NAME, MODES  # noqa: F401 (MODES: re-exported)


def add_model(parser: argparse.ArgumentParser, weights: str | None = "use") -> None:
    """The model: ``--model NAME`` or ``--model-file FILE.py --model-class NAME [--model-kwargs JSON]``, with
    ``--num-classes`` and ``--labels`` (the schema's model parameters, splitpack.serving.config), and unless
    ``weights`` is None ``--pretrained``/``--weights FILE``/``--allow-pickle``."""
    from splitpack.cli.params import add_flags
    from splitpack.serving.config import MODEL_ARG_PARAMS

    add_flags(parser, None, params=MODEL_ARG_PARAMS)
    if weights is not None:
        add_weights(parser, weights)


def model_spec(args: argparse.Namespace):
    """The :class:`splitpack.models.ModelSpec` the command line describes (see :func:`add_model`)."""
    from splitpack.cli.params import given
    from splitpack.serving.config import MODEL_ARG_PARAMS, PRETRAINED, ServingConfig

    weights = PRETRAINED if getattr(args, "pretrained", False) else getattr(args, "weights", None)
    config = ServingConfig(**given(args, params=MODEL_ARG_PARAMS))
    return config.model_spec(weights, allow_pickle=getattr(args, "allow_pickle", False))


def model_flags(args: argparse.Namespace) -> list[str]:
    """The flags of :func:`add_model` that reproduce the command line's model (to write a regenerate command)."""
    from splitpack.cli.params import given
    from splitpack.serving.config import BY_NAME, MODEL_ARG_PARAMS

    flags = [a for name, value in given(args, params=MODEL_ARG_PARAMS).items()
             for a in (BY_NAME[name].cli_flag, BY_NAME[name].text(value))]
    if getattr(args, "pretrained", False):
        return flags + ["--pretrained"]
    if getattr(args, "weights", None):
        flags += ["--weights", args.weights] + (["--allow-pickle"] if args.allow_pickle else [])
    return flags


def build_model(args: argparse.Namespace):
    """(the model the command line describes, its spec); its labels file, if any, checked against its head."""
    from splitpack.models import build_model, head_classes, model_labels

    spec = model_spec(args)
    model = build_model(spec)
    if spec.labels is not None:
        model_labels(model, head_classes(model), spec.labels)
    return model, spec


def add_input(parser: argparse.ArgumentParser, batch_help: str = "images per batch (default: 1)") -> None:
    """``--size`` and ``--batch-size`` of the random input a measurement runs on."""
    parser.add_argument("--size", type=arg_type(positive_int, "size"), required=True, help="input height = width")
    parser.add_argument("--batch-size", type=arg_type(positive_int, "batch size"), default=1, help=batch_help)


def add_split(parser: argparse.ArgumentParser, *, merge_layer: bool = True, mode: bool = True,
              required: bool = False, defaults: Mapping[str, Any] | None = None,
              shown: Mapping[str, str] | None = None) -> None:
    """``--merge-layer``, ``--grid RxC`` and ``--mode``, for every command that takes them: spelled, parsed
    and explained as the serving schema declares them (:func:`splitpack.cli.params.add_param`).
    ``required``: the merge layer must be given; ``defaults``: the command's own (else the schema's);
    ``shown``: how the help names a default that is not a value (decided later by the command)."""
    wanted = ("merge_layer",) * merge_layer + ("grid",) + ("mode",) * mode
    for name in wanted:
        param = BY_NAME[name]
        default = (defaults or {}).get(name, param.default)
        add_param(parser, param, default=default, shown=(shown or {}).get(name),
                  required=required and name == "merge_layer")


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="where to measure: cpu or cuda[:N] (default: cpu)")


def add_json(parser: argparse.ArgumentParser, what: str = "the result") -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what} as JSON on stdout")


def write_plot(path: str | Path, draw: Callable[[Path], None]) -> Path:
    """``draw(file)`` into a temporary file moved onto ``path`` when it succeeded."""
    from splitpack.publish import staged_path

    with staged_path(path) as tmp:
        draw(tmp)
    return Path(path)


def add_weights(parser: argparse.ArgumentParser, what: str = "package") -> None:
    """``--pretrained`` or ``--weights FILE`` [``--allow-pickle``] (neither: random weights)."""
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true",
                         help=f"{what} splitpack's offline ImageNet weights (tf_efficientnet_lite0/1/2)")
    weights.add_argument("--weights", metavar="FILE",
                         help=f"weights to {what}: a state dict, or a training checkpoint holding one (timm, "
                              "Lightning: state_dict/model/state_dict_ema/model_ema; module. prefixes removed)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="--weights may be a whole pickled model (torch.save(model)); unpickling runs code "
                             "from the file: only for files you trust (what is shipped is its state dict)")


def add_check(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-check", action="store_true",
                        help="skip loading the settings as the server will and classifying the sample image")
