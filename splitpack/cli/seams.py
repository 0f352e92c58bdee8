"""Feature maps after the merge: unsplit vs seed vs exact split-pack, with difference maps (poster Figs. 3-4)."""
from __future__ import annotations

import argparse
import json

from splitpack.cli import common
from splitpack.core.plan.spec import parse_grid


def square_grid(text: str) -> int:
    rows, cols = parse_grid(text)
    if rows != cols:
        raise ValueError(f"seams draws square grids only (NxN), got {text!r}")
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_model(parser, "show")
    parser.add_argument("--image", required=True, help="image file")
    common.add_split(parser, mode=False, defaults={"merge_layer": None},  # seed and exact, side by side
                     shown={"merge_layer": "a quarter into the block-level layers", "grid": "2x2, the poster's; NxN"})
    parser.add_argument("--layers", help="comma list of layers to show, at or after the merge layer "
                                         "(default: 4 spread from the merge layer to the last block)")
    parser.add_argument("--size", type=int, help="input size (default: the model's native size)")
    parser.add_argument("--png", required=True, help="write the figure here")
    common.add_json(parser, "the per-layer errors")
    parser.add_argument("--out", help="write the per-layer errors (JSON) here")


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    import splitpack
    from splitpack.experiments.evaluate import block_layers, data_transform, spread
    from splitpack.experiments.seams import feature_maps, plot_seams, seam_report, tap_modules
    from splitpack.publish import staged_path, write_text

    grid = square_grid(args.grid)  # before minutes of loading
    model, spec = common.build_model(args)
    transform, cfg = data_transform(model, args.size)
    with Image.open(args.image) as img:
        x = transform(img.convert("RGB")).unsqueeze(0)
    blocks = block_layers(model)
    merge_layer = args.merge_layer or blocks[len(blocks) // 4]
    order = splitpack.merge_layers(model)
    if merge_layer not in order:
        raise ValueError(f"unknown merge layer {merge_layer!r}; valid: {', '.join(order)}")
    after = [l for l in blocks if order.index(l) >= order.index(merge_layer)]
    shown = args.layers.split(",") if args.layers else spread(after, 4)
    curve = sorted(set(after) | set(shown), key=order.index)
    observable = tap_modules(model, curve, strict=False)
    curve = [l for l in curve if l in observable]
    shown = [l for l in shown if l in curve]
    result = feature_maps(model, x, curve, merge_layer, grid)
    report = seam_report(result, curve)
    report.update(model=spec.title, image=str(args.image), merge_layer=merge_layer, grid=grid,
                  input_size=cfg["input_size"][-1])
    title = (f"{spec.title} @ {cfg['input_size'][-1]}px, {grid}x{grid} packs merged after {merge_layer}; "
             f"top-1 same as unsplit: seed {report['logits']['seed']['same_top1']}, "
             f"exact {report['logits']['exact']['same_top1']} (max |dlogit| seed "
             f"{report['logits']['seed']['max_abs_diff']:.2g}, exact {report['logits']['exact']['max_abs_diff']:.2g})")
    with staged_path(args.png) as tmp:
        plot_seams(result, shown, curve, tmp, title, grid)
    if args.out:
        write_text(args.out, json.dumps(report, indent=1))
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    for layer, row in report["layers"].items():
        seed = "n/a (seed map " + "x".join(map(str, row["seed_shape"][-2:])) + ")" \
            if row["seed_rel_error"] is None else f"{row['seed_rel_error']:.3g}"
        print(f"{layer:>14} {str(tuple(row['shape'])):>18}  seed rel.err {seed}  exact rel.err {row['exact_rel_error']:.3g}")
    return 0
