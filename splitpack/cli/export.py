"""Export a split-pack model at one input size as a file that loads without splitpack (TorchScript, ExportedProgram, Triton libtorch)."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from splitpack.cli import arg_type, common
from splitpack.cli.params import add_flags, given
from splitpack.serving.config import DEPLOY, MODEL_PARAMS, deploy_settings

FORMATS = ("torchscript", "exported-program", "triton-libtorch")
DTYPES = ("float32", "float16", "bfloat16")
CHECK_TOLERANCE = 1e-5  # relative, artifact vs the interpreter: the same aten calls in the same order


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_model(parser, "export")
    parser.add_argument("--size", type=arg_type(common.positive_int, "size"), required=True,
                        help="input height = width the artifact runs at (any batch size)")
    common.add_split(parser, mode=False, required=True)  # exact mode: the artifact equals the unsplit model
    parser.add_argument("--format", choices=FORMATS, required=True,
                        help="torchscript (torch.jit.load), exported-program (torch.export.load, a .pt2 file) or "
                             "triton-libtorch (a Triton model directory with the TorchScript file)")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE|DIR",
                        help="the artifact file; for triton-libtorch the model repository (DIR/NAME is written)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    common.add_device(parser)
    triton = parser.add_argument_group("triton-libtorch", "the model directory's config.pbtxt")
    add_flags(triton, "triton", exclude=tuple(p.name for p in MODEL_PARAMS))  # the model's flags: add_model
    triton.add_argument("--name", help="Triton model name = directory (default: MODEL_libtorch)")
    triton.add_argument("--weight-sharing", action="store_true",
                        help="instances on one device share one copy of the weights (ENABLE_WEIGHT_SHARING)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip loading the artifact back and comparing it with the model")


def _check_arguments(args: argparse.Namespace) -> None:
    if args.format == "exported-program" and args.out.suffix != ".pt2":
        raise ValueError(f"--out {args.out}: an exported program is a .pt2 archive (torch.export.save)")
    if args.format != "triton-libtorch":
        extra = [f for f in ("name", "weight_sharing") if getattr(args, f)] + list(given(args, DEPLOY))
        if extra:
            raise ValueError(f"--{extra[0].replace('_', '-')} applies to --format triton-libtorch only")


def run(args: argparse.Namespace) -> int:
    import splitpack
    from splitpack.core.compile import export

    _check_arguments(args)
    deploy = deploy_settings("triton", given(args, DEPLOY))
    model, spec = common.build_model(args)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    model = model.to(device=device, dtype=dtype).eval()
    split = splitpack.wrap(model, args.merge_layer, args.grid)
    program = export.standalone_program(split, (args.size, args.size), dtype=dtype, device=device)
    example = torch.randn(2, 3, args.size, args.size, dtype=dtype, device=device)
    fmt = "torchscript" if args.format == "triton-libtorch" else args.format

    def write(path: Path) -> None:
        export.save(program, fmt, path, example)
        if not args.no_check:
            _check(export.load(fmt, path), split, model, example)

    what = f"{spec.title} @{args.size}, plan {split.plan}"
    if args.format == "triton-libtorch":
        model_dir = _write_triton(args, write, deploy, split, model, example, spec.title)
        print(f"wrote {model_dir}/config.pbtxt, 1/model.pt ({what})")
        return 0
    from splitpack.publish import staged_path

    with staged_path(args.out) as tmp:
        write(tmp)
    print(f"wrote {args.out} ({fmt}, {what})")
    return 0


def _check(artifact, split, model, example) -> None:
    """The artifact against the interpreter (same ops: must agree to rounding) and the unsplit model."""
    from splitpack.errors import ServerError

    with torch.inference_mode():
        out, reference, unsplit = artifact(example), split.interpret(example), model(example)
    scale = unsplit.float().abs().max().item() or 1.0
    error = (out.float() - reference.float()).abs().max().item() / scale
    if error > CHECK_TOLERANCE:
        raise ServerError(f"the exported artifact differs from split-pack's interpreter: relative error "
                          f"{error:.1e} > {CHECK_TOLERANCE:.0e}")
    print(f"checked: artifact vs interpreter {error:.1e}, vs unsplit model "
          f"{(out.float() - unsplit.float()).abs().max().item() / scale:.1e} (relative)", file=sys.stderr)


def _write_triton(args, write, deploy: dict, split, model, example, title: str) -> Path:
    from splitpack.serving.triton.libtorch import libtorch_model_name, render_libtorch_config, write_libtorch_model

    with torch.inference_mode():
        classes = model(example[:1]).shape[-1]
    name = args.name or libtorch_model_name(title)
    command = shlex.join(["splitpack", "export", *common.model_flags(args), "--size", str(args.size), "--merge-layer",
                          split.plan.merge_layer_text, "--grid", split.plan.grid_text, "--format", args.format,
                          "--dtype", args.dtype, *[a for p, v in given(args, DEPLOY).items()
                                                   for a in (f"--{p.replace('_', '-')}", str(v))],
                          *(["--weight-sharing"] if args.weight_sharing else []), "--out", "REPO"])
    text = render_libtorch_config(name, tuple(example.shape[1:]), classes, example.dtype, deploy,
                                  args.weight_sharing, command)
    return write_libtorch_model(args.out, name, write, text)
