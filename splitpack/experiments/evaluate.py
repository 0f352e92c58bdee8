"""Accuracy and memory of split-pack strategies vs resizing the input (poster Fig. 4).

For every strategy -- ``unsplit``; ``exact:LAYER:G`` (halo packs, same output);
``seed:LAYER:G`` (the poster's no-halo packs); ``resize:SCALE`` (poster's Method 1,
shrink the input) -- report top-1/top-5 against the labels, agreement with the
unsplit top-1, the logit deviation from unsplit, and the peak activation memory,
measured for every strategy with the same tracker
(:func:`splitpack.measure.meter.peak_activation_bytes`, batch 1).

Method 2 of the poster (retrain at the smaller size) needs an ImageNet training
set and is not reproduced.
"""
from __future__ import annotations

import csv
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
DEFAULT_GRIDS = (2, 3, 4)
DEFAULT_EXACT_GRIDS = (2, 4)
DEFAULT_SCALES = (0.5, 0.6, 0.7, 0.8, 0.9)
KINDS = ("unsplit", "exact", "seed", "resize")


# ----------------------------------------------------------------------------- strategies


@dataclass(frozen=True)
class Strategy:
    """One way of running the model on an input of the evaluated size."""

    kind: str
    merge_layer: str | None = None
    grid: int = 1
    scale: float = 1.0

    @property
    def label(self) -> str:
        if self.kind in ("exact", "seed"):
            return f"{self.kind}:{self.merge_layer}:{self.grid}"
        if self.kind == "resize":
            return f"resize:{self.scale:g}"
        return self.kind

    def build(self, model: nn.Module, size: int, traced=None) -> Callable[[torch.Tensor], torch.Tensor]:
        """A callable ``x (N,3,size,size) -> logits`` for this strategy. ``traced``: the model's trace
        (:func:`splitpack.core.capture.graph.trace`), shared by every split strategy instead of one trace each."""
        if self.kind == "unsplit":
            return model
        if self.kind == "resize":
            side = max(1, round(size * self.scale))

            def resized(x: torch.Tensor) -> torch.Tensor:
                # antialias: shrinking without it aliases and costs accuracy a real resize would not
                return model(F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False))

            return resized
        from splitpack.core.engine import SplitPack

        return SplitPack(model, self.merge_layer, (self.grid, self.grid), self.kind, traced=traced)


def parse_strategy(text: str) -> Strategy:
    """``unsplit`` | ``exact:LAYER:G`` | ``seed:LAYER:G`` | ``resize:SCALE``."""
    kind, *rest = text.strip().split(":")
    try:
        if kind == "unsplit" and not rest:
            return Strategy("unsplit")
        if kind == "resize" and len(rest) == 1:
            scale = float(rest[0])
            if not 0 < scale <= 1:
                raise ValueError
            return Strategy("resize", scale=scale)
        if kind in ("exact", "seed") and len(rest) == 2:
            grid = int(rest[1])
            if grid < 1:
                raise ValueError
            return Strategy(kind, merge_layer=rest[0], grid=grid)
    except ValueError:
        pass
    raise ValueError(f"bad strategy {text!r}: use unsplit, exact:LAYER:G, seed:LAYER:G or resize:SCALE (0<SCALE<=1)")


