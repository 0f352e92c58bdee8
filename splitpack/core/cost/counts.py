"""What a plan costs, read off its program without running it: convolution MACs (halo
recompute and second passes included) and the size of every checkpoint."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx, nn

from splitpack.core.capture.graph import Shape, TracedModel, shape_numel
from splitpack.core.plan.schedule import Program, full_shape




def node_macs(node: fx.Node, gm: fx.GraphModule, shapes: dict[fx.Node, Shape]) -> int:
    """Multiply-accumulates of a convolution or linear node for one image at ``shapes``' size."""
    out = shapes.get(node)
    if not isinstance(out, torch.Size):
        return 0
    per_output = 0
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.Conv2d):
            per_output = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            per_output = m.in_features
    elif node.op == "call_function" and node.target in (F.conv2d, F.linear) and len(node.args) > 1:
        weight = shapes.get(node.args[1]) if isinstance(node.args[1], fx.Node) else None
        if weight is not None:
            per_output = math.prod(weight[1:])
    return per_output * shape_numel(out) // out[0] if per_output else 0


def unsplit_macs(traced: TracedModel, shapes) -> int:
    return sum(node_macs(n, traced.gm, shapes) for n in traced.nodes)


def _area(region) -> int:
    (h0, h1), (w0, w1) = region
    return (h1 - h0) * (w1 - w0)


def program_macs(traced: TracedModel, program: Program, shapes, tail_nodes: list[fx.Node]) -> int:
    """MACs of one image through the split program, then the rest of the network."""
    total = 0
    per_image: dict[fx.Node, int] = {}  # node_macs of each node, looked up once
    for stage in program.stages:
        hw = {}
        for pass_ in stage.passes:
            for pack in pass_.packs:
                for step in pack.steps:
                    if step.reduce:
                        continue
                    if step.node not in per_image:
                        per_image[step.node] = node_macs(step.node, traced.gm, shapes)
                    macs = per_image[step.node]
                    if macs:
                        if step.node not in hw:
                            h, w = stage.shapes[step.node][stage.layouts[step.node][0]], \
                                stage.shapes[step.node][stage.layouts[step.node][1]]
                            hw[step.node] = h * w
                        total += macs * _area(step.region) // hw[step.node]
            total += sum(node_macs(n, traced.gm, shapes) for n in pass_.after)
    return total + sum(node_macs(n, traced.gm, shapes) for n in tail_nodes)


def checkpoint_bytes(program: Program, batch: int, dtype: torch.dtype) -> list[int]:
    """Bytes of each stage's merged checkpoint (full size)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return [sum(math.prod(full_shape(stage.shapes[t], batch)) for t in stage.graph.targets) * itemsize
            for stage in program.stages]


def program_ops(program: Program, tail_nodes: list[fx.Node]) -> int:
    """Ops executed for one batch: every step of every pack and pass, the global values (squeeze-excitation
    gates, pooled results) and the rest of the network's calls."""
    steps = sum(len(pack.steps) for stage in program.stages for pass_ in stage.passes for pack in pass_.packs)
    globals_ = sum(len(stage.before) + sum(len(p.after) + len(p.reductions) for p in stage.passes)
                   for stage in program.stages)
    return steps + globals_ + sum(1 for n in tail_nodes if n.op.startswith("call_"))