def spread(items: list, count: int) -> list:
    """``count`` items evenly spread over ``items``, first and last included."""
    if count >= len(items):
        return list(items)
    if count == 1:
        return [items[len(items) // 2]]
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def block_layers(model: nn.Module, mode: str = "exact") -> list[str]:
    """Merge layers ``mode`` takes, at block granularity, execution order: top-level modules (stem,
    head) and the blocks of each stage (``blocks.S.B`` in timm, ``layerN.B`` in torchvision). The
    full :func:`splitpack.merge_layers` list also names every conv/bn inside a block; seed mode
    takes only the spatial ones (no global pooling)."""
    import splitpack

    wanted = set()
    for name, child in model.named_children():
        if not isinstance(child, nn.Sequential):
            wanted.add(name)
            continue
        for sub_name, sub in child.named_children():
            if isinstance(sub, nn.Sequential):  # stage of blocks
                wanted.update(f"{name}.{sub_name}.{b}" for b, _ in sub.named_children())
            else:
                wanted.add(f"{name}.{sub_name}")
    return [n for n in splitpack.merge_layers(model, mode=mode) if n in wanted]


def default_strategies(
    model: nn.Module,
    grids: Iterable[int] = DEFAULT_GRIDS,
    exact_grids: Iterable[int] = DEFAULT_EXACT_GRIDS,
    exact_layers: int | list[str] = 4,
    seed_layers: int | list[str] | None = None,
    scales: Iterable[float] = DEFAULT_SCALES,
) -> list[Strategy]:
    """unsplit; exact at ``exact_layers`` (names, or a count spread over the block-level merge
    layers exact mode takes) x ``exact_grids``; seed at every block-level merge layer seed mode
    takes (or ``seed_layers``: names or a count) x ``grids``; resize at ``scales``."""
    if isinstance(exact_layers, int):
        exact_layers = spread(block_layers(model, "exact"), exact_layers)
    if seed_layers is None or isinstance(seed_layers, int):
        seed_blocks = block_layers(model, "seed")
        seed_layers = seed_blocks if seed_layers is None else spread(seed_blocks, seed_layers)
    strategies = [Strategy("unsplit")]
    for layer in exact_layers:
        strategies += [Strategy("exact", layer, g) for g in exact_grids]
    for layer in seed_layers:
        strategies += [Strategy("seed", layer, g) for g in grids]
    strategies += [Strategy("resize", scale=s) for s in scales]
    return strategies


# ----------------------------------------------------------------------------- data


def labelled_images(root: str | Path) -> list[tuple[Path, int]]:
    """(path, class index) for an ImageNet-style folder.

    ``labels.tsv`` (columns ``file``, ``class_index``) if present, else one
    sub-folder per class named by its synset (``n01440764/...``), mapped to the
    ImageNet-1k index with timm's ImageNet info.
    """
    root = Path(root)
    if (root / "labels.tsv").is_file():
        with open(root / "labels.tsv", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            if not reader.fieldnames or not {"file", "class_index"} <= set(reader.fieldnames):
                raise ValueError(f"{root / 'labels.tsv'}: needs tab-separated columns 'file' and 'class_index'")
            return [(root / row["file"], int(row["class_index"])) for row in reader]
    from timm.data import ImageNetInfo

    synsets = {name: i for i, name in enumerate(ImageNetInfo().label_names())}
    items = [
        (path, synsets[folder.name])
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name in synsets)
        for path in sorted(folder.iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not items:
        raise ValueError(f"{root}: no labels.tsv and no synset-named class folders with images")
    return items


def load_images(items: list[tuple[Path, int]], transform) -> Iterator[tuple[Path, int, torch.Tensor | None]]:
    """(path, label, tensor); tensor is None when the file cannot be read as an image."""
    from PIL import Image

    for path, label in items:
        try:
            with Image.open(path) as img:
                x = transform(img.convert("RGB"))
        except (OSError, ValueError, SyntaxError):  # PIL: truncated/corrupt/unknown format
            yield path, label, None
            continue
        yield path, label, x


def batches(images: Iterable, batch_size: int) -> Iterator[list]:
    batch = []
    for item in images:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


# ----------------------------------------------------------------------------- evaluation


@dataclass
class Tally:
    """Running metrics of one strategy."""

    strategy: Strategy
    peak_bytes: int = 0
    n: int = 0
    top1: int = 0
    top5: int = 0
    agree: int = 0
    max_logit_dev: float = 0.0
    sum_logit_dev: float = 0.0
    seconds: float = 0.0
    disagreements: list[str] = field(default_factory=list)

    def update(self, logits: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor, names: list[str]) -> None:
        top5 = logits.topk(5, dim=1).indices
        self.n += len(labels)
        self.top1 += int((top5[:, 0] == labels).sum())
        self.top5 += int((top5 == labels[:, None]).any(1).sum())
        same = top5[:, 0] == reference.argmax(1)
        self.agree += int(same.sum())
        self.disagreements += [n for n, s in zip(names, same.tolist()) if not s]
        dev = (logits - reference).abs().amax(1)
        self.max_logit_dev = max(self.max_logit_dev, float(dev.max()))
        self.sum_logit_dev += float(dev.sum())

    def summary(self, baseline: "Tally") -> dict:
        n = max(self.n, 1)
        return {
            **{k: v for k, v in asdict(self.strategy).items()},
            "label": self.strategy.label,
            "top1": self.top1 / n,
            "top5": self.top5 / n,
            "agreement": self.agree / n,
            "top1_change": (self.top1 - baseline.top1) / n,
            "max_logit_dev": self.max_logit_dev,
            "mean_logit_dev": self.sum_logit_dev / n,
            "peak_bytes": self.peak_bytes,
            "seconds_per_image": self.seconds / n,
            "memory_reduction": 1 - self.peak_bytes / baseline.peak_bytes if baseline.peak_bytes else 0.0,
            "disagreements": self.disagreements,
        }


def data_transform(model: nn.Module, size: int | None):
    """timm's eval transform for ``model`` (its pretrained_cfg), at ``size`` if given."""
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config(model=model)
    if size:
        cfg["input_size"] = (3, size, size)
    return create_transform(**cfg), cfg


def evaluate(
    model: nn.Module,
    items: list[tuple[Path, int]],
    strategies: list[Strategy],
    size: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "evaluate",
) -> dict:
    """Run every strategy on every readable image; one result dict (see module doc)."""
    from tqdm import tqdm

    from splitpack.core.capture.graph import trace
    from splitpack.measure.meter import peak_activation_bytes

    transform, cfg = data_transform(model, size)
    size = cfg["input_size"][-1]
    if not strategies or strategies[0].kind != "unsplit":
        strategies = [Strategy("unsplit")] + [s for s in strategies if s.kind != "unsplit"]
    traced = trace(model) if any(s.kind in ("exact", "seed") for s in strategies) else None
    runners = {s: s.build(model, size, traced) for s in strategies}
    tallies = {s: Tally(s) for s in strategies}
    skipped: list[str] = []
    measured = False
    bar = tqdm(total=len(items), desc=desc, unit="img", disable=not progress, file=sys.stderr)
    with torch.inference_mode():
        for batch in batches(load_images(items, transform), batch_size):
            good = [(p, y, x) for p, y, x in batch if x is not None]
            skipped += [str(p) for p, _, x in batch if x is None]
            if not good:
                bar.update(len(batch))
                continue
            x = torch.stack([g[2] for g in good])
            labels = torch.tensor([g[1] for g in good])
            names = [g[0].name for g in good]
            if not measured:  # activation memory depends on shapes only: measure once, batch 1
                for s, run in runners.items():
                    run(x[:1])  # warm-up: the first call at a new size plans with fake tensors
                    tallies[s].peak_bytes = peak_activation_bytes(run, x[:1])
                measured = True
            n = len(good)
            if n < batch_size:  # same batch shape every time: split-pack plans are per input shape
                x = torch.cat([x, x[-1:].expand(batch_size - n, *x.shape[1:])])
            start = time.perf_counter()
            reference = runners[strategies[0]](x)[:n]
            tallies[strategies[0]].seconds += time.perf_counter() - start
            for s, run in runners.items():
                if s.kind != "unsplit":
                    start = time.perf_counter()
                    out = run(x)[:n]
                    tallies[s].seconds += time.perf_counter() - start
                else:
                    out = reference
                tallies[s].update(out, reference, labels, names)
            bar.update(len(batch))
            bar.set_postfix(skipped=len(skipped))
    bar.close()
    baseline = tallies[strategies[0]]
    return {
        "input_size": size,
        "data_config": {k: v for k, v in cfg.items()},
        "n_images": baseline.n,
        "n_skipped": len(skipped),
        "skipped": skipped,
        "strategies": [t.summary(baseline) for t in tallies.values()],
    }


# ----------------------------------------------------------------------------- reporting

_FAMILY_STYLE = {  # one marker family per strategy kind (and grid)
    "unsplit": dict(marker="*", color="black", s=160),
    "exact": dict(marker="o", color="tab:green", s=70),
    "seed:2": dict(marker="^", color="tab:blue", s=40),
    "seed:3": dict(marker="s", color="tab:purple", s=36),
    "seed:4": dict(marker="D", color="tab:orange", s=32),
    "seed": dict(marker="v", color="tab:gray", s=36),
    "resize": dict(marker="X", color="tab:red", s=70),
}


def _family(row: dict) -> str:
    if row["kind"] == "seed":
        return f"seed:{row['grid']}" if f"seed:{row['grid']}" in _FAMILY_STYLE else "seed"
    return row["kind"]


def _family_label(family: str) -> str:
    if family.startswith("seed:"):
        g = family.split(":")[1]
        return f"seed (no halo) {g}x{g}"
    return {"unsplit": "unsplit", "exact": "exact (halo)", "resize": "resize (Method 1)",
            "seed": "seed, other grids"}[family]


def _point_label(row: dict) -> str | None:
    if row["kind"] == "resize":
        return f"{row['scale']:g}"
    if row["kind"] in ("seed", "exact"):
        return f"{row['merge_layer']}:{row['grid']}"
    return None


def plot(report: dict, png: str | Path) -> None:
    """Top-1 change vs memory reduction, one panel per evaluated input size."""
    from splitpack.measure.plot import pyplot

    plt = pyplot()

    runs = report["runs"]
    annotate_all = max(len(run["strategies"]) for run in runs) <= 30  # else only resize scales
    fig, axes = plt.subplots(1, len(runs), figsize=(6.2 * len(runs), 4.8), squeeze=False)
    for ax, run in zip(axes[0], runs):
        seen = set()
        for row in run["strategies"]:
            fam = _family(row)
            style = _FAMILY_STYLE[fam]
            ax.scatter(100 * row["memory_reduction"], 100 * row["top1_change"], label=None if fam in seen
                       else _family_label(fam), alpha=0.85, edgecolors="none", zorder=3, **style)
            seen.add(fam)
            text = _point_label(row)
            if text and (annotate_all or row["kind"] == "resize"):
                ax.annotate(text, (100 * row["memory_reduction"], 100 * row["top1_change"]),
                            textcoords="offset points", xytext=(4, -9), fontsize=6, color=style["color"])
        ax.axhline(0, color="gray", lw=0.8)
        base = next(r for r in run["strategies"] if r["kind"] == "unsplit")
        ax.set_title(f"{report['model']} @ {run['input_size']}px, {run['n_images']} images\n"
                     f"unsplit top-1 {100 * base['top1']:.1f}%, peak {base['peak_bytes'] / 2**20:.1f} MiB")
        ax.set_xlabel("peak activation memory reduction vs unsplit (%)")
        ax.set_ylabel("top-1 change vs unsplit (percentage points)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def markdown(report: dict, max_seed_rows: int | None = None) -> str:
    """Markdown tables, one per input size."""
    out = []
    for run in report["runs"]:
        out.append(f"**{report['model']} @ {run['input_size']}px** — {run['n_images']} images"
                   f" ({run['n_skipped']} unreadable skipped)\n")
        out.append("| strategy | top-1 | top-5 | Δtop-1 (pp) | agrees w/ unsplit | max \\|Δlogit\\| | peak act. MiB | memory saved |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for row in run["strategies"]:
            out.append(
                f"| {row['label']} | {100 * row['top1']:.1f}% | {100 * row['top5']:.1f}% | "
                f"{100 * row['top1_change']:+.1f} | {100 * row['agreement']:.1f}% | {row['max_logit_dev']:.2g} | "
                f"{row['peak_bytes'] / 2**20:.2f} | {100 * row['memory_reduction']:.1f}% |"
            )
        out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------- CLI


def parse_size(text: str, native: int) -> int:
    """``224`` or a multiple of the native size like ``2x``."""
    text = text.strip().lower()
    if text.endswith("x"):
        return round(float(text[:-1]) * native)
    return int(text)
